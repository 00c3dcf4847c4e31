"""A data set's splits and, for a built-in curve, its truth (docs/design.md §6).

:class:`Dataset` holds train / validation / test ``(n, D)`` in float64, the ground truth and the
true codes when they are known, and for a user's file the file row of every split row.
Built-in curves are drawn from their ground-truth model with one seed, in the order train,
validation, test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .groundtruth import GroundTruth, ground_truth

__all__ = ["Dataset", "make_ground_truth_data"]


@dataclass
class Dataset:
    """Splits ``(n, D)`` in float64; ``truth`` and the true codes ``z_*`` when known."""

    name: str
    train: Tensor
    val: Tensor
    test: Tensor
    truth: GroundTruth | None = None
    z_train: Tensor | None = None
    z_val: Tensor | None = None
    z_test: Tensor | None = None
    order: Tensor | None = None  # a user's file: the file row of each row of train, val, test

    @property
    def dim(self) -> int:
        return self.train.shape[1]

    def unsplit(self) -> Tensor | None:
        """A user's file in its own row order (so errors can name its rows), else None."""
        if self.order is None:
            return None
        x = torch.empty((self.order.shape[0], self.dim), dtype=self.train.dtype)
        x[self.order] = torch.cat([self.train, self.val, self.test])
        return x



def make_ground_truth_data(
    name: str, n_train: int = 1000, n_val: int = 500, n_test: int = 2000, seed: int = 0,
    surrogate: bool = True,
) -> Dataset:
    """Draw the splits of a built-in data set from its ground truth, reproducibly from ``seed``."""
    truth = ground_truth(name, surrogate=surrogate)
    g = torch.Generator().manual_seed(seed)
    (x_tr, z_tr), (x_va, z_va), (x_te, z_te) = (truth.sample(n, g) for n in (n_train, n_val, n_test))
    return Dataset(name, x_tr, x_va, x_te, truth, z_tr, z_va, z_te)

