"""Refuse, before allocating, a request that cannot fit in memory.

Every size a user types (points to draw, rows to sample, a split) passes through
:func:`check_memory` with an estimate of the bytes the request needs; a request beyond the
memory the system has available is a one-line :class:`~mapa_vae.errors.MapaError` naming the
flag, instead of an allocator error (or the out-of-memory killer) minutes later.

>>> check_memory(1000 * 8, "--n 1000")
>>> try:
...     check_memory(2**80, "--n 1e23")
... except MapaError as e:
...     print(str(e)[:52])
--n 1e23 needs about 1.2e+24 bytes (1.1e+15 GiB), mo
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import MapaError

if TYPE_CHECKING:
    from ..config import TrainConfig

__all__ = ["available_memory", "check_memory", "check_train_memory", "points_bytes", "train_bytes"]

GIB = 2**30


def available_memory() -> int:
    """Bytes the system can give this process now: ``MemAvailable`` of ``/proc/meminfo`` on
    Linux, else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 2**62  # unknown: let the allocator decide


def points_bytes(n: int, width: int, copies: int = 3) -> int:
    """Bytes for ``n`` rows of ``width`` float64 values, held ``copies`` times at once (the
    array, a working copy and the converted output, say)."""
    return int(n) * int(width) * 8 * copies


def check_memory(nbytes: int, what: str) -> None:
    """Raise a one-line :class:`MapaError` naming ``what`` (a flag and its value) when
    ``nbytes`` exceeds the memory available (:func:`available_memory`)."""
    have = available_memory()
    if nbytes > have:
        raise MapaError(f"{what} needs about {nbytes:.2g} bytes ({nbytes / GIB:.2g} GiB), more than "
                        f"the {have / GIB:.1f} GiB of memory available")


def train_bytes(cfg: TrainConfig, n_train: int, dim: int) -> dict[str, int]:
    """The largest allocations of a run, by the flags that size them (a lower estimate): the
    training points; a step's activations, ``R · B · (k + S) · width`` float32 values kept for
    the backward pass (width: the data, the latent and every hidden layer, and for a conv
    network the data times its widest channel count); MAPA's stored posterior table,
    ``N · top_k`` index-weight pairs."""
    batch = min(cfg.batch_size, n_train)
    draws = max(1, cfg.samples) + (cfg.mapa_k if cfg.method == "mapa" else 0)
    width = dim + cfg.latent_dim + 2 * sum(cfg.hidden)
    width += dim * max(cfg.channels) if cfg.network == "conv" else 0
    out = {"--n-train": points_bytes(n_train, dim),
           "--samples/--batch-size": cfg.restarts * batch * draws * width * 4 * 3}
    if cfg.method == "mapa":
        top_k = cfg.top_k if cfg.top_k is not None else (n_train if n_train <= 2048 else 512)
        out["--n-train/--top-k"] = n_train * min(top_k, n_train) * 12
    return out


def check_train_memory(cfg: TrainConfig, n_train: int, dim: int) -> None:
    """Refuse a run whose allocations (:func:`train_bytes`) cannot fit, naming the flags."""
    for flags, nbytes in train_bytes(cfg, n_train, dim).items():
        check_memory(nbytes, f"{flags} ({cfg.method}, {n_train} training points of {dim} values)")
