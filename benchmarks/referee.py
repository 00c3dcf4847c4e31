"""The referee against fixed-width importance sampling, and what a final evaluation costs.

For each trained run (``--runs DIR ...``, scored on ``--data``'s test split, atoms from its
training split), with the same ``K = --samples`` draws per point for every estimator:

- the referee (``mapa_vae.evaluation.referee``): its test ``log p(x)``, the standard error of
  the mean over the test points and its Monte Carlo standard error, the proposal it chose, and
  the seconds of a final evaluation as ``train`` runs it (validation + test);
- the old referee, ``importance_log_likelihood``: for a deterministic encoder (MAPA) at every
  fixed width of ``--widths`` (the proposal ``0.9 N(g(x), w²) + 0.1 p(z)``), for an encoder that
  returns a distribution its own ``0.9 q + 0.1 p`` (width does not apply), with their seconds;
- MAPA's exact empiricalized log-likelihood over the training atoms.

Reproduce ``docs/benchmarks/referee-mnist10k.json`` (the first 10 000 training images, the first
500 validation and test images of binarized MNIST, latent 4, 784-200-200 tanh MLPs, Adam 1e-3,
batch 100, seed 0, one restart; MAPA 40 epochs with S = 100, k = 10 and its flow prior; IWAE(50)
and the VAE 10 epochs)::

    python benchmarks/referee.py --runs RUN_MAPA40 RUN_IWAE10 RUN_VAE10 --data mnist10k.npz \\
        --samples 1000 --widths 0.1 0.3 1 3 --json docs/benchmarks/referee-mnist10k.json

``--tiny`` trains a VAE and a MAPA model (latent 2) on 200 digits for one epoch and scores them
with ``K = 50``: seconds, for CI.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from harness import bench_config, knobs_of, parser, start, write_records

from mapa_vae.data.dataset import Dataset
from mapa_vae.data.loading import load_dataset
from mapa_vae.evaluation.likelihood import importance_log_likelihood
from mapa_vae.evaluation.referee import TARGET_STDERR, Referee, estimate_log_likelihood
from mapa_vae.models.latent import LatentVariableModel
from mapa_vae.training.loop import train
from mapa_vae.training.runs import load_run


def _timed(f: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = f(*args, **kw)
    return out, time.perf_counter() - t


def _summary(values: torch.Tensor) -> dict[str, float]:
    n = values.numel()
    return {"log_lik": float(values.mean()),
            "stderr": float(values.std() / math.sqrt(n)) if n > 1 else math.nan}


def score(name: str, model: LatentVariableModel, data: Dataset, samples: int, widths: list[float],
          seed: int) -> dict[str, Any]:
    """One model's record: the referee, the fixed widths, the timings (module docstring)."""
    train_x, val, test = data.train, data.val, data.test
    torch.manual_seed(seed)
    referee = Referee(model, train_x, samples)
    est, test_seconds = _timed(referee, test, progress=False)
    # the final evaluation as train runs it: test and validation in one call (one pilot and one
    # atom table), K from the pilot (≤ samples)
    both, final_seconds = _timed(estimate_log_likelihood, model, torch.cat([test, val]),
                                 samples=samples, train=train_x, progress=False)
    final_test, final_val = both.split(test.shape[0], val.shape[0])
    deterministic = referee.deterministic
    record: dict[str, Any] = {
        "model": name, "n_train": train_x.shape[0], "n_val": val.shape[0], "n_test": test.shape[0],
        "samples": samples,
        "referee": {"log_lik": est.mean, "stderr": est.stderr_of_mean,
                    "mc_stderr": est.mc_stderr_of_mean, "how": est.how, "test_seconds": test_seconds},
        "final_evaluation": {"test_log_lik": final_test.mean, "mc_stderr": final_test.mc_stderr_of_mean,
                             "how": final_test.how, "val_log_lik": final_val.mean,
                             "seconds": final_seconds,
                             "target_stderr": TARGET_STDERR},
        "referee_knobs": {
                          "top": referee.top, "defensive": referee.defensive,
                          "pilot_samples": referee.pilot_samples,
                          "pilot_points": referee.pilot_points, "dtype": "float64",
                          "candidates": len(referee.candidates())},
    }
    if est.empirical is not None:
        record["empirical_log_lik"] = float(est.empirical.mean())
        assert referee.codes is not None
        record["code_std"] = referee.codes.std(0).tolist()
    fixed: dict[str, Any] = {}
    for w in widths if deterministic else [0.1]:
        torch.manual_seed(seed)
        values, seconds = _timed(importance_log_likelihood, model, test, samples=samples, code_scale=w)
        fixed[f"{w:g}" if deterministic else "own q"] = {**_summary(values), "test_seconds": seconds}
    record["fixed"] = fixed
    if fixed:
        record["referee_minus_best_fixed"] = est.mean - max(v["log_lik"] for v in fixed.values())
    return record


