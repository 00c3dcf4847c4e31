"""Network passes per point per step, seconds per epoch and bound quality: MAPA vs IWAE at scale.

For one data set and training size ``N`` (batch 100), rows for MAPA at S in {50, 200} (k = 10 %
of S) in four variants, and IWAE at S in {25, 50, 100}:

- ``random``: the paper's MAPA, each point's own tail draws, random batches;
- ``local``: the same bound, batches of nearby points (``--batching local``);
- ``shared``: one tail proposal shared by each local batch (``--tail shared --batching local``);
- ``shared-random``: the shared tail on random batches (to show what locality buys it).

Cost: every row starts from the same weights (the paper's MAPA, S = 50, random batches, warmed up
for ``--warmup-steps`` steps: at barely trained weights every tail estimator is dominated by rare
atoms the kernel misranks) and takes ``--steps`` real Adam steps; passes are counted over those steps and
``seconds_per_epoch`` is the mean step time times the steps of an epoch plus the time to draw an
epoch's batches. Quality: at the warmed-up weights (fixed, no training), every MAPA variant's
bound of every training point is evaluated in ``--draws`` epochs of batches drawn by its own
batching (the same N points for every variant); ``bound_mean`` is the mean over points and draws,
``bound_std`` the root-mean-square over points of the standard deviation over draws, and
``bound_se`` the standard error of ``bound_mean``. IWAE's bound is of another model: null.

    python benchmarks/passes.py --n-train 10000 --json passes-10k.json [--data spiral-dots]
    python benchmarks/passes.py --tiny --json /tmp/passes.json   # seconds: the CI smoke test
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import torch
from harness import bench_config, knobs_of, parser, start, timed_steps, write_records

from mapa_vae.config import TrainConfig
from mapa_vae.data.images import IMAGE_DATASETS
from mapa_vae.data.loading import load_dataset
from mapa_vae.methods.base import Architecture
from mapa_vae.models.latent import LatentVariableModel
from mapa_vae.models.likelihoods import BernoulliLikelihood, GaussianLikelihood, Likelihood
from mapa_vae.registry import BATCHINGS, METHODS

BATCH = 100
LR = 1e-3
MAPA_VARIANTS = {  # name: (tail, batching)
    "random": ("per-point", "random"),
    "local": ("per-point", "local"),
    "shared": ("shared", "local"),
    "shared-random": ("shared", "random"),
}


def setup(data: str, n_train: int) -> tuple[torch.Tensor, Likelihood, Architecture]:
    """The training points, the likelihood and the stated networks: a curve's own noise with
    3×50 tanh MLPs and L = 1, or an image set's Bernoulli with 2×256 ReLU MLPs and L = 4."""
    ds = load_dataset(data, n_train=n_train, n_val=10, n_test=10, seed=0)
    x = ds.train.float()
    if ds.truth is not None:
        return x, GaussianLikelihood(ds.truth.noise_var), Architecture(x.shape[1], 1, (50, 50, 50), "tanh")
    if data in IMAGE_DATASETS:
        return x, BernoulliLikelihood(), Architecture(x.shape[1], 4, (256, 256), "relu")
    raise SystemExit(f"--data {data}: a curve or a built-in image set, please")


def config(arch: Architecture, threads: int, **knobs: Any) -> TrainConfig:
    """Every knob a row measures, stated."""
    return bench_config(batch_size=BATCH, lr=LR, seed=0, restarts=1, hidden=arch.hidden,
                        activation=arch.activation, latent_dim=arch.latent_dim, threads=threads,
                        dtype="float32", posterior="kernel", posterior_engine="auto", top_k=None,
                        **knobs)


def run_steps(cfg: TrainConfig, x: torch.Tensor, lik: Likelihood, arch: Architecture,
              state: dict[str, torch.Tensor] | None, steps: int) -> tuple[LatentVariableModel, Any,
                                                                           dict[str, float]]:
    """``steps`` Adam steps from ``state``; passes per point per step and seconds per epoch."""
    m = METHODS[cfg.method]
    torch.manual_seed(cfg.seed)
    model = m.build(arch, lik, cfg)
    if state is not None:
        model.load_state_dict(state)
    objective = m.objective(model, x, cfg)  # MAPA's posterior: from the cache after the first
    run = timed_steps(model, objective, x, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr,
                      batching=cfg.batching)
    return model, objective, {"decoder_passes": run.passes["decoder"],
                              "encdec_passes": run.passes["encoder+decoder"],
                              "seconds_per_epoch": run.seconds_per_epoch(x.shape[0], cfg.batch_size)}


