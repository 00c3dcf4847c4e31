"""What every benchmark shares: the machine it ran on, its flags, its timed steps, its JSON.

A benchmark script imports this module (``from harness import ...``: scripts run as
``python benchmarks/NAME.py``, so their folder is on the path) and

- builds its parser on :func:`parser`, which adds ``--json PATH`` (strict JSON, written
  atomically by :func:`mapa_vae.storage.write_json`), ``--tiny`` (a seconds-long run on a tiny
  problem, the size ``tests/test_benchmarks.py`` runs every script at) and ``--threads``
  (torch CPU threads, default 1);
- calls :func:`start` on the parsed flags (sets the threads, returns the machine description);
- states every knob it measures: :func:`bench_config` builds a :class:`~mapa_vae.TrainConfig`
  only from knobs given explicitly (a default that changes later must not change a benchmark's
  meaning) and refuses one that leaves out any of :data:`STATED`;
- times training steps with :func:`timed_steps` (``objective``'s bound, Adam, the same step as
  the training loop) rather than writing its own Adam loop;
- writes ``{"benchmark", "machine", "knobs", "records"}`` with :func:`write_records`.

The machine description (:func:`machine`) names the CPU model, its cores, torch's threads, the
load average when the run started and ended, and the versions of Python, torch, numpy, faiss
and mapa-vae, so a number can be read against the load it was measured under.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mapa_vae.config import TrainConfig
from mapa_vae.inference.objectives import Objective
from mapa_vae.models.latent import LatentVariableModel
from mapa_vae.registry import BATCHINGS
from mapa_vae.storage import write_json

__all__ = ["STATED", "Steps", "bench_config", "describe", "knobs_of", "machine", "parser", "start",
           "timed_steps", "write_records"]

STATED = ("method", "samples", "batch_size", "lr", "seed", "restarts", "hidden", "activation",
          "latent_dim", "threads", "dtype")
"""Config fields that change what a training step costs or trains: :func:`bench_config` refuses
a config that leaves any of them to ``TrainConfig``'s default."""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """The machine and its load now: CPU model, cores, torch threads, load average, versions
    (and the GPU, where CUDA is available)."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "faiss": _version("faiss-cpu") or _version("faiss"),
        "mapa_vae": _version("mapa-vae"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def describe(info: dict[str, Any]) -> str:
    """One line for a benchmark's printed header."""
    load = info["load_average"]
    return (f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} on "
            f"{info['torch_threads']} thread(s), load average {load[0]:.2f}" if load else
            f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}")


