"""The training checkpoint: everything ``--resume`` needs to continue a run bit for bit.

A :class:`Checkpoint` holds the weights, the optimizer, the best weights so far, the torch RNG
state, the history, and the run's cumulative cost (training seconds and network-pass counts), so
a resumed run reports the time and passes of the whole run, not only of its last part. It also
holds the config it was written under: :meth:`Checkpoint.load` refuses a checkpoint of another
configuration (only ``epochs`` and where the run executes may change) and ``--epochs`` below the
epochs already done. ``save`` and ``load`` sit side by side so the file format is read in one place.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import ADDED_LATER, TrainConfig
from ..errors import MapaError
from ..storage import load_tensors, save_tensors
from .curves import per_copy

if TYPE_CHECKING:
    from .engines import Engine

__all__ = ["RESUMABLE", "Checkpoint", "CopyProgress", "chosen_copy", "config_json", "resume_copies"]

# Fields that may differ between a checkpoint and the run that resumes it.
RESUMABLE = ("epochs", "cache_dir", "device", "threads", "tensorboard")


def config_json(cfg: TrainConfig,
                drop: tuple[str, ...] = ("cache_dir", "device", "threads", "tensorboard")) -> str:
    """The config as canonical JSON, stored in checkpoints and model files to tie them to it."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items()
         if k not in drop and not (k in ADDED_LATER and v == ADDED_LATER[k])}  # as older runs wrote
    return json.dumps(d, sort_keys=True, default=str)


@dataclass
class CopyProgress:
    """One copy's progress (of the ``R`` a run trains; the chosen one's is also the checkpoint's)."""

    seed: int | None  # the copy's torch seed (mapa_vae.seeds); older runs: seed + r, or none
    best_val: float = -math.inf
    best_epoch: int = -1  # -1: no finite validation score yet
    last_val: float | None = None
    skipped: int = 0
    steps: int = 0
    best_model: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """The state of a run after ``epoch`` epochs (a fresh run: ``epoch = 0``)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    best_model: dict[str, torch.Tensor]
    torch_rng: torch.Tensor
    config: str  # config_json(cfg, RESUMABLE)
    epoch: int = 0
    best_val: float = -math.inf
    best_epoch: int = -1  # -1: no finite validation score yet
    skipped: int = 0  # steps skipped as non-finite
    steps: int = 0  # steps attempted (taken or skipped)
    last_val: float | None = None  # the most recent validation score
    train_seconds: float = 0.0  # cumulative over every part of the run
    passes: dict[str, int] = field(default_factory=dict)  # cumulative PassCounter fields
    history: list[dict[str, Any]] = field(default_factory=list)
    restarts: dict[str, Any] = field(default_factory=dict)  # every copy's progress, RNG and passes

    def per_copy(self) -> dict[str, Any]:
        """``restarts``: the engine's name, every copy's RNG states (``rng``, ``rng_device``),
        progress (``copies``, :class:`CopyProgress` fields) and passes. A checkpoint of a single
        run written before runs trained copies has none: its own fields are its one copy's."""
        if self.restarts:
            return self.restarts
        one = CopyProgress(None, self.best_val, self.best_epoch, self.last_val, self.skipped,
                           self.steps, self.best_model)
        return {"engine": "sequential", "rng": self.torch_rng[None], "rng_device": None,
                "copies": [dataclasses.asdict(one)], "passes": [self.passes]}

    def fill(self, engine: Engine, copies: Sequence[CopyProgress]) -> None:
        """Every copy's progress, from ``engine`` and ``copies``; the fields above ``restarts``
        are the chosen copy's (:func:`chosen_copy`; what the loop's diagnosis and metrics read)."""
        r = chosen_copy(copies)
        chosen = copies[r]
        self.model, self.optimizer = engine.module.state_dict(), engine.optimizer_state()
        self.best_model = chosen.best_model
        self.best_val, self.best_epoch, self.last_val = chosen.best_val, chosen.best_epoch, chosen.last_val
        self.skipped, self.steps = chosen.skipped, chosen.steps
        self.passes = dataclasses.asdict(engine.passes(r))
        self.torch_rng = torch.get_rng_state()
        self.restarts = {
            "engine": engine.name, **engine.streams.state(),
            "copies": [dataclasses.asdict(c) for c in copies],
            "passes": [dataclasses.asdict(engine.passes(i)) for i in range(len(copies))],
        }

    def save(self, path: str | Path) -> None:
        """Write atomically (a crash leaves the previous checkpoint)."""
        save_tensors(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | Path, cfg: TrainConfig) -> Checkpoint:
        """Read a checkpoint for ``cfg`` to resume; one-line errors for any mismatch."""
        path = Path(path)
        raw = load_tensors(path)
        if "config" in raw:  # a checkpoint from before configs were stored is taken as it is
            _check_resumable(raw["config"], cfg, path)
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            ck = cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as e:  # a required field is missing
            raise MapaError(f"{path}: does not fit this run ({e})") from None
        if ck.epoch > cfg.epochs:
            raise MapaError(f"--resume: {path} has {ck.epoch} epochs done; --epochs {cfg.epochs} "
                            f"is fewer (give --epochs {ck.epoch} or more)")
        return ck


def chosen_copy(copies: Sequence[CopyProgress]) -> int:
    """The copy with the best validation score (the first on a tie; 0 if none is finite)."""
    best = max(range(len(copies)), key=lambda r: (copies[r].best_val, -r))
    return best if math.isfinite(copies[best].best_val) else 0


def resume_copies(out: Path | None, cfg: TrainConfig, engine: Engine,
                  copies: list[CopyProgress]) -> Checkpoint:
    """Load ``out/checkpoint.pt`` into the engine (weights, optimizers, streams, passes) and
    ``copies``; the history's older records (one float, or a list over the copies) are read
    in today's shape."""
    if out is None or not (out / "checkpoint.pt").exists():
        raise MapaError(f"--resume: no checkpoint in {out}")
    path = out / "checkpoint.pt"
    state = Checkpoint.load(path, cfg)
    saved = state.per_copy()
    try:
        if saved.get("engine") != engine.name:
            raise ValueError(f"written by the {saved.get('engine')} engine, this run is {engine.name}")
        if len(saved["copies"]) != len(copies):
            raise ValueError(f"{len(saved['copies'])} copies there, {len(copies)} now")
        engine.module.load_state_dict(state.model)
        engine.load_optimizer(state.optimizer)
        engine.streams.load(saved)
        copies[:] = [CopyProgress(**c) for c in saved["copies"]]
        engine.set_passes(saved["passes"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MapaError(f"{path}: does not fit this run ({first})") from None
    for record in state.history:
        for key in ("train_bound", "val_log_lik"):
            values = per_copy(record, key)
            if values is not None:
                record[f"{key}_per_copy"] = values
    return state


def _check_resumable(stored: Any, cfg: TrainConfig, path: Path) -> None:
    try:
        before = json.loads(stored)
    except (TypeError, ValueError):
        raise MapaError(f"{path}: not a mapa-vae checkpoint (unreadable config)") from None
    now = json.loads(config_json(cfg, drop=RESUMABLE))
    changed = sorted(k for k in set(before) | set(now)
                     if k not in RESUMABLE
                     and before.get(k, ADDED_LATER.get(k)) != now.get(k, ADDED_LATER.get(k)))
    if changed:
        diffs = ", ".join(f"{k}={before.get(k)!r} there, {now.get(k)!r} now" for k in changed)
        raise MapaError(f"--resume: {path} was written with another configuration ({diffs}); "
                        "only --epochs may change")