def bound_at(model: Any, objective: Any, x: torch.Tensor, batching: str, draws: int) -> dict[str, float]:
    """The bound of every training point at fixed weights, over ``draws`` epochs of batches
    (each drawn by ``batching``) and tail draws: the same N points for every variant."""
    gen = torch.Generator().manual_seed(123)
    per_draw = torch.empty(draws, x.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for r in range(draws):
            for index in BATCHINGS[batching](x, BATCH, gen):
                per_draw[r, index] = objective(model, x[index], index).value.double()
    mean_per_draw = per_draw.mean(1)  # (draws,)
    many = draws > 1
    return {"bound_mean": float(mean_per_draw.mean()),
            "bound_se": float(mean_per_draw.std() / math.sqrt(draws)) if many else math.nan,
            "bound_std": float(per_draw.std(0).pow(2).mean().sqrt()) if many else math.nan}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", default="spiral-dots")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--mapa-samples", type=int, nargs="+", default=[50, 200])
    p.add_argument("--iwae-samples", type=int, nargs="+", default=[25, 50, 100])
    p.add_argument("--variants", nargs="+", default=list(MAPA_VARIANTS), choices=list(MAPA_VARIANTS))
    p.add_argument("--steps", type=int, default=30, help="timed steps per row")
    p.add_argument("--warmup-steps", type=int, default=1500,
                   help="MAPA (S=50, random batches) steps before the fixed weights")
    p.add_argument("--draws", type=int, default=3)
    args = p.parse_args()
    if args.tiny:
        args.n_train, args.mapa_samples, args.iwae_samples = 200, [10], [5]
        args.variants, args.steps, args.warmup_steps, args.draws = ["random", "shared"], 3, 5, 2
    info = start(args)
    x, lik, arch = setup(args.data, args.n_train)
    n = x.shape[0]
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        base = config(arch, args.threads, method="mapa", samples=50, cache_dir=cache)
        warm, _, _ = run_steps(base, x, lik, arch, None, args.warmup_steps)
        state = {k: v.clone() for k, v in warm.state_dict().items()}
        print(f"{args.data}: N = {n}, warm-up {args.warmup_steps} MAPA steps (posterior included) "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        for s in args.mapa_samples:
            for variant in args.variants:
                tail, batching = MAPA_VARIANTS[variant]
                cfg = config(arch, args.threads, method="mapa", samples=s, k=max(1, round(0.1 * s)),
                             cache_dir=cache, tail=tail, batching=batching)
                model, objective, cost = run_steps(cfg, x, lik, arch, state, args.steps)
                model.load_state_dict(state)  # the quality at the same fixed weights
                q = bound_at(model, objective, x, batching, args.draws)
                records.append({"method": "mapa", "variant": variant, "n": n, "samples": s,
                                "k": cfg.mapa_k, **cost, **q})
        for s in args.iwae_samples:
            cfg = config(arch, args.threads, method="iwae", samples=s, estimator="naive", cache_dir=cache)
            _, _, cost = run_steps(cfg, x, lik, arch, None, args.steps)
            records.append({"method": "iwae", "variant": "random", "n": n, "samples": s, "k": None,
                            **cost, "bound_mean": None, "bound_se": None, "bound_std": None})
    print(f"\n{args.data}, N = {n}, batch {BATCH}")
    print("| method | variant | S | decoder passes/pt/step | enc+dec | s/epoch | bound (± se) "
          "| std over draws |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        b = "-" if r["bound_mean"] is None else f"{r['bound_mean']:.3f} ± {r['bound_se']:.3f}"
        sd = "-" if r["bound_std"] is None else f"{r['bound_std']:.3f}"
        print(f"| {r['method']} | {r['variant']} | {r['samples']} | {r['decoder_passes']:.2f} | "
              f"{r['encdec_passes']:.2f} | {r['seconds_per_epoch']:.2f} | {b} | {sd} |")
    get = {(r["method"], r["variant"], r["samples"]): r for r in records}
    ref, iwae25 = get.get(("mapa", "random", 200)), get.get(("iwae", "random", 25))
    for variant in args.variants:
        m = get.get(("mapa", variant, 200))
        if m and iwae25 and ref:
            gap = m["bound_mean"] - ref["bound_mean"]
            fewer = "<=" if m["decoder_passes"] <= iwae25["decoder_passes"] else ">"
            print(f"MAPA(S=200, {variant}): decoder passes {m['decoder_passes']:.2f} {fewer} "
                  f"IWAE(S=25) {iwae25['decoder_passes']:.2f}; "
                  f"bound - per-point random = {gap:+.3f} nats")
    knobs = {**knobs_of(base, "posterior", "posterior_engine", "top_k"), "data": args.data,
             "n_train": n, "steps": args.steps, "warmup_steps": args.warmup_steps,
             "draws": args.draws, "k_fraction": 0.1, "samples": None, "method": None}
    write_records(args.json, "passes", info, knobs, records)


if __name__ == "__main__":
    main()
