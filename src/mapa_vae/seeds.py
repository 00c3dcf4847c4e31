"""Seeds: any non-negative integer a user types, turned into the generators' seeds.

A run seeded ``s`` with ``R`` restarts trains copies ``r = 0 … R-1``; copy ``r`` draws every
random number from generators seeded by :func:`copy_seeds` ``(s, r)``, derived through numpy's
:class:`~numpy.random.SeedSequence` (entropy ``s``, spawn key ``(r,)``). Two runs with different
``--seed`` values therefore never share a copy (their seed sequences differ), and copy 0 of
``--restarts R`` is the single run ``--restarts 1`` with the same seed. Seeds of any size work:
the sequence hashes them down to the 64 bits torch takes and the 32 bits numpy's legacy global
generator and :mod:`random` take.

>>> a = copy_seeds(0, 1); b = copy_seeds(1, 0)
>>> a.torch != b.torch
True
>>> copy_seeds(2**70, 0).torch < 2**64
True
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from .errors import MapaError

__all__ = ["CopySeeds", "check_seed", "copy_seeds", "one_off_seed", "seed_everything", "torch_seed"]


@dataclass(frozen=True)
class CopySeeds:
    """The seeds of one copy's generators."""

    torch: int  # torch.manual_seed / torch.Generator (64 bits)
    legacy: int  # numpy's global generator and Python's random (32 bits)


def check_seed(seed: object, flag: str = "--seed") -> int:
    """``seed`` as an int, or a one-line :class:`MapaError` naming ``flag``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise MapaError(f"{flag} must be a non-negative integer, got {seed!r}")
    if seed < 0:
        raise MapaError(f"{flag} must be a non-negative integer, got {seed}")
    return int(seed)


def copy_seeds(seed: int, copy: int = 0) -> CopySeeds:
    """The seeds of copy ``copy`` of a run seeded ``seed`` (see the module docstring)."""
    seed = check_seed(seed)
    words = np.random.SeedSequence(seed, spawn_key=(int(copy),)).generate_state(3, np.uint32)
    return CopySeeds(torch=int(words[0]) << 32 | int(words[1]), legacy=int(words[2]))


def torch_seed(seed: int, copy: int = 0) -> int:
    """The 64-bit torch seed of copy ``copy`` of a run seeded ``seed``."""
    return copy_seeds(seed, copy).torch


def one_off_seed(seed: int) -> int:
    """A seed torch takes, for a generator outside the copies (a prior fit after training):
    ``seed`` itself below ``2**64`` (what runs always used), else its copy 0's torch seed.

    >>> one_off_seed(7), one_off_seed(2**70) == torch_seed(2**70)
    (7, True)
    """
    seed = check_seed(seed)
    return seed if seed < 2**64 else torch_seed(seed)


def seed_everything(seed: int, copy: int = 0) -> CopySeeds:
    """Seed torch, numpy's global generator and :mod:`random` for copy ``copy`` of run ``seed``."""
    s = copy_seeds(seed, copy)
    random.seed(s.legacy)
    np.random.seed(s.legacy)  # noqa: NPY002  (seeds user code that uses the legacy global RNG)
    torch.manual_seed(s.torch)
    return s