def parser(doc: str | None, **kw: Any) -> argparse.ArgumentParser:
    """A benchmark's parser with the common flags: ``--json PATH``, ``--tiny``, ``--threads``.

    ``doc`` is the script's ``__doc__`` (shown whole by ``--help``)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                **kw)
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write the machine, the knobs and the records here (strict JSON)")
    p.add_argument("--tiny", action="store_true",
                   help="a seconds-long run on a tiny problem (the CI smoke test): checks the "
                   "script runs, measures nothing worth reporting")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    return p


def start(args: argparse.Namespace) -> dict[str, Any]:
    """Apply the common flags (torch threads) and describe the machine; prints one line."""
    if args.threads < 1:
        raise SystemExit(f"--threads {args.threads}: at least 1")
    torch.set_num_threads(args.threads)
    info = machine()
    print(describe(info) + (" [--tiny]" if args.tiny else ""), flush=True)
    return info


def bench_config(**knobs: Any) -> TrainConfig:
    """A :class:`~mapa_vae.TrainConfig` from explicitly stated knobs; every one of
    :data:`STATED` must be among them.

    >>> bench_config(method="vae", samples=1, batch_size=100, lr=1e-3, seed=0, restarts=1,
    ...              hidden=(50, 50, 50), activation="tanh", latent_dim=1, threads=1)
    Traceback (most recent call last):
    ...
    SystemExit: bench_config: state dtype (never a TrainConfig default)
    """
    missing = [k for k in STATED if k not in knobs]
    if missing:
        raise SystemExit(f"bench_config: state {', '.join(missing)} (never a TrainConfig default)")
    return TrainConfig(**knobs)


def knobs_of(cfg: TrainConfig, *extra: str) -> dict[str, Any]:
    """The :data:`STATED` knobs of ``cfg`` (plus ``extra`` fields) as a JSON-ready dict."""
    d = cfg.to_dict()
    return {k: list(d[k]) if isinstance(d[k], tuple) else d[k] for k in (*STATED, *extra)}


@dataclass
class Steps:
    """What :func:`timed_steps` measured: mean seconds per timed step, the seconds to draw one
    epoch's batches, network passes per point per step (``encoder``, ``decoder``,
    ``encoder+decoder``) and the bound ``value`` of every timed step."""

    seconds_per_step: float
    batch_seconds: float
    passes: dict[str, float]
    bounds: list[float] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None

    def seconds_per_epoch(self, n: int, batch_size: int) -> float:
        """Mean step time times the ``⌈n / batch_size⌉`` steps of an epoch, plus drawing its batches."""
        return self.seconds_per_step * math.ceil(n / batch_size) + self.batch_seconds


def timed_steps(model: LatentVariableModel, objective: Objective, x: torch.Tensor, *, steps: int,
                batch_size: int, lr: float, batching: str = "random", warmup: int = 2,
                generator: torch.Generator | None = None,
                optimizer: torch.optim.Optimizer | None = None) -> Steps:
    """``warmup + steps`` Adam steps on ``-objective(model, x[b], b).surrogate.mean()``, the
    training loop's step, over epochs of batches drawn by the ``batching`` entry.

    The first ``warmup`` steps (allocators, caches) are neither timed nor counted in the passes;
    the next ``steps`` are. ``optimizer`` continues one (a fresh Adam at ``lr`` otherwise).
    """
    if steps < 1:
        raise ValueError(f"timed_steps: steps must be at least 1, got {steps}")
    draw: Callable[..., list[torch.Tensor]] = BATCHINGS[batching]
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    t = time.perf_counter()
    batches = draw(x, batch_size, generator)
    batch_seconds = time.perf_counter() - t
    bounds: list[float] = []
    done, t0 = 0, time.perf_counter()
    while done < warmup + steps:
        for index in batches:
            if done == warmup:
                objective.passes.reset()
                t0 = time.perf_counter()
            bound = objective(model, x[index], index)
            opt.zero_grad()
            (-bound.surrogate.mean()).backward()
            opt.step()
            if done >= warmup:
                bounds.append(float(bound.value.detach().mean()))
            done += 1
            if done == warmup + steps:
                break
        else:
            batches = draw(x, batch_size, generator)
    seconds = (time.perf_counter() - t0) / steps
    return Steps(seconds, batch_seconds, objective.passes.per_point(), bounds, opt)


def write_mnist_subset(src: Path | None, dest: Path, n_train: int, n_val: int, n_test: int,
                       seed: int = 0) -> None:
    """The first ``n_*`` rows of each split of the binarized-MNIST ``src`` as a packed ``.npz``
    at ``dest`` (``src`` None: random 0/1 images, for ``--tiny``)."""
    sizes = {"train": n_train, "valid": n_val, "test": n_test}
    if src is None:
        rng = np.random.default_rng(seed)
        out = {k: np.packbits(rng.random((n, 784)) < 0.2, axis=1) for k, n in sizes.items()}
    else:
        try:
            data = np.load(src, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise SystemExit(f"{src}: not a readable .npz file ({e})") from None
        out = {}
        with data:
            for k, n in sizes.items():
                if k not in data or data[k].shape[0] < n:
                    have = data[k].shape[0] if k in data else 0
                    raise SystemExit(f"{src}: needs {n} rows of {k!r}, has {have}")
                out[k] = data[k][:n]
    np.savez(dest, train=out["train"], valid=out["valid"], test=out["test"])


def write_records(path: str | Path | None, name: str, info: dict[str, Any], knobs: dict[str, Any],
                  records: Sequence[dict[str, Any]], **extra: Any) -> None:
    """Write ``{"benchmark", "machine", "knobs", "records", ...extra}`` as strict JSON (NaN and
    infinities become ``null``), atomically; nothing when ``path`` is ``None``.

    ``info`` is :func:`start`'s description; the load average at the end is added to it."""
    if path is None:
        return
    end = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    write_json(path, {"benchmark": name, "machine": {**info, "load_average_end": end},
                      "knobs": knobs, "records": list(records), **extra})
    print(f"wrote {path}", file=sys.stderr)
