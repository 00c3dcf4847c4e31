"""The main job: methods side by side on one data set (by default MAPA, VAE and IWAE).

:func:`compare` trains each method with one :class:`~mapa_vae.config.TrainConfig` (data, seed,
epochs, ``S``, restarts and every other field; MAPA's ``k`` is 10 % of ``S`` unless given), prints
a table of test KL to the ground truth, wall-clock and network passes, and writes
``comparison.json``, ``comparison.md`` and ``samples.png`` (the data beside each model's samples).

The methods train side by side, one process each, on the cores the process may use (at most
one job per method, those drawing ``S`` samples first, as they take longest; each job gets
``cores // jobs`` torch threads): the protocol (epochs, restarts, every knob) is the same as one
after another, only the wall-clock differs. Each method trains into ``out/<method>`` exactly as
``train`` would, so its run folder is a normal run.

A folder holding results is never replaced silently: like ``train``, :func:`compare` refuses it
unless ``overwrite`` (train every method again, replace the comparison) or ``resume`` (reuse each
finished run with the same configuration, continue an interrupted one, train the missing ones).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..data.loading import data_shape, load_dataset
from ..data.memory import check_train_memory
from ..errors import MapaError
from ..methods.base import Architecture
from ..registry import METHODS
from ..seeds import torch_seed
from ..storage import atomic_write, read_json, write_json
from ..training.checkpoint import RESUMABLE, config_json
from ..training.loop import train
from ..training.runs import load_run
from .samples_plot import plot_samples

__all__ = ["METHOD_ORDER", "compare", "format_table"]


METHOD_ORDER = ("mapa", "vae", "iwae")
RESULTS = ("comparison.json", "comparison.md", "samples.png")  # what a comparison writes in ``out``


def compare(config: TrainConfig | str | Path | None = None, out: str | Path = "runs/compare",
            methods: Sequence[str] = METHOD_ORDER, *, progress: bool = True, resume: bool = False,
            overwrite: bool = False, jobs: int | None = None,
            **overrides: Any) -> dict[str, dict[str, Any]]:
    """Train each of ``methods`` (registry names) with ``config`` (its ``method`` is replaced);
    return their metrics by method.

    ``config`` may also be a data set name or file, short for ``TrainConfig(data=config,
    **overrides)``; ``overrides`` replace fields of a given config. ``jobs``: processes side by
    side (default: as many as methods and cores allow; 1 trains in this process). See the module
    docstring for ``resume`` and ``overwrite``.
    """
    if resume and overwrite:
        raise MapaError("--resume and --overwrite contradict each other: --resume reuses the runs "
                        "in --out, --overwrite replaces them; give one")
    if not methods:
        raise MapaError("--methods: give at least one method")
    if len(set(methods)) != len(methods):
        raise MapaError(f"--methods: each method once, got {' '.join(methods)}")
    if isinstance(config, TrainConfig):
        base = dataclasses.replace(config, **overrides) if overrides else config
    else:
        given: dict[str, Any] = {} if config is None else {"data": str(config)}
        base = TrainConfig(**given, **overrides)
    out = Path(out)
    configs = [dataclasses.replace(base, method=m) for m in methods]  # every config checked first
    _check_folder(out, methods, resume, overwrite)
    size = data_shape(base.data, base.n_train)
    for cfg in configs:
        if size is not None:
            check_train_memory(cfg, *size)
    data = load_dataset(base.data, base.n_train, base.n_val, base.n_test, base.data_seed)  # file, size
    todo = [cfg for cfg in configs if not (resume and _finished(out / cfg.method, cfg))]
    n_jobs = _jobs(jobs, len(todo), base.device) if all(map(_in_package, todo)) else 1
    if todo and n_jobs > 1:
        import joblib

        threads = base.threads if base.threads != 1 else max(1, _cores() // n_jobs)
        if progress:
            print(f"compare: training {', '.join(c.method for c in todo)} side by side in {n_jobs} "
                  f"processes, {threads} thread(s) each", flush=True)
        longest_first = sorted(todo, key=lambda c: not METHODS[c.method].uses_samples)  # S draws
        runs = joblib.Parallel(n_jobs=n_jobs, backend="loky", return_as="generator_unordered")(
            joblib.delayed(_train_one)(dataclasses.replace(cfg, threads=threads), out, resume,
                                       overwrite) for cfg in longest_first)
        for method, test_kl in runs:
            if progress:
                print(f"{method}: test KL {test_kl:.4f}", flush=True)
    else:
        for cfg in todo:
            method, test_kl = _train_one(cfg, out, resume, overwrite, progress)
            if progress:
                print(f"{method}: test KL {test_kl:.4f}", flush=True)
    metrics = {m: read_json(out / m / "metrics.json") for m in methods}
    models = {m: load_run(out / m).model for m in methods}
    table = format_table(metrics)
    print(table)
    print(f"runs in {out}/<method>/; table, metrics and samples.png in {out}/")
    write_json(out / "comparison.json", metrics)
    with atomic_write(out / "comparison.md") as f:
        f.write((f"# {base.data}: {' vs '.join(methods)} (S = {base.samples}, {base.epochs} epochs, "
                 f"R = {base.restarts})\n\n" + table + "\n").encode())
    shape = Architecture.from_config(configs[0], data.dim).image_shape  # images: grids
    plot_samples(data.test, models, out / "samples.png", title=f"{base.data}: test data vs samples",
                 metrics=metrics, seed=torch_seed(base.seed), image_shape=shape)
    return metrics


def _train_one(cfg: TrainConfig, out: Path, resume: bool, overwrite: bool,
               progress: bool = False) -> tuple[str, float]:
    """Train (or, with ``resume``, continue) one method into ``out/<method>``; its test KL."""
    run = out / cfg.method
    go_on = resume and (run / "checkpoint.pt").exists()
    result = train(cfg, run, progress=progress, resume=go_on,
                   overwrite=overwrite or (resume and not go_on))
    return cfg.method, float(result.metrics.get("test_kl", float("nan")))


def _finished(run: Path, cfg: TrainConfig) -> bool:
    """``run`` holds a finished run of ``cfg`` (up to where it runs); another config is refused."""
    if not (run / "metrics.json").is_file() or not (run / "config.json").is_file():
        return False
    saved = load_run(run).config
    if config_json(saved, RESUMABLE) != config_json(cfg, RESUMABLE) or saved.epochs != cfg.epochs:
        before, now = json.loads(config_json(saved, RESUMABLE)), json.loads(config_json(cfg, RESUMABLE))
        diffs = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        diffs += ["epochs"] if saved.epochs != cfg.epochs else []
        raise MapaError(f"--resume: {run} was trained with another configuration ({', '.join(diffs)} "
                        "differ); --overwrite replaces it, or choose another --out")
    return True


def _check_folder(out: Path, methods: Sequence[str], resume: bool, overwrite: bool) -> None:
    """Refuse ``out`` when it holds results and neither ``resume`` nor ``overwrite`` is given;
    with ``resume``, refuse a comparison of methods this one would drop."""
    if out.exists() and not out.is_dir():
        raise MapaError(f"--out {out}: is an existing file; give a directory")
    held = [name for name in RESULTS if (out / name).exists()]
    held += [f"{d.name}/" for d in sorted(out.glob("*")) if d.is_dir()
             and ((d / "config.json").exists() or (d / "checkpoint.pt").exists())]
    if not held or overwrite:
        return
    if not resume:
        raise MapaError(f"--out {out} holds results ({', '.join(held)}); --overwrite replaces them, "
                        "--resume reuses its finished runs, or choose another --out")
    if (out / "comparison.json").exists():
        before = read_json(out / "comparison.json")
        dropped = [m for m in before if m not in methods] if isinstance(before, dict) else []
        if dropped:
            raise MapaError(f"--resume: {out} holds a comparison that also has {', '.join(dropped)}; "
                            "a comparison of fewer methods would replace it: add them to --methods, "
                            "or --overwrite, or choose another --out")


def _in_package(cfg: TrainConfig) -> bool:
    """Whether ``cfg``'s method is one of this package's, so that a fresh worker process knows
    it; a method registered by the caller's own code trains in this process."""
    return type(METHODS[cfg.method]).__module__.startswith("mapa_vae.")


