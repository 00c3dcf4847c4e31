"""Network passes per point per step, and wall-clock per epoch: MAPA vs IWAE (paper Fig. 2b, 4, 5).

For spiral-dots (N = 1000 training points, batch 100) and S in {10, 50, 100, 200}, MAPA uses
k = 10 % of S. Each configuration trains for a few real epochs (Adam steps included) in this one
process, so the timings are side by side on the same machine. Prints a table and the ratios
behind the paper's claim (c): MAPA at S = 200 needs no more decoder passes than IWAE at S = 50.

    python benchmarks/passes.py [--data spiral-dots] [--epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from mapa_vae.config import TrainConfig
from mapa_vae.data.loading import load_dataset
from mapa_vae.methods.base import Architecture
from mapa_vae.models.likelihoods import GaussianLikelihood
from mapa_vae.registry import METHODS


def measure(method: str, samples: int, data: torch.Tensor, noise_var: float, epochs: int,
            cache_dir: str) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = TrainConfig(method=method, samples=samples, cache_dir=cache_dir)
    m = METHODS[method]
    model = m.build(Architecture(2, 1, (50, 50, 50), "tanh"), GaussianLikelihood(noise_var), cfg)
    objective = m.objective(model, data, cfg)  # MAPA's posterior comes from the cache
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = data.shape[0]
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n)
        for start in range(0, n, cfg.batch_size):
            index = perm[start : start + cfg.batch_size]
            loss = -objective(model, data[index], index).surrogate.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    per_epoch = (time.perf_counter() - t0) / epochs
    return {**objective.passes.per_point(), "seconds_per_epoch": per_epoch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="spiral-dots")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, nargs="+", default=[10, 50, 100, 200])
    args = p.parse_args()
    ds = load_dataset(args.data)
    assert ds.truth is not None
    x = ds.train.float()
    rows: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as cache:
        for s in args.samples:
            for method in ("mapa", "iwae"):
                rows[(method, s)] = measure(method, s, x, ds.truth.noise_var, args.epochs, cache)
    print(f"{args.data}: N = {x.shape[0]}, batch 100, {args.epochs} epochs per row, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| method | S | k | decoder passes/pt/step | enc+dec passes/pt/step | s/epoch |")
    print("|---|---|---|---|---|---|")
    for (method, s), r in rows.items():
        k = max(1, round(0.1 * s)) if method == "mapa" else "-"
        print(f"| {method} | {s} | {k} | {r['decoder']:.2f} | {r['encoder+decoder']:.2f} "
              f"| {r['seconds_per_epoch']:.3f} |")
    if ("mapa", 200) in rows and ("iwae", 50) in rows:
        m, i50 = rows[("mapa", 200)], rows[("iwae", 50)]
        print(f"\ndecoder passes, MAPA(S=200) / IWAE(S=50): {m['decoder'] / i50['decoder']:.3f} "
              f"(claim: <= 1) -> {'holds' if m['decoder'] <= i50['decoder'] else 'fails'}")
        if ("iwae", 100) in rows:
            i100 = rows[("iwae", 100)]
            ratio = m["encoder+decoder"] / i100["encoder+decoder"]
            print(f"enc+dec passes, MAPA(S=200) / IWAE(S=100): {ratio:.3f} (claim: about 1 or less)")
    for s in args.samples:
        m, i = rows[("mapa", s)], rows[("iwae", s)]
        print(f"S={s}: wall-clock per epoch MAPA / IWAE = "
              f"{m['seconds_per_epoch'] / i['seconds_per_epoch']:.2f}, "
              f"decoder passes MAPA / IWAE = {m['decoder'] / i['decoder']:.3f}")


if __name__ == "__main__":
    main()
