"""A run's folder: written under a lock (:func:`run_directory`), and a trained run rebuilt
from it alone: ``config.json`` names the architecture and the likelihood, ``model.pt`` /
``trained.pt`` hold the weights, tied to that config.

:func:`load_run` refuses weights written by another run than the folder's config (an interrupted
or concurrent run), and a run whose ``metrics.json`` says it produced no usable model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from ..config import TrainConfig
from ..errors import MapaError
from ..methods.base import Architecture
from ..models.latent import LatentVariableModel
from ..models.likelihoods import make_likelihood
from ..registry import METHODS
from ..storage import load_tensors, read_json
from .checkpoint import config_json

__all__ = ["Run", "SavedEpoch", "load_run", "run_directory"]


@dataclass
class Run:
    """A trained run rebuilt from its directory alone."""

    config: TrainConfig
    model: LatentVariableModel
    data_dim: int
    # the split sizes the run used (config.json's "data_sizes"); older runs stored their size knobs
    # even where a file's own split ignored them, so these, not the knobs, rebuild its data
    data_sizes: dict[str, int] | None = None



def load_run(run_dir: str | Path, which: str = "model") -> Run:
    """Rebuild a run's final (``which="model"``) or trained (``"trained"``) model from its folder."""
    run = Path(run_dir)
    if not run.is_dir():
        raise MapaError(f"{run}: no such run directory")
    raw = read_json(run / "config.json")
    sizes = raw.pop("data_sizes", None) if isinstance(raw, dict) else None  # the split sizes used
    if not (isinstance(sizes, dict) and all(isinstance(sizes.get(k), int) and not isinstance(sizes[k], bool)
                                            for k in ("n_train", "n_val", "n_test"))):
        sizes = None
    metrics = run / "metrics.json"
    if metrics.is_file():
        m = read_json(metrics)
        if isinstance(m, dict) and m.get("usable") is False:
            raise MapaError(f"{run}: this run produced no usable model ({m.get('problem')}); "
                            "train again (e.g. a smaller --lr or another --noise-var)")
    where = run / "config.json"
    if not isinstance(raw, dict) or "data_dim" not in raw or "likelihood_config" not in raw:
        raise MapaError(f"{where}: not a mapa-vae run config (expected a JSON object with data_dim "
                        "and likelihood_config)")
    data_dim, lik_config = raw.pop("data_dim"), raw.pop("likelihood_config")
    if not isinstance(data_dim, int) or isinstance(data_dim, bool) or data_dim < 1:
        raise MapaError(f"{where}: data_dim must be a positive integer, got {data_dim!r}")
    cfg = TrainConfig.from_dict(raw, where=str(run / "config.json"))
    method = METHODS[cfg.method]
    arch = Architecture.from_config(cfg, data_dim)
    likelihood = make_likelihood(lik_config)
    saved = load_tensors(run / f"{which}.pt")
    if "config" in saved and saved["config"] != config_json(cfg):
        raise MapaError(f"{run / f'{which}.pt'} was written by another run than {run / 'config.json'} "
                        "(an interrupted or concurrent run?); train again or --resume")
    if "model" not in saved:
        raise MapaError(f"{run / f'{which}.pt'}: not a mapa-vae model file")
    state = saved["model"]
    if which == "model":
        model = method.build_final(arch, likelihood, cfg)
    else:
        model = method.build(arch, likelihood, cfg)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as e:  # shapes or names that do not fit the config
        first = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        raise MapaError(f"{where} (data_dim {data_dim}, latent_dim {cfg.latent_dim}, hidden "
                        f"{list(cfg.hidden)}) does not fit the weights in {run / f'{which}.pt'}: "
                        f"{first[:160]}") from None
    return Run(cfg, model.eval(), data_dim, sizes)


@contextmanager
def run_directory(out: Path | None, resume: bool, overwrite: bool) -> Iterator[None]:
    """Hold ``out``'s lock for the whole run; refuse to replace a run there unless asked."""
    if out is None:
        yield
        return
    existed = out.exists()
    was_empty = not existed or not any(out.iterdir())
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MapaError(f"{out}: cannot create the run directory ({e.strerror})") from None
    lock_path = out / ".train.lock"
    lock = filelock.FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise MapaError(f"{out}: another train is writing to this run directory; wait for it to "
                        "finish or choose another --out") from None
    try:
        if not (resume or overwrite):
            if (out / "config.json").exists():
                raise MapaError(f"{out} holds a finished run; --overwrite replaces it, --resume "
                                "continues it")
            if (out / "checkpoint.pt").exists():
                raise MapaError(f"{out} holds an interrupted run (checkpoint.pt); --resume "
                                "continues it, --overwrite starts again")
        yield
    except BaseException:
        # refused before anything was written (a bad config found while building, say): leave
        # the folder as it was, not holding a stray lock file
        if was_empty and [f.name for f in out.iterdir()] == [lock_path.name]:
            lock.release()
            lock_path.unlink(missing_ok=True)
            if not existed:
                out.rmdir()
        raise
    finally:
        lock.release()


class SavedEpoch:
    """The epoch of the last checkpoint written; an interrupt leaves it on the exception
    (``saved_epoch``, ``run_dir``) for the command line to name in its message."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.epoch: int | None = None

    def __enter__(self) -> SavedEpoch:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        if isinstance(error, KeyboardInterrupt):
            error.saved_epoch, error.run_dir = self.epoch, self.out  # type: ignore[attr-defined]
