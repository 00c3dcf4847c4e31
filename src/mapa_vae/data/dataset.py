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

from ..seeds import check_seed, copy_seeds, torch_seed
from .groundtruth import GroundTruth, ground_truth

__all__ = ["Dataset", "data_generator", "fresh_points", "make_ground_truth_data"]

_TORCH_SEEDS = 2**64  # torch.Generator.manual_seed takes seeds below this


def data_generator(seed: int) -> torch.Generator:
    """The torch generator of draw ``seed`` of a data set. Seeds below 2⁶⁴ seed it as they are
    (the draws of every earlier version); larger ones are hashed down through a seed sequence
    (:func:`mapa_vae.seeds.torch_seed`), so any non-negative integer is a draw.

    >>> a = torch.rand(2, generator=data_generator(2**70))
    >>> bool((a == torch.rand(2, generator=data_generator(2**70))).all())
    True
    """
    seed = check_seed(seed, "--data-seed")
    return torch.Generator().manual_seed(seed if seed < _TORCH_SEEDS else torch_seed(seed))


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
    g = data_generator(seed)
    (x_tr, z_tr), (x_va, z_va), (x_te, z_te) = (truth.sample(n, g) for n in (n_train, n_val, n_test))
    return Dataset(name, x_tr, x_va, x_te, truth, z_tr, z_va, z_te)


FRESH_STREAM = 2**32 - 1
"""The spawn key of the seed sequence that :func:`fresh_points` draws from; the splits of
:func:`make_ground_truth_data` are seeded directly, so the two streams never meet."""


def fresh_points(name: str, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` new points of built-in curve ``name`` and their true codes, ``((n, D), (n, L))``.

    They come from a stream (seed sequence ``seed``, spawn key :data:`FRESH_STREAM`) that no
    split of :func:`make_ground_truth_data` uses, whatever its ``data_seed``: scoring them measures
    a model on data it never saw, unlike a draw with the training split's own seed.
    """
    g = torch.Generator().manual_seed(copy_seeds(seed, FRESH_STREAM).torch)
    return ground_truth(name).sample(n, g)
