"""Time to quality: test log-likelihood of each method's final generative model against seconds.

IWAE(S = 50) and each MAPA variant in ``--variants`` (``random``: the paper's per-point tail on
random batches; ``shared``: the batch-shared tail on local batches; also ``local`` and
``shared-random``) train under the same wall-clock budget (``--budget`` seconds of training
each, same architecture, batch 100, Adam 1e-3; a few warm-up steps off every clock pay torch's
one-time costs). The clock is checked after every step (an epoch of 50 000 points is long) and
includes drawing each epoch's batches. At ``--checkpoints`` evenly spaced points of its clock,
each method's **final generative model** is built from the current weights and scored on the
same held-out test points by the same estimator:

- IWAE: the model as trained (encoder, decoder, N(0, I) prior);
- MAPA: the model as trained *plus its code prior fitted to the codes* (App. C.3: a flow for
  ``L > 1``, ``--code-prior-steps`` Adam steps), the fitting time added to that checkpoint's
  clock (training then resumes from the weights), as is the time to build MAPA's posterior
  table (in a fresh cache directory: never a table from an earlier run);
- the estimator: importance sampling with ``--eval-samples`` draws from each model's own
  encoder-based proposal mixed with its prior (:func:`~mapa_vae.evaluation.log_likelihood`;
  MAPA's deterministic code ``g(x)`` gets a Gaussian of scale 0.1 around it). Scoring is off
  the clock.

Reports IWAE's final test log-likelihood, the first MAPA clock at which MAPA's final model
reaches it, their ratio (the issue's target: at most 1/3), and a PNG of both curves.

    python benchmarks/time_to_quality.py --json ttq.json [--data digits-binary] [--budget 120]
    python benchmarks/time_to_quality.py --json mnist.json --data ../shared/data/binarized_mnist.npz \
        --n-train 10000 --variants random
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mapa_vae.config import TrainConfig
from mapa_vae.data.loading import load_dataset
from mapa_vae.methods.base import Architecture
from mapa_vae.models.likelihoods import BernoulliLikelihood
from mapa_vae.registry import BATCHINGS, METHODS


def curve(label: str, cfg: TrainConfig, train: torch.Tensor, test: torch.Tensor, arch: Architecture,
          budget: float, checkpoints: int, eval_samples: int) -> list[dict[str, float]]:
    """Train ``cfg.method`` for ``budget`` seconds; the final model's test log-lik at each checkpoint."""
    method, n = cfg.method, train.shape[0]
    m = METHODS[method]
    torch.manual_seed(cfg.seed)
    model = m.build(arch, BernoulliLikelihood(), cfg)
    t0 = time.perf_counter()
    objective = m.objective(model, train, cfg)  # MAPA: its posterior table (a fresh cache), on its clock
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    clock = time.perf_counter() - t0
    marks = [budget * (j + 1) / checkpoints for j in range(checkpoints)]
    out: list[dict[str, float]] = []
    steps = 0
    batches: Iterator[torch.Tensor] = iter(())
    model.train()
    while marks:
        t = time.perf_counter()
        index = next(batches, None)
        if index is None:  # a new epoch's partition, drawn on the clock (local: the tree)
            batches = iter(BATCHINGS[cfg.batching](train, cfg.batch_size))
            index = next(batches)
        loss = -objective(model, train[index], index).surrogate.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        clock += time.perf_counter() - t
        steps += 1
        if clock < marks[0]:
            continue
        while marks and clock >= marks[0]:
            marks.pop(0)
        t = time.perf_counter()
        trained = copy.deepcopy(model).eval()
        final, _ = m.finalize(trained, train, cfg)  # MAPA: fit the code prior (on its clock)
        fit_seconds = time.perf_counter() - t if method == "mapa" else 0.0
        with torch.no_grad():
            ll = float(m.log_likelihood(final, test, cfg.test_grid, eval_samples).mean())
        # the score of the model delivered now; training resumes without the fit's time
        out.append({"seconds": clock + fit_seconds, "steps": steps, "epochs": steps * cfg.batch_size / n,
                    "test_log_lik": ll, "fit_seconds": fit_seconds})
        print(f"  {label}: {clock + fit_seconds:7.1f} s (fit {fit_seconds:.1f}), {steps} steps, "
              f"test log-lik {ll:.3f}", flush=True)
    return out


def warm_up(cfg: TrainConfig, train: torch.Tensor, arch: Architecture, steps: int = 5) -> None:
    """A few untimed steps on a throwaway model: torch's one-time costs on no method's clock."""
    m = METHODS[cfg.method]
    model = m.build(arch, BernoulliLikelihood(), cfg)
    objective = m.objective(model, train, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)  # its first step imports torch._dynamo
    for _ in range(steps):
        index = torch.randperm(train.shape[0])[: cfg.batch_size]
        (-objective(model, train[index], index).surrogate.mean()).backward()
        opt.step()


