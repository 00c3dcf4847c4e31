"""Does ``mapa-vae train`` land far off on curves the project has never seen, and how far apart
do seeds land with one copy (``--restarts 1``) and with the best of three (``--restarts 3``)?

An independent check: four curves that are not among the built-in data sets (two 2-D, two 3-D)
are drawn here with numpy, written to 1000-point ``.npy`` files and trained on through the
command line only, as a user would, with every knob stated (``train --method mapa --samples 20
--k 2 --epochs E --noise-var σ² --restarts R --seed s`` and the architecture, optimizer and
validation knobs below). Each model is then scored on ``--n-test`` fresh points from the truth
with ``mapa-vae evaluate --per-point``, and the truth's own log-density is computed here by
quadrature over the curve's parameter (no project code), so

    KL(p_true ‖ p_model) ≈ mean over test points of  log p_true(x) − log p_model(x).

Copy ``r`` of a run seeded ``s`` is seeded from ``(s, r)`` (``mapa_vae.seeds``), so the runs of
different seeds share no copy: the spread over seeds of ``--restarts 3`` is that of three
disjoint best-of-3 draws. ``summary`` holds, per curve and R, the KL's mean, standard deviation
and range (max − min) over the seeds.

    python benchmarks/unseen_curves.py --restarts 1 3 --seeds 0 1 2 --json unseen.json
    python benchmarks/unseen_curves.py --tiny --json /tmp/unseen.json   # seconds: the CI smoke test

Keys per record: ``curve``, ``method``, ``restarts``, ``seed``, ``epochs``, ``n_train``,
``test_kl``, ``best_val_selection_score_per_copy``, ``seconds``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import parser, start, write_records

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


def stated(method: str, epochs: int, restarts: int | str, seed: int | str) -> list[str]:
    """Every knob of a training run, as flags (none left to ``train``'s defaults)."""
    return ["--method", method, "--samples", "20", "--k", "2", "--epochs", str(epochs),
            "--noise-var", str(NOISE_VAR), "--restarts", str(restarts), "--seed", str(seed),
            "--hidden", "50", "50", "50", "--activation", "tanh", "--latent-dim", "1",
            "--batch-size", "100", "--lr", "0.001", "--threads", "1", "--dtype", "float32",
            "--eval-every", "10", "--posterior", "kernel", "--tail", "per-point",
            "--batching", "random", "--prior-fit", "map"]


def summarize(records: list[dict]) -> list[dict]:
    """Per (curve, method, R): the KL over seeds, its mean, standard deviation and range."""
    out = []
    for key in sorted({(r["curve"], r["method"], r["restarts"]) for r in records}):
        kl = np.array([r["test_kl"] for r in records if (r["curve"], r["method"], r["restarts"]) == key])
        out.append({"curve": key[0], "method": key[1], "restarts": key[2], "seeds": len(kl),
                    "kl_mean": float(kl.mean()), "kl_std": float(kl.std(ddof=1)) if len(kl) > 1 else None,
                    "kl_range": float(kl.max() - kl.min())})
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--curves", nargs="+", default=list(CURVES), choices=list(CURVES))
    ap.add_argument("--methods", nargs="+", default=["mapa"])
    ap.add_argument("--restarts", nargs="+", type=int, default=[1, 3])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=5000)
    args = ap.parse_args()
    info = start(args)
    if args.tiny:
        args.curves, args.restarts, args.seeds, args.epochs, args.n_test = ["cardioid"], [2], [0], 1, 200

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
                        cmd = [*exe, "train", "--data", str(train_file),
                               *stated(method, args.epochs, r, seed), "--out", str(out), "--quiet"]
                        t0 = time.perf_counter()
                        run(cmd)
                        seconds = time.perf_counter() - t0
                        per_point = Path(tmp, "lp.npy")
                        run([*exe, "evaluate", str(out), "--data", str(test_file),
                             "--per-point", str(per_point)])
                        kl = float(np.mean(truth - np.load(per_point)))
                        metrics = json.loads((out / "metrics.json").read_text())
                        rec = {"curve": name, "method": method, "restarts": r, "seed": seed,
                               "epochs": args.epochs, "n_train": metrics["n_train"], "test_kl": kl,
                               "best_val_selection_score_per_copy":
                                   metrics.get("best_val_selection_score_per_copy"),
                               "seconds": seconds}
                        records.append(rec)
                        print(f"{name:10s} {method:5s} R={r} seed={seed}: KL {kl:7.3f} "
                              f"({seconds:.0f} s)", flush=True)
    summary = summarize(records)
    for row in summary:
        print(f"{row['curve']:10s} {row['method']:5s} R={row['restarts']}: KL mean "
              f"{row['kl_mean']:.3f}, range over {row['seeds']} seeds {row['kl_range']:.3f}")
    knobs = {"train_flags": " ".join(stated("METHOD", args.epochs, "R", "SEED")),
             "restarts": args.restarts, "seeds": args.seeds, "epochs": args.epochs,
             "n_test": args.n_test, "train_points_in_file": 1000, "noise_var": NOISE_VAR}
    write_records(args.json, "unseen_curves", info, knobs, records, summary=summary)


if __name__ == "__main__":
    main()
