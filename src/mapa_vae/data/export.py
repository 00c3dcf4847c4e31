"""Points a user takes away: ``mapa-vae data`` writes fresh points of a built-in curve, or a
split of a built-in data set, to ``.npy`` files whose paths are checked before any work.

Fresh points (:func:`~mapa_vae.data.dataset.fresh_points`) come from a stream no run's split
uses, so a model scored on them is scored on data it never saw; a split is the one ``train
--data NAME --data-seed SEED`` uses at its default sizes (e.g. the test images of
``digits-binary``, which no run on it trains on).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from ..errors import MapaError
from .dataset import fresh_points
from .groundtruth import GROUND_TRUTHS
from .loading import load_dataset
from .memory import check_memory, points_bytes

__all__ = ["SPLITS", "check_npy_outputs", "data_points"]

SPLITS = ("fresh", "train", "val", "test")
FRESH_WIDTH = 160  # floats per point while drawing a curve: codes, three hidden layers of 50, x


def check_npy_outputs(*named: tuple[str, str | None]) -> None:
    """Refuse, before any work, ``.npy`` outputs ``(flag, path)`` that cannot be written: a wrong
    suffix, a folder, a path under a file or in a folder that cannot be written, or two flags
    naming one file (the second would replace the first). ``None`` paths are skipped."""
    seen: dict[Path, str] = {}
    for flag, path in named:
        if path is None:
            continue
        if not path.lower().endswith(".npy"):
            raise MapaError(f"{flag} {path}: output file must end in .npy")
        p = Path(path).expanduser()
        if p.is_dir():
            raise MapaError(f"{flag} {path}: is a directory; give a .npy file")
        key = p.resolve()
        if key in seen:
            raise MapaError(f"{flag} {path}: the same file as {seen[key]}; give two different files")
        seen[key] = flag
        for parent in p.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise MapaError(f"{flag} {path}: lies under the file {parent}")
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise MapaError(f"{flag} {path}: cannot write in {parent} (permission denied)")
                break


def data_points(name: str, split: str, n: int | None, seed: int) -> tuple[Tensor, Tensor | None, str]:
    """The points ``mapa-vae data`` writes, their codes (``None`` where unknown) and a line
    saying what they are. ``split`` is one of :data:`SPLITS`; ``n``: how many (fresh: default
    1000; a split: its first ``n`` rows, default all)."""
    if split == "fresh":
        if name not in GROUND_TRUTHS:
            raise MapaError(f"data {name}: --split fresh draws new points of a built-in curve "
                            f"({', '.join(GROUND_TRUTHS)}); for {name} give --split train, val or "
                            "test (the split `train --data` uses)")
        n = 1000 if n is None else n
        check_memory(points_bytes(n, FRESH_WIDTH), f"--n {n}")
        x, z = fresh_points(name, n, seed)
        return x, z, f"{n} fresh points of {name} (seed {seed}; no run's split holds them)"
    if split not in SPLITS:
        raise MapaError(f"--split: unknown split {split!r}; choose from {', '.join(SPLITS)}")
    ds = load_dataset(name, seed=seed)
    x, codes = getattr(ds, split), getattr(ds, f"z_{split}")
    if n is not None and n > x.shape[0]:
        raise MapaError(f"--n {n}: the {split} split of {name} has {x.shape[0]} rows")
    if n is not None:
        x, codes = x[:n], None if codes is None else codes[:n]
    return x, codes, (f"the {split} split of {name} ({x.shape[0]} rows, as `train --data {name} "
                      f"--data-seed {seed}` uses it)")
