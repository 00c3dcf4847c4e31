"""VAE-DGP cost and quality: seconds per epoch against IWAE at the same N and S, its growth with
the inducing points M, and test KL to the ground truth after a short training run.

Cost rows: for ``--layers`` 1 and 2 and every M in ``--inducing``, and for IWAE, the same
training step as ``mapa-vae train`` (batch 100, S draws of z per point, one Adam step on the
negative mean bound) is timed over ``--steps`` steps after ``--warmup`` untimed ones, from the
same seed; ``seconds_per_epoch`` is the mean step time times the N / 100 steps of an epoch. The
per-epoch work of the GP layers is O(N S M²) for predictions plus O(M³) per batch, so the log-log
slope of seconds against M (printed as ``growth_exponent``) is between 0 (overheads dominate)
and 2 (the predictions do).

Quality rows (``--train-epochs E`` > 0): ``mapa-vae train --method vae-dgp`` for E epochs on each
of ``--datasets`` with ``--n-train`` points, the test KL by quadrature (``--test-grid``) on 2000
fresh ground-truth points, beside IWAE trained under the same budget.

Both methods share the stated networks (3×50 tanh encoder MLP, L = 1), Adam 1e-3, one restart.

    python benchmarks/vae_dgp.py --json vae-dgp.json [--train-epochs 20]
    python benchmarks/vae_dgp.py --tiny --json /tmp/vae-dgp.json   # seconds: the CI smoke test
"""

from __future__ import annotations

import math
from typing import Any

import torch
from harness import bench_config, knobs_of, parser, start, timed_steps, write_records

from mapa_vae.config import TrainConfig
from mapa_vae.data.groundtruth import GROUND_TRUTHS
from mapa_vae.data.loading import load_dataset
from mapa_vae.methods.base import Architecture
from mapa_vae.models.likelihoods import GaussianLikelihood
from mapa_vae.registry import METHODS
from mapa_vae.training.loop import train

BATCH = 100
NETWORK = {"hidden": (50, 50, 50), "activation": "tanh", "latent_dim": 1}
LR = 1e-3


def config(method: str, samples: int, threads: int, **knobs: Any) -> TrainConfig:
    """Every knob a row measures, stated."""
    return bench_config(method=method, samples=samples, batch_size=BATCH, lr=LR, seed=0, restarts=1,
                        threads=threads, dtype="float32", estimator="naive", **NETWORK, **knobs)


def seconds_per_epoch(cfg: TrainConfig, x: torch.Tensor, noise_var: float, steps: int,
                      warmup: int) -> float:
    """Mean wall time of one training step of ``cfg.method`` times the steps of an epoch."""
    torch.manual_seed(cfg.seed)
    m = METHODS[cfg.method]
    arch = Architecture(x.shape[1], cfg.latent_dim, cfg.hidden, cfg.activation)
    model = m.build(arch, GaussianLikelihood(noise_var), cfg)
    run = timed_steps(model, m.objective(model, x, cfg), x, steps=steps, warmup=warmup,
                      batch_size=cfg.batch_size, lr=cfg.lr)
    return run.seconds_per_step * x.shape[0] / cfg.batch_size


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", default="circle", help="data set of the cost rows")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--samples", type=int, default=10, help="S: draws of z per point (IWAE: its S)")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--inducing", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--train-epochs", type=int, default=0, help="quality rows: epochs (0: none)")
    p.add_argument("--train-inducing", type=int, default=32)
    p.add_argument("--datasets", nargs="+", default=list(GROUND_TRUTHS))
    p.add_argument("--test-grid", type=int, default=2**14)
    args = p.parse_args()
    n_test = 2000
    if args.tiny:
        args.n_train, args.samples, args.layers, args.inducing = 200, 2, [1], [4, 8]
        args.steps, args.warmup, args.train_epochs, args.train_inducing = 2, 1, 1, 4
        args.datasets, args.test_grid, n_test = ["circle"], 2**8, 200
    info = start(args)

    ds = load_dataset(args.data, n_train=args.n_train, n_val=10, n_test=10, seed=0)
    if ds.truth is None:
        raise SystemExit(f"--data {args.data}: the cost rows need a ground-truth curve (its noise variance)")
    x, noise = ds.train.float(), ds.truth.noise_var
    rows: list[dict[str, Any]] = []
    iwae_cfg = config("iwae", args.samples, args.threads)
    iwae = seconds_per_epoch(iwae_cfg, x, noise, args.steps, args.warmup)
    rows.append({"method": "iwae", "layers": None, "inducing": None, "n": args.n_train,
                 "samples": args.samples, "seconds_per_epoch": iwae, "test_kl": None})
    print(f"iwae S={args.samples} N={args.n_train}: {iwae:.3f} s/epoch", flush=True)
    growth: dict[str, float] = {}
    for layers in args.layers:
        secs = []
        for m in args.inducing:
            cfg = config("vae-dgp", args.samples, args.threads, gp_layers=layers, inducing=m,
                         learn_noise=False)
            s = seconds_per_epoch(cfg, x, noise, args.steps, args.warmup)
            secs.append(s)
            rows.append({"method": "vae-dgp", "layers": layers, "inducing": m, "n": args.n_train,
                         "samples": args.samples, "seconds_per_epoch": s, "iwae_seconds_per_epoch": iwae,
                         "test_kl": None})
            print(f"vae-dgp layers={layers} M={m}: {s:.3f} s/epoch ({s / iwae:.1f}x IWAE)", flush=True)
        if len(secs) > 1:
            growth[str(layers)] = slope([float(m) for m in args.inducing], secs)
            print(f"layers={layers}: seconds ∝ M^{growth[str(layers)]:.2f}", flush=True)

    for data in args.datasets if args.train_epochs > 0 else []:
        for method in ("vae-dgp", "iwae"):
            cfg = config(method, args.samples, args.threads, data=data, epochs=args.train_epochs,
                         n_train=args.n_train, n_val=250, n_test=n_test, eval_every=args.train_epochs,
                         val_grid=2**10, test_grid=args.test_grid, inducing=args.train_inducing,
                         gp_layers=1, learn_noise=False)
            r = train(cfg, None, progress=False).metrics
            rows.append({"method": method, "layers": 1 if method == "vae-dgp" else None,
                         "inducing": args.train_inducing if method == "vae-dgp" else None,
                         "n": args.n_train, "samples": args.samples, "data": data,
                         "epochs": args.train_epochs, "seconds_per_epoch": r["seconds_per_epoch"],
                         "test_kl": r["test_kl"], "test_kl_stderr": r["test_kl_stderr"]})
            print(f"{data} {method}: test KL {r['test_kl']:.3f} ± {r['test_kl_stderr']:.3f} "
                  f"({r['seconds_per_epoch']:.2f} s/epoch)", flush=True)

    knobs = {**knobs_of(iwae_cfg, "estimator"), "method": None, "data": args.data, "n_train": args.n_train,
             "steps": args.steps, "warmup": args.warmup, "train_epochs": args.train_epochs,
             "train_inducing": args.train_inducing, "test_grid": args.test_grid, "n_test": n_test}
    write_records(args.json, "vae_dgp", info, knobs, rows, growth_exponent_by_layers=growth)


if __name__ == "__main__":
    main()