def _cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _jobs(jobs: int | None, todo: int, device: str) -> int:
    """Processes side by side: ``jobs`` (joblib's -1: all cores, -2: all but one, …), else as
    many as cores and methods allow; one where the methods share a GPU."""
    if todo == 0:
        return 1
    if jobs is None:
        jobs = 1 if device != "cpu" else -1
    if jobs == 0:
        raise MapaError("--jobs must be a positive number of processes, or -1 for all cores")
    n = jobs if jobs > 0 else max(1, _cores() + 1 + jobs)
    return max(1, min(n, todo))


def format_table(metrics: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: test KL (± s.e.), test log-lik, train time, passes per point per step."""
    rows = [
        "| method | S | k | test KL (nats, lower is better) | test log-lik | train s | s/epoch "
        "| dec passes/pt | enc+dec passes/pt |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in metrics.items():
        passes = r["passes_per_point_per_step"]
        kl = f"{r['test_kl']:.4f} ± {r['test_kl_stderr']:.4f}" if r.get("test_kl") is not None else "n/a"
        rows.append(
            f"| {m} | {'-' if r['samples'] is None else r['samples']} "
            f"| {'-' if r['k'] is None else r['k']} "
            f"| {kl} | {r['test_log_lik']:.4f} | {r['train_seconds']:.1f} "
            f"| {r['seconds_per_epoch']:.3f} | {passes['decoder']:.2f} "
            f"| {passes['encoder+decoder']:.2f} |"
        )
    return "\n".join(rows)
