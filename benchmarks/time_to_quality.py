"""Time to quality: test log-likelihood of each method's final generative model against seconds.

IWAE(S = 50) and MAPA train under the same wall-clock budget (``--budget`` seconds of training
each, same architecture, batch 100, Adam 1e-3). At ``--checkpoints`` evenly spaced points of
its clock, each method's **final generative model** is built from the current weights and scored
on the same held-out test points by the same estimator:

- IWAE: the model as trained (encoder, decoder, N(0, I) prior);
- MAPA: the model as trained *plus its code prior fitted to the codes* (App. C.3: a flow for
  ``L > 1``, ``--code-prior-steps`` Adam steps), the fitting time added to MAPA's clock, as is
  the time to build MAPA's posterior table;
- the estimator: importance sampling with ``--eval-samples`` draws from each model's own
  encoder-based proposal mixed with its prior (:func:`~mapa_vae.evaluation.log_likelihood`;
  MAPA's deterministic code ``g(x)`` gets a Gaussian of scale 0.1 around it). Scoring is off
  the clock.

Reports IWAE's final test log-likelihood, the first MAPA clock at which MAPA's final model
reaches it, their ratio (the issue's target: at most 1/3), and a PNG of both curves.

    python benchmarks/time_to_quality.py --json ttq.json [--data digits-binary] [--budget 120]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from mapa_vae.config import TrainConfig
from mapa_vae.data.loading import load_dataset
from mapa_vae.methods.base import Architecture
from mapa_vae.models.likelihoods import BernoulliLikelihood
from mapa_vae.registry import BATCHINGS, METHODS


def curve(method: str, cfg: TrainConfig, train: torch.Tensor, test: torch.Tensor, arch: Architecture,
          budget: float, checkpoints: int, eval_samples: int) -> list[dict[str, float]]:
    """Train ``method`` for ``budget`` seconds; the final model's test log-lik at each checkpoint."""
    m = METHODS[method]
    torch.manual_seed(cfg.seed)
    model = m.build(arch, BernoulliLikelihood(), cfg)
    t0 = time.perf_counter()
    objective = m.objective(model, train, cfg)  # MAPA: its posterior table, on its clock
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    clock = time.perf_counter() - t0
    marks = [budget * (j + 1) / checkpoints for j in range(checkpoints)]
    out: list[dict[str, float]] = []
    epochs = 0
    while marks:
        t = time.perf_counter()
        model.train()
        for index in BATCHINGS[cfg.batching](train, cfg.batch_size):
            loss = -objective(model, train[index], index).surrogate.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs += 1
        clock += time.perf_counter() - t
        if clock < marks[0]:
            continue
        while marks and clock >= marks[0]:
            marks.pop(0)
        t = time.perf_counter()
        trained = copy.deepcopy(model).eval()
        final, _ = m.finalize(trained, train, cfg)  # MAPA: fit the code prior (on its clock)
        fit_seconds = time.perf_counter() - t
        clock += fit_seconds if method == "mapa" else 0.0
        with torch.no_grad():
            ll = float(m.log_likelihood(final, test, cfg.test_grid, eval_samples).mean())
        out.append({"seconds": clock, "epochs": epochs, "test_log_lik": ll, "fit_seconds": fit_seconds})
        clock -= fit_seconds if method == "mapa" else 0.0  # training resumes from the weights
        print(f"  {method}: {clock:7.1f} s, {epochs} epochs, test log-lik {ll:.3f}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits-binary")
    p.add_argument("--n-train", type=int, default=1000, help="training images (sprites)")
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per method")
    p.add_argument("--checkpoints", type=int, default=6)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--latent-dim", type=int, default=4)
    p.add_argument("--mapa-samples", type=int, default=50)
    p.add_argument("--tail", default="per-point")
    p.add_argument("--batching", default="random")
    p.add_argument("--code-prior-steps", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", required=True)
    p.add_argument("--png", default=None, help="default: the --json path with .png")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data, n_train=args.n_train, n_val=10, n_test=args.n_test, seed=0)
    train, test = data.train.float(), data.test.float()
    arch = Architecture(data.dim, args.latent_dim, (256, 256), "relu")
    common = {"data": args.data, "latent_dim": args.latent_dim, "hidden": (256, 256),
              "activation": "relu", "code_prior_steps": args.code_prior_steps,
              "cache_dir": "/tmp/mapa-ttq-cache"}
    iwae_cfg = TrainConfig(method="iwae", samples=50, **common)
    mapa_cfg = TrainConfig(method="mapa", samples=args.mapa_samples, tail=args.tail,
                           batching=args.batching, **common)
    machine = f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"{args.data}: N = {train.shape[0]}, D = {data.dim}, {test.shape[0]} test points, budget "
          f"{args.budget:.0f} s each; {machine}", flush=True)
    curves: dict[str, Any] = {}
    for name, cfg in (("iwae", iwae_cfg), ("mapa", mapa_cfg)):
        curves[name] = curve(name, cfg, train, test, arch, args.budget, args.checkpoints,
                             args.eval_samples)
    target = curves["iwae"][-1]["test_log_lik"]
    iwae_seconds = curves["iwae"][-1]["seconds"]
    reached = next((c["seconds"] for c in curves["mapa"] if c["test_log_lik"] >= target), math.nan)
    ratio = reached / iwae_seconds
    verdict = "holds" if ratio <= 1 / 3 else ("fails" if ratio == ratio else "not reached in the budget")
    print(f"IWAE(50) final test log-lik {target:.3f} at {iwae_seconds:.1f} s; MAPA (S={args.mapa_samples}, "
          f"tail {args.tail}, batching {args.batching}) reaches it at {reached:.1f} s; "
          f"ratio {ratio:.3f} (target <= 1/3: {verdict})")
    result = {"data": args.data, "n_train": train.shape[0], "n_test": test.shape[0],
              "budget": args.budget,
              "machine": machine, "eval_samples": args.eval_samples, "mapa": vars(args),
              "iwae_final_test_log_lik": target, "iwae_seconds": iwae_seconds,
              "mapa_seconds_to_target": reached, "ratio": ratio, "curves": curves}
    Path(args.json).write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = (("iwae", "IWAE (S=50)"), ("mapa", f"MAPA (S={args.mapa_samples}, code prior fitted)"))
    for name, label in labels:
        ax.plot([c["seconds"] for c in curves[name]], [c["test_log_lik"] for c in curves[name]],
                marker="o", label=label)
    ax.axhline(target, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="wall-clock seconds (training + MAPA's posterior and prior fit)",
           ylabel=f"test log-likelihood (IS, {args.eval_samples})",
           title=f"{args.data}, N = {train.shape[0]}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png or str(Path(args.json).with_suffix(".png")), dpi=120)


if __name__ == "__main__":
    main()
