"""Does a default ``mapa-vae train`` land far off on curves the project has never seen?

An independent check (issue 12): four curves that are not among the built-in data sets (two
2-D, two 3-D) are drawn here with numpy, written to 1000-point ``.npy`` files and trained on
through the command line only, as a user would (``train --method M --samples 20 --k 2
--epochs E --noise-var σ²`` plus ``--restarts R`` where given). Each model is then scored on
5000 fresh points from the truth with ``mapa-vae evaluate --per-point``, and the truth's own
log-density is computed here by quadrature over the curve's parameter (no project code), so

    KL(p_true ‖ p_model) ≈ mean over test points of  log p_true(x) − log p_model(x).

Usage::

    python benchmarks/unseen_curves.py --restarts 1 3 --seeds 0 1 2 --json unseen.json

Keys per record: ``curve``, ``method``, ``restarts``, ``seed``, ``epochs``, ``test_kl``,
``seconds``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NOISE_VAR = 0.01


def cardioid(t: np.ndarray) -> np.ndarray:
    a = 2 * np.pi * t
    r = 1 - np.cos(a)
    return np.stack([r * np.cos(a) + 0.5, r * np.sin(a)], -1) * 0.8


def sine_wave(t: np.ndarray) -> np.ndarray:
    u = 2 * t - 1
    return np.stack([2 * u, 0.8 * np.sin(3 * np.pi * u)], -1)


def helix(t: np.ndarray) -> np.ndarray:
    a = 4 * np.pi * t
    return np.stack([np.cos(a), np.sin(a), 2 * t - 1], -1)


def trefoil(t: np.ndarray) -> np.ndarray:
    a = 2 * np.pi * t
    return np.stack([np.sin(a) + 2 * np.sin(2 * a), np.cos(a) - 2 * np.cos(2 * a),
                     -np.sin(3 * a)], -1) / 2.5


CURVES = {"cardioid": cardioid, "sine-wave": sine_wave, "helix": helix, "trefoil": trefoil}


def sample(curve, n: int, rng: np.random.Generator) -> np.ndarray:
    """x = f(t) + ε, t ~ U(0, 1), ε ~ N(0, σ² I)."""
    f = curve(rng.uniform(0, 1, n))
    return f + rng.normal(0, np.sqrt(NOISE_VAR), f.shape)


def log_p_true(curve, x: np.ndarray, grid: int = 2**14) -> np.ndarray:
    """log ∫₀¹ N(x; f(t), σ² I) dt by the midpoint rule on ``grid`` points, in log space."""
    f = curve((np.arange(grid) + 0.5) / grid)  # (G, D)
    d = x.shape[1]
    out = np.empty(x.shape[0])
    for lo in range(0, x.shape[0], 256):
        sq = ((x[lo:lo + 256, None, :] - f[None]) ** 2).sum(-1)  # (b, G)
        lg = -0.5 * sq / NOISE_VAR - 0.5 * d * np.log(2 * np.pi * NOISE_VAR)
        m = lg.max(1, keepdims=True)
        out[lo:lo + 256] = (m[:, 0] + np.log(np.exp(lg - m).mean(1)))
    return out


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--curves", nargs="+", default=list(CURVES), choices=list(CURVES))
    ap.add_argument("--methods", nargs="+", default=["mapa"])
    ap.add_argument("--restarts", nargs="+", type=int, default=[None],
                    help="R values to pass (omit: the default of `train`)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--json", help="write the records here")
    args = ap.parse_args()

    exe = [sys.executable, "-m", "mapa_vae"]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.curves:
            curve = CURVES[name]
            rng = np.random.default_rng(12345)
            train_file, test_file = Path(tmp, f"{name}.npy"), Path(tmp, f"{name}-test.npy")
            np.save(train_file, sample(curve, 1000, rng).astype(np.float32))
            x_test = sample(curve, args.n_test, rng)
            np.save(test_file, x_test.astype(np.float32))
            truth = log_p_true(curve, x_test)
            for method in args.methods:
                for r in args.restarts:
                    for seed in args.seeds:
                        out = Path(tmp, f"{name}-{method}-{r}-{seed}")
                        cmd = [*exe, "train", "--data", str(train_file), "--method", method,
                               "--samples", "20", "--k", "2", "--epochs", str(args.epochs),
                               "--noise-var", str(NOISE_VAR), "--seed", str(seed),
                               "--out", str(out)]
                        if r is not None:
                            cmd += ["--restarts", str(r)]
                        t0 = time.perf_counter()
                        run(cmd)
                        seconds = time.perf_counter() - t0
                        per_point = Path(tmp, "lp.npy")
                        run([*exe, "evaluate", str(out), "--data", str(test_file),
                             "--per-point", str(per_point)])
                        kl = float(np.mean(truth - np.load(per_point)))
                        rec = {"curve": name, "method": method, "restarts": r, "seed": seed,
                               "epochs": args.epochs, "test_kl": kl, "seconds": seconds}
                        records.append(rec)
                        print(f"{name:10s} {method:5s} R={r} seed={seed}: KL {kl:7.3f} "
                              f"({seconds:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
