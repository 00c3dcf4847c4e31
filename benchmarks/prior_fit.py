"""The flow code prior's fit on a trained MAPA model's codes: fitting rules side by side.

MAPA with a latent of more than one dimension ends its training by fitting a flow ``p(z)`` to
its codes ``z_n = g(x_n)`` (:class:`mapa_vae.models.code_priors.FlowPrior`). This script takes
a finished run (``--run``), computes the codes of its training images with the model as trained,
keeps a fixed ``--held-out`` fraction of them apart (split by ``--split-seed``), and fits every
variant of :data:`VARIANTS` to the rest once per ``--seeds`` entry (the seed draws the flow's
initial weights and its minibatches), one after the other in this process. Each variant states
every knob of the fit (structure, step size, batch, average, stop rule; ``--steps`` caps them
all); ``previous`` is the rule before the average (its iterate scored and kept as it is, which
``average=0`` gives exactly), ``current`` is :meth:`FlowPrior.fit`'s default at this commit.

For each fit: the steps it took, its CPU seconds (``time.process_time``, this process's one
thread), and the mean log-density of the held-out training codes and of the codes of the run's
test images with their standard errors; the test codes' difference from ``previous`` with the
same seed, per code (mean and standard error of the paired difference). The run's own
``train_seconds`` and ``prior_seconds`` (wall, from its ``metrics.json``) are copied beside
them. CPU seconds on a shared machine are still inflated by the load: compare within one run.

Reproduce (the run of MAPA's image default on the first 10 000 MNIST training images, 500
validation and 500 test images as the file's own split)::

    nice -n 10 mapa-vae train --data mnist10k.npz --likelihood bernoulli --method mapa \\
        --epochs 20 --latent-dim 4 --hidden 200 200 --activation tanh --seed 0 --restarts 1 \\
        --threads 1 --quiet --out RUN
    nice -n 10 python benchmarks/prior_fit.py --run RUN --seeds 0 1 2 \\
        --json docs/benchmarks/prior-fit-mnist10k.json

``--tiny`` trains a one-epoch MAPA model with a 2-D latent on 200 points of the circle into a
temporary folder and fits each variant once (seed 0) for at most 50 steps: seconds, for CI.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from harness import bench_config, knobs_of, parser, start, write_records

from mapa_vae.data.loading import load_dataset
from mapa_vae.models.code_priors import FlowPrior
from mapa_vae.training.loop import train
from mapa_vae.training.runs import load_run

COMMON: dict[str, Any] = {"hidden": [64, 64], "bins": 8}
"""Knobs every variant shares: hypernetwork widths and spline bins."""

VARIANTS: dict[str, dict[str, Any]] = {
    "previous": {"transforms": 3, "lr": 3e-3, "batch_size": 512, "min_delta": 0.01, "average": 0.0,
                 "every": 25, "patience": 4},
    "average, 3 transforms": {"transforms": 3, "lr": 1e-2, "batch_size": 256, "min_delta": 0.05,
                              "average": 0.98, "every": 25, "patience": 4},
    "average, 4 checks of 25": {"transforms": 2, "lr": 1e-2, "batch_size": 256, "min_delta": 0.05,
                                "average": 0.98, "every": 25, "patience": 4},
    "current": {"transforms": 2, "lr": 1e-2, "batch_size": 256, "min_delta": 0.05, "average": 0.98,
                "every": 20, "patience": 3},
}
"""The fitting rules compared: the flow's structure (``transforms``) and :meth:`FlowPrior.fit`'s
keyword arguments (``every``: steps between held-out checks; ``patience``: checks without a real
gain before the fit stops)."""


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of ``values`` ``(n,)``."""
    return float(values.mean()), float(values.std() / math.sqrt(values.shape[0]))