def _tiny_runs(root: Path) -> tuple[list[tuple[str, LatentVariableModel]], Dataset]:
    """A VAE and a MAPA model (latent 2, one epoch on 200 digits) trained here."""
    out = []
    data = None
    for method in ("vae", "mapa"):
        cfg = bench_config(method=method, samples=10, batch_size=50, lr=1e-3, seed=0, restarts=1,
                           hidden=(32,), activation="tanh", latent_dim=2, threads=1, dtype="float32",
                           data="digits-binary", n_train=200, n_val=40, n_test=40, epochs=1,
                           code_prior="mixture", prior_components=2, code_prior_steps=20,
                           cache_dir=str(root / "cache"))
        result = train(cfg, progress=False)
        out.append((f"{method} (tiny)", result.model))
        data = result.data
    assert data is not None
    return out, data


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--runs", nargs="*", default=[], help="run directories written by `mapa-vae train`")
    p.add_argument("--data", default=None,
                   help="the data set the runs trained on (its train, validation and test splits); "
                   "none = each run's own config")
    p.add_argument("--samples", type=int, default=1000, help="K: draws per point for every estimator")
    p.add_argument("--widths", type=float, nargs="*", default=[0.1, 0.3, 1.0, 3.0],
                   help="fixed proposal widths for a deterministic encoder (none: timings only)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--repeats", type=int, default=0,
                   help="then time every model's final evaluation (validation + test) this many "
                   "times, the models taking turns, so that a changing load hits them alike")
    p.add_argument("--n-val", type=int, default=None, help="score the first N validation points (none: all)")
    p.add_argument("--n-test", type=int, default=None, help="score the first N test points (none: all)")
    args = p.parse_args()
    info = start(args)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            models, tiny_data = _tiny_runs(Path(tmp))
            samples = min(args.samples, 50)
            items = [(name, m, tiny_data) for name, m in models]
        else:
            samples = args.samples
            items = []
            for run_dir in args.runs:
                run = load_run(run_dir)
                cfg = run.config
                data = (load_dataset(args.data) if args.data else
                        load_dataset(cfg.data, cfg.n_train, cfg.n_val, cfg.n_test, cfg.data_seed))
                items.append((f"{cfg.method} {cfg.epochs} epochs ({run_dir})", run.model, data))
        for name, model, data in items:
            data = Dataset(data.name, data.train, data.val[: args.n_val], data.test[: args.n_test])
            rec = score(name, model, data, samples, args.widths, args.seed)
            ref, fixed = rec["referee"], rec["fixed"]
            line = "  ".join(f"w={k}: {v['log_lik']:.2f}" for k, v in fixed.items())
            fin = rec["final_evaluation"]
            print(f"{name}: referee {ref['log_lik']:.2f} ± {ref['stderr']:.2f} (MC ± {ref['mc_stderr']:.3f}, "
                  f"{ref['test_seconds']:.1f} s); fixed {line}; final evaluation "
                  f"{fin['test_log_lik']:.2f} (MC ± {fin['mc_stderr']:.3f}, {fin['seconds']:.1f} s "
                  "val+test)"
                  + (f"; empiricalized {rec['empirical_log_lik']:.2f}" if "empirical_log_lik" in rec else ""),
                  flush=True)
            records.append(rec)
        timing: dict[str, list[float]] = {name: [] for name, _, _ in items}
        for _ in range(args.repeats):
            for name, model, data in items:
                data = Dataset(data.name, data.train, data.val[: args.n_val], data.test[: args.n_test])
                t = time.perf_counter()
                estimate_log_likelihood(model, torch.cat([data.test, data.val]), samples=samples,
                                        train=data.train, progress=False)  # as train: one call
                timing[name].append(time.perf_counter() - t)
        for name, seconds in timing.items():
            if seconds:
                print(f"{name}: final evaluation {sorted(seconds)[len(seconds) // 2]:.1f} s (median of "
                      f"{len(seconds)}, taking turns)", flush=True)
    knobs: dict[str, Any] = {"samples": samples, "widths": args.widths, "seed": args.seed,
                             "data": args.data, "runs": args.runs, "n_val": args.n_val,
                             "n_test": args.n_test}
    if args.tiny:
        knobs["tiny_training"] = knobs_of(bench_config(
            method="mapa", samples=10, batch_size=50, lr=1e-3, seed=0, restarts=1, hidden=(32,),
            activation="tanh", latent_dim=2, threads=1, dtype="float32"))
    knobs["repeats"] = args.repeats
    write_records(args.json, "referee", info, knobs, records, final_evaluation_seconds_in_turns=timing,
                  note="timings on a shared machine: compare within one run only")


if __name__ == "__main__":
    main()
