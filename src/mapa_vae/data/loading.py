""":func:`load_dataset`: a data set by name (a built-in curve or image set) or from a file.

A built-in curve or generated image set draws ``n_train``, ``n_val`` and ``n_test`` points
(default 1000, 500, 2000). A user's file is shuffled with the seed and split 80 / 10 / 10 into
train, validation and test; a binarized-MNIST ``.npz`` and the fixed-size image sets come with
their own split. For those, a size that is given takes a random subset of its split, and a size
larger than the split is refused: a request is never shrunk without a word.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import MapaError
from .dataset import Dataset, data_generator, make_ground_truth_data
from .files import load_array
from .groundtruth import GROUND_TRUTHS
from .memory import check_memory, points_bytes

__all__ = ["DEFAULT_SIZES", "data_shape", "load_dataset"]

DEFAULT_SIZES = {"n_train": 1000, "n_val": 500, "n_test": 2000}
"""The sizes a drawn data set (a curve, generated images) has where none is given."""


def load_dataset(source: str, n_train: int | None = None, n_val: int | None = None,
                 n_test: int | None = None, seed: int = 0) -> Dataset:
    """A built-in data set by name, or a user's ``.npy`` / ``.csv`` / binarized-MNIST ``.npz``.

    See the module docstring for what the sizes mean; ``seed`` picks the draw or the shuffle.
    """
    sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    drawn = {k: DEFAULT_SIZES[k] if v is None else v for k, v in sizes.items()}
    if source in GROUND_TRUTHS:
        _check_drawn(source, drawn, width=2 + 1)
        return make_ground_truth_data(source, drawn["n_train"], drawn["n_val"], drawn["n_test"], seed)
    from .images import IMAGE_DATASETS, image_shape, load_image_dataset  # images.py imports this module

    if source in IMAGE_DATASETS:
        if not IMAGE_DATASETS[source].fixed:
            c, h, w = image_shape(source)
            _check_drawn(source, drawn, width=c * h * w)
            return load_image_dataset(source, drawn["n_train"], drawn["n_val"], drawn["n_test"], seed)
        return _subset(load_image_dataset(source, seed=seed), sizes, seed, source)
    path = Path(source)
    if path.suffix.lower() == ".npz" and path.exists():
        from .mnist import load_binarized_mnist

        return _subset(load_binarized_mnist(path), sizes, seed, f"{path}")  # its own split
    if path.is_file() and path.suffix.lower() not in {".npy", ".csv"}:
        raise MapaError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; use .npy "
                        "or .csv (any case), or a binarized-MNIST .npz")
    if not path.exists():
        raise MapaError(
            f"{source!r} is neither a built-in data set ({', '.join([*GROUND_TRUTHS, *IMAGE_DATASETS])}) "
            "nor an existing .npy, .csv or binarized-MNIST .npz file"
        )
    if path.is_dir():
        raise MapaError(f"{path}: is a directory; give a .npy, .csv or .npz file")
    x = torch.from_numpy(load_array(path))
    if x.shape[0] < 10:
        raise MapaError(f"{path}: {x.shape[0]} rows is too few to split into train/val/test (need 10)")
    perm = torch.randperm(x.shape[0], generator=data_generator(seed))
    n_va = n_te = max(1, x.shape[0] // 10)
    va, te, tr = perm[:n_va], perm[n_va : n_va + n_te], perm[n_va + n_te :]
    full = Dataset(path.stem, x[tr], x[va], x[te], order=torch.cat([tr, va, te]))
    return _subset(full, sizes, seed, f"{path} (split 80/10/10: {len(tr)}/{n_va}/{n_te} rows)")


def _check_drawn(name: str, sizes: dict[str, int], width: int) -> None:
    """Refuse, before drawing, split sizes whose points cannot fit in memory."""
    for key, n in sizes.items():
        check_memory(points_bytes(n, width), f"--{key.replace('_', '-')} {n} ({name})")


_SPLITS = {"n_train": "train", "n_val": "val", "n_test": "test"}


def _subset(ds: Dataset, sizes: dict[str, int | None], seed: int, where: str) -> Dataset:
    """``ds`` with each split whose size is given cut to a random subset of that size (seeded
    by ``seed``); a size beyond its split is refused, naming the flag and the split's rows."""
    if all(v is None for v in sizes.values()):
        return ds
    g = data_generator(seed)
    parts: dict[str, torch.Tensor] = {}
    for key, split in _SPLITS.items():
        n, have = sizes[key], getattr(ds, split).shape[0]
        if n is not None and n > have:
            raise MapaError(f"--{key.replace('_', '-')} {n}: {where} has only {have} {split} rows; "
                            "give at most that, or leave the flag out to use them all")
        parts[split] = (torch.arange(have) if n is None or n == have
                        else torch.randperm(have, generator=g)[:n].sort().values)

    def pick(t: torch.Tensor | None, split: str) -> torch.Tensor | None:
        return None if t is None else t[parts[split]]

    # a subset no longer holds every file row, so its rows are named by split, not file row
    return Dataset(ds.name, ds.train[parts["train"]], ds.val[parts["val"]], ds.test[parts["test"]],
                   ds.truth, pick(ds.z_train, "train"), pick(ds.z_val, "val"),
                   pick(ds.z_test, "test"))


def data_shape(source: str, n_train: int | None = None) -> tuple[int, int] | None:
    """``(training rows, values per row)`` of a data set, cheaply (a ``.npy`` file's header, a
    built-in set's definition), for checks before loading; ``None`` where only loading tells."""
    if source in GROUND_TRUTHS:
        return (DEFAULT_SIZES["n_train"] if n_train is None else n_train), 2
    from .images import IMAGE_DATASETS, image_shape

    if source in IMAGE_DATASETS:
        c, h, w = image_shape(source)
        return (DEFAULT_SIZES["n_train"] if n_train is None else n_train), c * h * w
    path = Path(source)
    if path.suffix.lower() == ".npy" and path.is_file():
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except Exception:  # empty, truncated, not a .npy: loading names what is wrong with it
            return None
        if len(shape) == 2:
            rows = shape[0] - 2 * max(1, shape[0] // 10)
            return (rows if n_train is None else min(n_train, rows)), shape[1]
    return None