def _tiny_run(folder: Path) -> Path:
    """A one-epoch MAPA run with a 2-D latent on 200 circle points (a mixture prior, so that the
    run itself fits no flow)."""
    cfg = bench_config(data="circle", n_train=200, n_val=50, n_test=50, method="mapa", samples=10,
                       k=2, batch_size=50, lr=1e-3, seed=0, restarts=1, hidden=(16, 16),
                       activation="tanh", latent_dim=2, threads=1, dtype="float32", epochs=1,
                       code_prior="mixture", prior_components=2, code_prior_steps=5,
                       val_grid=256, test_grid=256)
    train(cfg, folder / "run", progress=False)
    return folder / "run"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--run", type=Path, help="a finished MAPA run with a latent of 2 or more")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one fit of each variant per seed (default: 0 1 2)")
    p.add_argument("--steps", type=int, default=2000, help="most optimizer steps of any fit "
                   "(default: 2000, --code-prior-steps' default)")
    p.add_argument("--held-out", type=float, default=0.1,
                   help="fraction of the training codes kept for the stop rule (default: 0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="draws the held-out codes (default: 0)")
    args = p.parse_args()
    info = start(args)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = _tiny_run(Path(tmp)) if args.tiny else args.run
        if run_dir is None:
            raise SystemExit("prior_fit: give --run RUN (or --tiny)")
        steps, seeds = (50, [0]) if args.tiny else (args.steps, args.seeds)
        run = load_run(run_dir, which="trained")
        metrics_file = Path(run_dir) / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    cfg, sizes = run.config, run.data_sizes or {}
    data = load_dataset(cfg.data, sizes.get("n_train", cfg.n_train), sizes.get("n_val", cfg.n_val),
                        sizes.get("n_test", cfg.n_test), cfg.data_seed)
    model = run.model.eval()
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        codes, test = model.encoder(data.train.to(dtype)), model.encoder(data.test.to(dtype))  # (N, L)
    if codes.shape[1] < 2:
        raise SystemExit(f"prior_fit: {run_dir} has a latent of {codes.shape[1]}; the flow prior "
                         "is fitted for latents of 2 or more")
    order = torch.randperm(codes.shape[0], generator=torch.Generator().manual_seed(args.split_seed))
    n_held = round(args.held_out * codes.shape[0])
    fit_codes, held = codes[order[n_held:]], codes[order[:n_held]]
    print(f"{fit_codes.shape[0]} codes to fit, {held.shape[0]} held out, {test.shape[0]} test codes, "
          f"L = {codes.shape[1]}, {dtype}", flush=True)

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo:
    # a second or more of CPU that training has always paid before its prior fit, so none here
    records: list[dict[str, Any]] = []
    previous_test: dict[int, torch.Tensor] = {}
    for seed in seeds:
        for name, knobs in VARIANTS.items():
            torch.manual_seed(seed)
            prior = FlowPrior(codes.shape[1], transforms=knobs["transforms"], hidden=COMMON["hidden"],
                              bins=COMMON["bins"]).to(codes)
            fit_knobs = {k: v for k, v in {**COMMON, **knobs}.items()
                         if k not in ("transforms", "hidden", "bins")}
            t = time.process_time()
            used = prior.fit(fit_codes, held, steps, **fit_knobs)
            cpu = time.process_time() - t
            with torch.no_grad():
                density = prior.double()()
                log_held, log_test = density.log_prob(held.double()), density.log_prob(test.double())
            previous_test.setdefault(seed, log_test)
            record = {"variant": name, "seed": seed, "steps": used, "cpu_seconds": cpu}
            for what, values in (("held_out", log_held), ("test", log_test),
                                 ("test_minus_previous", log_test - previous_test[seed])):
                record[what], record[what + "_stderr"] = _mean_se(values)
            records.append(record)
            print(f"seed {seed} {name:>22}: {used:5d} steps {cpu:6.2f} CPU s  held-out "
                  f"{record['held_out']:.3f} ± {record['held_out_stderr']:.3f}  test "
                  f"{record['test']:.3f} ± {record['test_stderr']:.3f}  (test - previous "
                  f"{record['test_minus_previous']:+.3f} ± {record['test_minus_previous_stderr']:.3f})",
                  flush=True)

    summary: dict[str, dict[str, float]] = {}
    base_cpu = sum(r["cpu_seconds"] for r in records if r["variant"] == "previous")
    for name in VARIANTS:
        mine = [r for r in records if r["variant"] == name]
        summary[name] = {k: sum(r[k] for r in mine) / len(mine)
                         for k in ("steps", "cpu_seconds", "held_out", "test", "test_minus_previous")}
        summary[name]["cpu_over_previous"] = sum(r["cpu_seconds"] for r in mine) / base_cpu
        s = summary[name]
        print(f"mean over {len(mine)} seeds {name:>22}: {s['steps']:.0f} steps {s['cpu_seconds']:.2f} "
              f"CPU s ({s['cpu_over_previous']:.2f} of previous)  held-out {s['held_out']:.3f}  "
              f"test {s['test']:.3f}", flush=True)
    run_info = {"run": str(run_dir) if not args.tiny else "(a tiny run in a temporary folder)",
                "config": knobs_of(cfg, "data", "epochs"), "n_codes": codes.shape[0],
                "n_held_out": held.shape[0], "n_test": test.shape[0],
                **{k: metrics.get(k) for k in ("train_seconds", "prior_seconds", "prior_fit_steps")}}
    write_records(args.json, "prior-fit: the flow code prior's fitting rules on a MAPA run's codes",
                  info, {"common": COMMON, "variants": VARIANTS, "steps": steps,
                         "held_out": args.held_out, "split_seed": args.split_seed,
                         "seeds": seeds}, records, summary=summary, run=run_info)


if __name__ == "__main__":
    main()
