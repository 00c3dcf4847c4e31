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

from ..errors import MapaError

__all__ = ["available_memory", "check_memory", "points_bytes"]

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
