""":func:`load_dataset`: a data set by name (a built-in curve or image set) or from a file.

A file is shuffled with the seed and split 80 / 10 / 10 into train, validation and test.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MapaError
from .dataset import Dataset, make_ground_truth_data
from .files import load_array
from .groundtruth import GROUND_TRUTHS

__all__ = ["load_dataset"]


def load_dataset(
    source: str, n_train: int = 1000, n_val: int = 500, n_test: int = 2000, seed: int = 0
) -> Dataset:
    """A built-in data set by name, or a user's ``.npy`` / ``.csv`` file split at random.

    A file is shuffled with ``seed`` and split 80 / 10 / 10 into train, validation and test.
    """
    if source in GROUND_TRUTHS:
        return make_ground_truth_data(source, n_train, n_val, n_test, seed)
    from .images import IMAGE_DATASETS, load_image_dataset  # images.py imports this module

    if source in IMAGE_DATASETS:
        return load_image_dataset(source, n_train, n_val, n_test, seed)
    path = Path(source)
    if path.suffix.lower() == ".npz" and path.exists():
        from .mnist import load_binarized_mnist

        return load_binarized_mnist(path)  # its own train / valid / test split
    if path.is_file() and path.suffix.lower() not in {".npy", ".csv"}:
        raise MapaError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; use .npy "
                        "or .csv (any case), or a binarized-MNIST .npz")
    if not path.exists():
        raise MapaError(
            f"{source!r} is neither a built-in data set ({', '.join([*GROUND_TRUTHS, *IMAGE_DATASETS])}) "
            "nor an existing .npy, .csv or binarized-MNIST .npz file"
        )
    x = torch.from_numpy(load_array(path))
    if x.shape[0] < 10:
        raise MapaError(f"{path}: {x.shape[0]} rows is too few to split into train/val/test (need 10)")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_va = n_te = max(1, x.shape[0] // 10)
    va, te, tr = perm[:n_va], perm[n_va : n_va + n_te], perm[n_va + n_te :]
    return Dataset(path.stem, x[tr], x[va], x[te], order=torch.cat([tr, va, te]))

