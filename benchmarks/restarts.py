"""Seconds per epoch of R copies trained together against one copy, measured through the CLI.

For MAPA (S = 50, k = 5), the VAE and IWAE (S = 50), with 3×50 tanh networks, N = 1000 training
points of ``--data``, batch 100, one torch thread, every knob stated (none left to a
``TrainConfig`` default): ``mapa-vae train --restarts R`` for R in {1, 3, 10} (``together``:
the engine the run chose, vectorized for these three methods; R = 1 is one copy) and R runs of
``--restarts 1`` one after another with seeds 0 … R-1 (``one_after_another``: the sum of their
training seconds). ``seconds_per_epoch`` is the run's own clock (``metrics.json``: its steps and
one validation at the last epoch, on 100 validation points so that it stays a small part) over
its epochs; ``ratio_to_r1`` is a record's time over one copy's, the median of the R single runs
(``single_seconds_per_epoch`` holds them all), measured in the same process minutes apart (on a
shared machine compare ratios, not seconds).

    python benchmarks/restarts.py --json restarts.json [--epochs 5] [--data circle] [--methods mapa]
    python benchmarks/restarts.py --tiny --json /tmp/restarts.json   # seconds: the CI smoke test
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from harness import bench_config, knobs_of, parser, start, write_records

from mapa_vae.cli import main as cli
from mapa_vae.config import TrainConfig, flag_name

CASES = (("mapa", 50), ("vae", 1), ("iwae", 50))  # (method, S)


def knobs(method: str, samples: int, data: str, epochs: int, n_train: int, restarts: int,
          seed: int, cache: str) -> dict[str, Any]:
    """Every knob of one run, stated."""
    return dict(data=data, method=method, samples=samples, k=max(1, samples // 10), epochs=epochs,
                eval_every=epochs, batch_size=100, lr=1e-3, seed=seed, restarts=restarts,
                hidden=(50, 50, 50), activation="tanh", latent_dim=1, threads=1, dtype="float32",
                batching="random", n_train=n_train, n_val=100, n_test=100, val_grid=2**8,
                test_grid=2**8, prior_steps=50, cache_dir=cache)


def seconds_per_epoch(cfg: TrainConfig, out: Path) -> float:
    """``mapa-vae train`` with every stated knob as a flag; the run's seconds per epoch."""
    argv = ["train", "--out", str(out), "--quiet", "--overwrite"]
    for key, value in dataclasses.asdict(cfg).items():
        if key in STATED_FLAGS:
            argv += [flag_name(key), *(map(str, value) if isinstance(value, tuple) else [str(value)])]
    with contextlib.redirect_stdout(io.StringIO()):  # the run's metrics, read from its file below
        code = cli(argv)
    if code != 0:
        raise SystemExit(f"mapa-vae {' '.join(argv)} failed")
    return float(json.loads((out / "metrics.json").read_text())["seconds_per_epoch"])


STATED_FLAGS = tuple(knobs("mapa", 50, "circle", 1, 1, 1, 0, ""))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", default="circle")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=[m for m, _ in CASES], choices=[m for m, _ in CASES])
    args = p.parse_args()
    info = start(args)
    cases, restarts = (CASES, (1, 3, 10)) if not args.tiny else ((("mapa", 5), ("vae", 1)), (1, 2))
    cases = tuple(c for c in cases if c[0] in args.methods)
    epochs, n_train = (args.epochs, 1000) if not args.tiny else (1, 100)
    records: list[dict[str, Any]] = []
    stated: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        for method, s in cases:
            def cfg(r: int, seed: int = 0, e: int = epochs, m: str = method, s: int = s) -> TrainConfig:
                return bench_config(**knobs(m, s, args.data, e, n_train, r, seed, str(Path(tmp) / "cache")))
            seconds_per_epoch(cfg(1, e=1), out)  # warm up (and fill MAPA's cache)
            stated[method] = knobs_of(cfg(1), "data", "k", "epochs", "batching", "n_train", "n_val")
            single = [seconds_per_epoch(cfg(1, seed), out) for seed in range(max(restarts))]
            one = statistics.median(single)  # one copy's seconds per epoch
            for r in restarts:
                together = one if r == 1 else seconds_per_epoch(cfg(r), out)
                apart = sum(single[:r]) if r > 1 else one
                for mode, sec in (("together", together), ("one_after_another", apart)):
                    records.append({"method": method, "samples": s if method != "vae" else None,
                                    "restarts": r, "mode": mode, "seconds_per_epoch": sec,
                                    "ratio_to_r1": sec / one, "single_seconds_per_epoch": single})
                    print(f"{method:5s} S={s:3d} R={r:2d} {mode:17s} {sec:8.4f} s/epoch "
                          f"({sec / one:.2f}× one copy)", flush=True)
    write_records(args.json, "restarts", info, stated, records)


if __name__ == "__main__":
    main()