MAPA_VARIANTS = {  # name: (tail, batching), as in benchmarks/passes.py
    "random": ("per-point", "random"),
    "local": ("per-point", "local"),
    "shared": ("shared", "local"),
    "shared-random": ("shared", "random"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits-binary",
                   help="a built-in image set, or a binarized-MNIST .npz (its own split)")
    p.add_argument("--n-train", type=int, default=1000,
                   help="training images (sprites; the first N of an .npz's training split)")
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per method")
    p.add_argument("--checkpoints", type=int, default=6)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--latent-dim", type=int, default=4)
    p.add_argument("--mapa-samples", type=int, default=50)
    p.add_argument("--variants", nargs="+", default=["random", "shared"], choices=list(MAPA_VARIANTS),
                   help="MAPA variants (tail, batching), each with its own budget")
    p.add_argument("--code-prior-steps", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", required=True)
    p.add_argument("--png", default=None, help="default: the --json path with .png")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data, n_train=args.n_train, n_val=10, n_test=args.n_test, seed=0)
    train, test = data.train[: args.n_train].float(), data.test[: args.n_test].float()
    arch = Architecture(data.dim, args.latent_dim, (256, 256), "relu")
    common = {"data": args.data, "latent_dim": args.latent_dim, "hidden": (256, 256),
              "activation": "relu", "code_prior_steps": args.code_prior_steps}
    runs = {"iwae": TrainConfig(method="iwae", samples=50, **common)}
    for v in args.variants:
        tail, batching = MAPA_VARIANTS[v]
        runs[f"mapa-{v}"] = TrainConfig(method="mapa", samples=args.mapa_samples, tail=tail,
                                        batching=batching, **common)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start, "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    name = Path(args.data).stem
    print(f"{name}: N = {train.shape[0]}, D = {data.dim}, {test.shape[0]} test points, budget "
          f"{args.budget:.0f} s each; {machine}", flush=True)
    warm_up(runs["iwae"], train, arch)
    curves = {}
    for label, cfg in runs.items():
        with tempfile.TemporaryDirectory() as cache:  # no posterior table from an earlier run
            curves[label] = curve(label, replace(cfg, cache_dir=cache), train, test, arch, args.budget,
                                  args.checkpoints, args.eval_samples)
    target = curves["iwae"][-1]["test_log_lik"]
    iwae_seconds = curves["iwae"][-1]["seconds"]
    summary: dict[str, Any] = {}
    for label in runs:
        if label == "iwae":
            continue
        reached = next((c["seconds"] for c in curves[label] if c["test_log_lik"] >= target), None)
        ratio = None if reached is None else reached / iwae_seconds  # null in the JSON: never NaN
        verdict = "not reached in the budget" if ratio is None else "holds" if ratio <= 1 / 3 else "fails"
        summary[label] = {"seconds_to_target": reached, "ratio": ratio, "verdict": verdict,
                          "final_test_log_lik": curves[label][-1]["test_log_lik"]}
        at = "never" if ratio is None else f"at {reached:.1f} s, ratio {ratio:.3f}"
        print(f"IWAE(50) final test log-lik {target:.3f} at {iwae_seconds:.1f} s; {label} (S = "
              f"{args.mapa_samples}) final {curves[label][-1]['test_log_lik']:.3f}, reaches IWAE's "
              f"{at} (target <= 1/3: {verdict})")
    result = {"data": name, "n_train": train.shape[0], "n_test": test.shape[0], "budget": args.budget,
              "machine": machine, "load_at_end": os.getloadavg()[0], "args": vars(args),
              "iwae_final_test_log_lik": target, "iwae_seconds": iwae_seconds, "mapa": summary,
              "curves": curves}
    Path(args.json).write_text(json.dumps(result, indent=1, allow_nan=False))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label in runs:
        text = ("IWAE (S=50)" if label == "iwae"
                else f"MAPA {label[5:]} (S={args.mapa_samples}, code prior fitted)")
        ax.plot([c["seconds"] for c in curves[label]], [c["test_log_lik"] for c in curves[label]],
                marker="o", label=text)
    ax.axhline(target, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="wall-clock seconds (training + MAPA's posterior and prior fit)",
           ylabel=f"test log-likelihood (IS, {args.eval_samples})",
           title=f"{name}, N = {train.shape[0]}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png or str(Path(args.json).with_suffix(".png")), dpi=120)


if __name__ == "__main__":
    main()
