"""Time to quality on binary images: test log-likelihood of the model each method delivers, against seconds.

IWAE(5), IWAE(50), the VAE and MAPA's default for images train the same networks (784-200-200
tanh MLPs both ways by default, latent 4) on the same data under the same wall-clock budget
(``--budget`` seconds each, one method at a time, ``--threads`` torch threads). Every knob is
an argument and is written to the JSON; nothing is inherited from a ``TrainConfig`` default
except through :data:`~mapa_vae.methods.mapa.IMAGE_DEFAULTS`, MAPA's settings for images, which
are what ``mapa-vae train --likelihood bernoulli --method mapa`` uses and are recorded as used.

The clock covers everything a user waits for before the model exists: MAPA's posterior table
(built afresh, never read from a cache), every step and every epoch's batch draw, and at each
checkpoint MAPA's code-prior fit (App. C.3). A few warm-up steps on a throwaway model pay torch's
one-time costs off every clock. Checkpoints fall every ``--interval`` seconds of the clock and,
for the equal-epochs table, at the end of each epoch in ``--epoch-marks``. At a checkpoint the
model the user would get now (MAPA: with its code prior fitted to the current codes) is scored
off the clock on the same ``--n-test`` test images by the referee, :func:`referee`.

Reports, per method, the curve; the best baseline (highest final score) and MAPA's verdicts: at
or above the best baseline at every checkpoint (checkpoint ``j`` against checkpoint ``j``), and
the first MAPA clock at which it reaches the best baseline's final score, as a ratio of that
baseline's clock (the target: at most 1/3); plus the equal-epochs table and a PNG.

    python benchmarks/time_to_quality.py --tiny --json /tmp/ttq-tiny.json   # seconds, for CI
    nice -n 10 python benchmarks/time_to_quality.py --data ../shared/data/binarized_mnist.npz \\
        --n-train 50000 --budget 900 --interval 180 --json docs/benchmarks/ttq-mnist50k.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from harness import bench_config, parser, start, write_records

from mapa_vae.config import TrainConfig
from mapa_vae.data.loading import load_dataset
from mapa_vae.evaluation.likelihood import importance_log_likelihood
from mapa_vae.methods.base import Architecture
from mapa_vae.methods.mapa import IMAGE_DEFAULTS
from mapa_vae.models.latent import CodeEncoder, LatentVariableModel
from mapa_vae.models.likelihoods import BernoulliLikelihood
from mapa_vae.registry import BATCHINGS, METHODS, POSTERIORS

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
"""``cpu``: this process's CPU seconds, all its threads together: with ``--threads 1`` what the
run would take on an idle core, and robust to other jobs on a shared machine (wall-clock there is
inflated by however many other processes want the cores); ``wall``: elapsed seconds."""
now = CLOCKS["cpu"]

WIDTHS = (0.1, 0.3, 1.0, 3.0)
"""Proposal widths ``N(g(x), w²)`` tried for a deterministic encoder; the best one is kept."""


@dataclass(frozen=True)
class Score:
    """A referee's mean test log-likelihood, its standard error over test images, how it was
    computed, and for a deterministic encoder the exact empiricalized log-likelihood (Eq. 6)."""

    log_lik: float
    stderr: float
    how: str
    empirical: float | None = None


def referee(model: LatentVariableModel, test: torch.Tensor, samples: int, pick: int,
            seed: int = 0, train: torch.Tensor | None = None) -> Score:
    """Mean ``log p(x)`` over ``test`` with ``samples`` importance draws per image: the package's
    fair referee (:func:`mapa_vae.evaluation.referee.referee_log_likelihood`, a proposal adapted
    to the model; ``train``: a deterministic encoder's atoms), or where this checkout has none
    yet, :func:`best_width_log_likelihood`."""
    try:
        from mapa_vae.evaluation.referee import referee_log_likelihood
    except ImportError:
        return best_width_log_likelihood(model, test, samples, pick, seed)
    torch.manual_seed(seed)
    est = referee_log_likelihood(model, test, train, samples, progress=False)
    empirical = None if est.empirical is None else float(est.empirical.mean())
    return Score(est.mean, est.stderr_of_mean, est.how, empirical)


def best_width_log_likelihood(model: LatentVariableModel, test: torch.Tensor, samples: int,
                              pick: int, seed: int = 0) -> Score:
    """Importance sampling from the model's encoder mixed with its prior; a deterministic encoder
    (MAPA) has no proposal width of its own, so each of :data:`WIDTHS` is tried on the first
    ``pick`` test images and the best is used on all of them. Every width gives a lower bound in
    expectation, so the highest is the least under-reported (width 0.1 under-reports MAPA on
    MNIST by 4-12 nats)."""
    widths: Sequence[float] = (WIDTHS[0],)
    if isinstance(model.encoder, CodeEncoder):
        trial = {}
        for w in WIDTHS:
            torch.manual_seed(seed)
            trial[w] = float(importance_log_likelihood(model, test[:pick], samples, code_scale=w).mean())
        widths = (max(trial, key=lambda w: trial[w]),)
    torch.manual_seed(seed)
    lp = importance_log_likelihood(model, test, samples, code_scale=widths[0])
    stderr = float(lp.std() / math.sqrt(lp.numel())) if lp.numel() > 1 else 0.0
    how = (f"IS, K={samples}, proposal N(g(x), {widths[0]:g}^2) (best of {WIDTHS} on {pick} images)"
           if isinstance(model.encoder, CodeEncoder) else f"IS, K={samples}, the encoder's q(z|x)")
    return Score(float(lp.mean()), stderr, how)


def curve(label: str, cfg: TrainConfig, train: torch.Tensor, test: torch.Tensor, arch: Architecture,
          budget: float, interval: float, epoch_marks: Sequence[int], samples: int,
          pick: int, stop_epochs: int | None = None,
          score: Callable[[LatentVariableModel], Score] | None = None) -> tuple[list[dict[str, Any]], float]:
    """Train ``cfg.method`` for ``budget`` seconds of its clock; score the delivered model at
    every ``interval`` seconds and after each epoch in ``epoch_marks``. Also returns the seconds
    spent building the objective (MAPA's posterior table), which are on the clock.
    ``stop_epochs``: stop after that many epochs instead (then ``budget`` is not used);
    ``score``: score the model as trained by this instead (no prior fit, no referee)."""
    m, n = METHODS[cfg.method], train.shape[0]
    torch.manual_seed(cfg.seed)
    model = m.build(arch, BernoulliLikelihood(), cfg)
    t0 = now()
    objective = m.objective(model, train, cfg)  # MAPA: its posterior table (a fresh cache)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    setup = clock = now() - t0
    marks = ([] if stop_epochs else
             [interval * (j + 1) for j in range(max(1, math.floor(budget / interval + 1e-9)))])
    epochs_left = sorted({*epoch_marks, *([stop_epochs] if stop_epochs else [])})
    out: list[dict[str, Any]] = []
    steps, epoch = 0, 0
    batches = iter(BATCHINGS[cfg.batching](train, cfg.batch_size))
    model.train()
    while marks or (stop_epochs and epoch < stop_epochs):
        t = now()
        index = next(batches, None)
        if index is None:  # a new epoch's order, drawn on the clock
            batches = iter(BATCHINGS[cfg.batching](train, cfg.batch_size))
            index = next(batches)
        loss = -objective(model, train[index], index).surrogate.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        clock += now() - t
        steps += 1
        ended = steps * cfg.batch_size // n > epoch  # an epoch's last step (random batches: n/B)
        epoch = max(epoch, steps * cfg.batch_size // n)
        at_epoch = bool(ended and epochs_left and epoch >= epochs_left[0])
        at_time = bool(marks) and clock >= marks[0]
        if not (at_epoch or at_time):
            continue
        kind = "time" if at_time else "epoch"
        while marks and clock >= marks[0]:
            marks.pop(0)
        while at_epoch and epochs_left and epoch >= epochs_left[0]:
            epochs_left.pop(0)
        t = now()
        final = model.eval()
        if score is None:
            final, _ = m.finalize(copy.deepcopy(model).eval(), train, cfg)  # MAPA: the code prior
        fit = now() - t if cfg.method == "mapa" else 0.0
        t = now()
        with torch.no_grad():
            got = score(final) if score else referee(final, test, samples, pick, cfg.seed, train)
        scoring = now() - t
        # the model delivered now includes its prior fit; training resumes from the weights
        out.append({"kind": kind, "seconds": clock + fit, "train_seconds": clock, "fit_seconds": fit,
                    "steps": steps, "epochs": steps * cfg.batch_size / n,
                    "test_log_lik": got.log_lik, "stderr": got.stderr, "referee": got.how,
                    "test_empirical_log_lik": got.empirical,
                    "scoring_seconds": scoring})
        print(f"  {label:>7} [{kind:>5}] {clock + fit:7.1f} s (prior fit {fit:4.1f}), epoch "
              f"{steps * cfg.batch_size / n:5.2f}: test log-lik {got.log_lik:8.2f} ± "
              f"{got.stderr:.2f} ({got.how}; scoring {scoring:.0f} s off the clock)", flush=True)
        model.train()
    return out, setup


def warm_up(cfg: TrainConfig, train: torch.Tensor, arch: Architecture, steps: int = 3) -> None:
    """A few untimed steps on a throwaway model: torch's one-time costs on no method's clock."""
    m = METHODS[cfg.method]
    model = m.build(arch, BernoulliLikelihood(), cfg)
    with tempfile.TemporaryDirectory() as cache:
        objective = m.objective(model, train[:500], replace(cfg, cache_dir=cache))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for _ in range(steps):
        index = torch.randperm(min(500, train.shape[0]))[: cfg.batch_size]
        (-objective(model, train[index], index).surrogate.mean()).backward()
        opt.step()


def method_configs(args: argparse.Namespace) -> dict[str, TrainConfig]:
    """Each compared method's full config; the shared knobs are the same for all four."""
    common: dict[str, Any] = {"data": args.data, "latent_dim": args.latent_dim,
                              "hidden": tuple(args.hidden), "activation": args.activation,
                              "seed": args.seed, "threads": args.threads, "restarts": 1,
                              "dtype": "float32", "likelihood": "bernoulli"}
    base = {"batch_size": args.batch_size, "lr": args.lr, **common}
    mapa = {"samples": args.mapa_samples, "k": args.mapa_k, "batch_size": args.mapa_batch_size,
            "lr": args.mapa_lr, "code_prior": args.code_prior,
            "code_prior_steps": args.code_prior_steps, "rho": args.rho,
            "posterior": args.mapa_posterior, **common}
    runs = {"iwae5": bench_config(method="iwae", samples=5, **base),
            "iwae50": bench_config(method="iwae", samples=50, **base),
            "vae": bench_config(method="vae", samples=1, **base),
            "mapa": bench_config(method="mapa", **mapa)}
    return {label: runs[label] for label in args.methods}


def verdicts(curves: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """MAPA against the best baseline (the highest final score among the others)."""
    timed = {k: [c for c in v if c["kind"] == "time"] for k, v in curves.items()}
    baselines = {k: v for k, v in timed.items() if k != "mapa" and v}
    if "mapa" not in timed or not timed["mapa"] or not baselines:
        return {}
    best = max(baselines, key=lambda k: baselines[k][-1]["test_log_lik"])
    target, target_seconds = baselines[best][-1]["test_log_lik"], baselines[best][-1]["seconds"]
    mapa = timed["mapa"]
    reached = next((c["seconds"] for c in mapa if c["test_log_lik"] >= target), None)
    ratio = None if reached is None else reached / target_seconds  # null in the JSON, never NaN
    pairs = list(zip(mapa, baselines[best], strict=False))
    return {"best_baseline": best, "best_baseline_final": target,
            "best_baseline_seconds": target_seconds, "mapa_final": mapa[-1]["test_log_lik"],
            "mapa_seconds_to_target": reached, "ratio": ratio,
            "ratio_holds": ratio is not None and ratio <= 1 / 3,
            "checkpoints_compared": len(pairs),
            "mapa_at_or_above_at_every_checkpoint": all(
                a["test_log_lik"] >= max(b[j]["test_log_lik"] for b in baselines.values()
                                         if len(b) > j)
                for j, (a, _) in enumerate(pairs))}


def equal_epochs(curves: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (method, epoch mark) reached: seconds and score at that many epochs."""
    return [{"method": label, "epochs": round(c["epochs"], 2), "seconds": c["seconds"],
             "test_log_lik": c["test_log_lik"], "stderr": c["stderr"]}
            for label, cs in curves.items() for c in cs if c["kind"] == "epoch"]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--data", default="../shared/data/binarized_mnist.npz",
                   help="a binarized-MNIST .npz (its own split, the first --n-train training "
                        "images) or a built-in binary image set (sprites-binary, digits-binary)")
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=1000, help="test images scored at each checkpoint")
    p.add_argument("--budget", type=float, default=900.0, help="seconds of clock per method")
    p.add_argument("--interval", type=float, default=180.0, help="seconds between checkpoints")
    p.add_argument("--epoch-marks", type=int, nargs="*", default=[1, 2],
                   help="also score after these epochs (the equal-epochs table)")
    p.add_argument("--eval-samples", type=int, default=1000, help="K: IS draws per test image")
    p.add_argument("--width-pick", type=int, default=100,
                   help="test images on which a deterministic encoder's proposal width is picked")
    p.add_argument("--methods", nargs="+", default=["iwae5", "iwae50", "vae", "mapa"],
                   choices=["iwae5", "iwae50", "vae", "mapa"])
    p.add_argument("--latent-dim", type=int, default=4)
    p.add_argument("--hidden", type=int, nargs="+", default=[200, 200])
    p.add_argument("--activation", default="tanh")
    p.add_argument("--batch-size", type=int, default=100, help="IWAE's and the VAE's batch")
    p.add_argument("--lr", type=float, default=1e-3, help="IWAE's and the VAE's Adam rate")
    p.add_argument("--mapa-samples", type=int, default=IMAGE_DEFAULTS["samples"], help="MAPA's S")
    p.add_argument("--mapa-k", type=int, default=IMAGE_DEFAULTS["k"], help="MAPA's k")
    p.add_argument("--mapa-batch-size", type=int, default=IMAGE_DEFAULTS["batch_size"])
    p.add_argument("--mapa-lr", type=float, default=IMAGE_DEFAULTS["lr"])
    p.add_argument("--mapa-posterior", choices=list(POSTERIORS),
                   default=IMAGE_DEFAULTS.get("posterior", "kernel"), help="MAPA's q(i | n)")
    p.add_argument("--rho", type=float, default=0.9, help="MAPA's Bernoulli kernel softening")
    p.add_argument("--code-prior", default="flow", help="MAPA's code prior")
    p.add_argument("--code-prior-steps", type=int, default=2000, help="its fit's step limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=list(CLOCKS), default="cpu",
                   help="cpu: the process's CPU seconds (on one thread, an idle core's wall-clock); "
                        "wall: elapsed seconds (only on an otherwise idle machine)")
    p.add_argument("--png", default=None, help="default: the --json path with .png (none: no --json)")
    p.add_argument("--merge", nargs="+", metavar="JSON[:METHODS]", default=None,
                   help="train nothing: join earlier runs' JSON files (one method or more each, "
                        "the same data, test images, budget, checkpoints, referee draws and clock) "
                        "into one report, its verdicts and its PNG; PATH:vae,mapa takes only "
                        "those methods from PATH")
    args = p.parse_args(argv)
    if args.tiny:
        args.data, args.n_train, args.n_test, args.budget, args.interval = "digits-binary", 300, 40, 2.0, 1.0
        args.epoch_marks, args.eval_samples, args.width_pick, args.hidden = [1], 50, 20, [32]
        args.code_prior_steps = 20
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.merge:
        return merge(args)
    info = start(args)
    global now
    now = CLOCKS[args.clock]
    if args.data.lower().endswith(".npz"):  # its own split: the first --n-train / --n-test images
        data = load_dataset(args.data)
    else:
        data = load_dataset(args.data, n_train=args.n_train, n_val=10, n_test=args.n_test, seed=0)
    train, test = data.train[: args.n_train].float(), data.test[: args.n_test].float()
    arch = Architecture(data.dim, args.latent_dim, tuple(args.hidden), args.activation)
    runs = method_configs(args)
    name = Path(args.data).stem
    print(f"{name}: N = {train.shape[0]}, D = {data.dim}, {test.shape[0]} test images, {args.budget:.0f} s "
          f"per method, checkpoints every {args.interval:.0f} s and after epochs {args.epoch_marks}; "
          f"K = {args.eval_samples}", flush=True)
    for cfg in runs.values():
        warm_up(cfg, train, arch)
    curves, setup = {}, {}
    for label, cfg in runs.items():
        with tempfile.TemporaryDirectory() as cache:  # no posterior table from an earlier run
            curves[label], setup[label] = curve(label, replace(cfg, cache_dir=cache), train, test, arch,
                                                args.budget, args.interval, args.epoch_marks,
                                                args.eval_samples, args.width_pick)
    knobs = {label: {k: v for k, v in cfg.to_dict().items() if k not in ("extra", "cache_dir")}
             for label, cfg in runs.items()}
    result = {"data": name, "n_train": train.shape[0], "n_test": test.shape[0], "dim": data.dim,
              "args": vars(args), "setup_seconds": setup, "command": " ".join(sys.argv)}
    return report(args, info, knobs, curves, result)


def report(args: argparse.Namespace, info: dict[str, Any], knobs: dict[str, Any],
           curves: dict[str, list[dict[str, Any]]], result: dict[str, Any]) -> dict[str, Any]:
    """Print the verdicts and the equal-epochs table; write the JSON and the PNG."""
    summary = verdicts(curves)
    if summary:
        r, at = summary["ratio"], summary["mapa_seconds_to_target"]
        when = "never" if r is None else f"at {at:.0f} s (ratio {r:.2f})"
        print(f"best baseline {summary['best_baseline']}: {summary['best_baseline_final']:.2f} at "
              f"{summary['best_baseline_seconds']:.0f} s; MAPA final {summary['mapa_final']:.2f}, reaches "
              f"it {when}; at or above it at every checkpoint: "
              f"{summary['mapa_at_or_above_at_every_checkpoint']}")
    table = equal_epochs(curves)
    for row in table:
        print(f"  equal epochs: {row['method']:>7} {row['epochs']:5.2f} epochs, {row['seconds']:7.1f} s, "
              f"{row['test_log_lik']:8.2f} ± {row['stderr']:.2f}")
    records = [{"method": label, **c} for label, cs in curves.items() for c in cs]
    result = {**result, "summary": summary, "equal_epochs": table}
    write_records(args.json, "time_to_quality", info, knobs, records, **result)
    if args.json or args.png:
        mapa = knobs.get("mapa", {})
        plot(curves, summary, args, result["data"], result["n_train"],
             f"MAPA (S={mapa.get('samples')}, k={mapa.get('k')}, Adam {mapa.get('lr')}, "
             "code prior on its clock)")
    return {**result, "curves": curves}


METHOD_ORDER = ("iwae5", "iwae50", "vae", "mapa")

MUST_AGREE = ("data", "n_train", "n_test", "budget", "interval", "eval_samples", "width_pick",
              "clock", "seed", "latent_dim", "hidden", "activation", "threads")
"""What runs joined by ``--merge`` must share to be one comparison."""


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """Join the runs in ``args.merge`` (each one or more methods, timed in its own process) into
    one report. Refuses runs that measured different things (:data:`MUST_AGREE`) or the same
    method twice, in one line naming the file."""
    runs = []
    for spec in args.merge:
        path, _, wanted = spec.rpartition(":") if ":" in spec else (spec, "", "")
        take = set(wanted.split(",")) if wanted else None
        if take and not take <= set(METHOD_ORDER):
            raise SystemExit(f"--merge: {spec}: methods after ':' must be among {', '.join(METHOD_ORDER)}")
        try:
            run = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--merge: cannot read {path}: {e}") from None
        if not isinstance(run, dict) or run.get("benchmark") != "time_to_quality":
            raise SystemExit(f"--merge: {path} is not a time_to_quality JSON")
        if take is not None:
            if missing := take - {rec["method"] for rec in run["records"]}:
                raise SystemExit(f"--merge: {path} has no {sorted(missing)[0]} records")
            run = {**run, "records": [rec for rec in run["records"] if rec["method"] in take]}
        runs.append((path, run))
    first_path, first = runs[0]
    curves: dict[str, list[dict[str, Any]]] = {}
    knobs: dict[str, Any] = {}
    setup: dict[str, float] = {}
    for path, run in runs:
        for key in MUST_AGREE:
            if run["args"].get(key) != first["args"].get(key):
                raise SystemExit(f"--merge: {path} has {key} = {run['args'].get(key)!r}, "
                                 f"{first_path} {first['args'].get(key)!r}")
        labels = {rec["method"] for rec in run["records"]}
        if labels & set(curves):
            raise SystemExit(f"--merge: method {sorted(labels & set(curves))[0]} is in more than one "
                             f"file ({path})")
        for rec in run["records"]:
            curves.setdefault(rec["method"], []).append({k: v for k, v in rec.items() if k != "method"})
        for label in labels:
            knobs[label] = run["knobs"][label]
            setup[label] = run["setup_seconds"][label]
    curves = {label: curves[label] for label in sorted(curves, key=METHOD_ORDER.index)}
    parts = [{"path": path, "command": run.get("command"), "machine": run["machine"],
              "methods": sorted({rec["method"] for rec in run["records"]})} for path, run in runs]
    result = {key: first[key] for key in ("data", "n_train", "n_test", "dim")}
    result |= {"args": first["args"], "setup_seconds": setup, "merged_from": parts,
               "command": " ".join(sys.argv)}
    info = {**first["machine"], "merged": True}
    view = argparse.Namespace(**{**first["args"], "json": args.json, "png": args.png, "merge": args.merge})
    return report(view, info, knobs, curves, result)


def plot(curves: dict[str, list[dict[str, Any]]], summary: dict[str, Any], args: argparse.Namespace,
         name: str, n: int, mapa_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = {"iwae5": "IWAE (S=5)", "iwae50": "IWAE (S=50)", "vae": "VAE",
            "mapa": mapa_label}
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, cs in curves.items():
        timed = sorted(cs, key=lambda c: c["seconds"])  # the timed and the equal-epochs checkpoints
        ax.errorbar([c["seconds"] for c in timed], [c["test_log_lik"] for c in timed],
                    yerr=[c["stderr"] for c in timed], marker="o", capsize=2, label=text[label])
    if summary:
        ax.axhline(summary["best_baseline_final"], color="grey", lw=0.8, ls="--")
    ax.set(xlabel=f"{args.clock} seconds (training + MAPA's table and prior fit)",
           ylabel=f"test log-likelihood (IS, K={args.eval_samples})",
           title=f"{name}, N = {n}, {args.n_test} test images, {args.threads} thread")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png or str(Path(args.json).with_suffix(".png")), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
