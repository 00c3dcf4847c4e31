"""Wall-clock of R restarts trained together (vectorized) against R separate runs (sequential).

For MAPA (S = 50, k = 5), the VAE and IWAE (S = 50), the package's 3×50 tanh networks, N = 1000
training points of ``--data``, batch 100, one torch thread: ``train --restarts R`` for R in
{1, 3, 10} (``vectorized``; R = 1 is the plain single run) and R single runs one after another
with seeds 0 … R-1 (``sequential``: the sum of their training seconds). ``seconds_per_epoch`` is
a run's training seconds (the loop's clock: steps, and one validation at the last epoch, on a
small validation set so that it stays a small part) over its epochs. Each record also has
``ratio_to_r1``, its time over the R = 1 run's.

    python benchmarks/restarts.py --json restarts.json [--epochs 5] [--data circle]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from typing import Any

import torch

from mapa_vae.config import TrainConfig
from mapa_vae.training.loop import train

CASES = (("mapa", 50), ("vae", 1), ("iwae", 50))  # (method, S)
RESTARTS = (1, 3, 10)


def seconds_per_epoch(cfg: TrainConfig) -> float:
    return float(train(cfg, progress=False).metrics["seconds_per_epoch"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="write the records here")
    parser.add_argument("--data", default="circle")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as cache:
        for method, s in CASES:
            base = dict(data=args.data, method=method, samples=s, epochs=args.epochs,
                        eval_every=args.epochs, n_val=100, n_test=100, val_grid=2**8,
                        test_grid=2**8, cache_dir=cache, threads=1)
            seconds_per_epoch(TrainConfig(**{**base, "epochs": 1}))  # warm up (and fill MAPA's cache)
            single = [seconds_per_epoch(TrainConfig(**base, seed=r)) for r in range(max(RESTARTS))]
            for r in RESTARTS:
                vec = single[0] if r == 1 else seconds_per_epoch(TrainConfig(**base, restarts=r))
                seq = sum(single[:r])
                for mode, sec in (("vectorized", vec), ("sequential", seq)):
                    records.append({"method": method, "samples": s if method != "vae" else None,
                                    "restarts": r, "mode": mode, "seconds_per_epoch": sec,
                                    "ratio_to_r1": sec / single[0]})
                    print(f"{method:5s} S={s:3d} R={r:2d} {mode:10s} {sec:8.4f} s/epoch "
                          f"({sec / single[0]:.2f}× R=1)", flush=True)
    meta = {"load_average_before": load_before, "load_average_after": os.getloadavg(),
            "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": 1, "data": args.data, "epochs": args.epochs,
            "wall_seconds": time.perf_counter() - t0}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=2)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
