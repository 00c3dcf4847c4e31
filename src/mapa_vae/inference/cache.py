"""The on-disk cache of MAPA's posterior table (paper Eq. 8; docs/design.md §2).

``q(i | n)`` depends only on the data and the kernel, so it is computed once and reused across
restarts, hyper-parameter searches and methods. The file name hashes the data, the kernel and its
parameters, ``K``, the precision and the engine's settings; each file carries a digest of its own
arrays and is written atomically; a file lock makes concurrent builders compute it once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch import Tensor

from ..errors import MapaError
from ..kernels import Kernel
from ..storage import array_digest, atomic_write
from .engines import build_posterior, cache_params, uses_hamming
from .exact import compute_posterior
from .posterior import CACHE_FORMAT, MapaPosterior, resolve_top_k

__all__ = ["cached_posterior"]


def _cache_key(
    data: Tensor, kernel: Kernel, top_k: int, dtype: torch.dtype, engine: dict[str, Any] | None = None
) -> str:
    """``engine``: what a non-exact engine adds (its name and index settings); none for exact."""
    extra = {"format": CACHE_FORMAT, "top_k": top_k, "dtype": str(dtype), **kernel.params(), **(engine or {})}
    return array_digest(data, extra=extra)



def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    return array_digest(*(arrays[name] for name in sorted(arrays)))



def cached_posterior(
    data: Tensor,
    kernel: Kernel,
    cache_dir: str | Path,
    top_k: int | None = None,
    block_size: int = 1024,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    engine: str = "exact",
    **index_params: Any,
) -> tuple[MapaPosterior, bool]:
    """Load the posterior of ``data`` from ``cache_dir`` or compute and store it.

    The file name hashes the data's bytes, shape and dtype, the kernel and its parameters,
    ``K``, the precision and the cache format, and for ``engine="faiss"`` the engine and its
    resolved index settings (:func:`~mapa_vae.inference.engines.build_posterior`; ``"auto"`` is keyed as
    the engine it picks, so an exact pick shares the exact cache). The file stores a digest of
    its own arrays; a truncated, corrupt or mismatching file is rebuilt. A file lock makes
    concurrent builders of the same cache compute it once. Returns the posterior and whether it
    came from the cache.
    """
    n = data.shape[0]
    k_keep = resolve_top_k(n, top_k)
    binary = uses_hamming(data, kernel)
    engine_key = cache_params(n, data[0].numel(), k_keep, engine, device, binary, **index_params)
    hamming = not engine_key and binary
    # the Hamming table breaks ties by index, the matmul table by rounding: keyed apart
    key = _cache_key(data, kernel, k_keep, dtype, {"table": "hamming"} if hamming else engine_key)
    cache_dir = Path(cache_dir).expanduser()
    path = cache_dir / f"posterior-{key[:32]}.npz"
    lock = FileLock(str(path) + ".lock")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as e:  # read-only, not a folder, no permission: the user's choice of folder
        raise MapaError(f"--cache-dir {cache_dir}: cannot keep the posterior cache there "
                        f"({e.strerror or type(e).__name__}); choose another --cache-dir or set "
                        "$MAPA_VAE_CACHE") from None
    try:
        loaded = _load_cache(path, key, n, dtype)
        if loaded is not None:
            return loaded, True
        if engine_key:
            post = build_posterior(data, kernel, k_keep, "faiss", device, None, dtype, **index_params)
        else:
            post = compute_posterior(data, kernel, k_keep, block_size, device, dtype)
        arrays = {
            "log_q": post.log_q.numpy(),
            "index": post.index.numpy(),
            "log_rest": post.log_rest.numpy(),
        }
        meta = np.frombuffer((key + ":" + _arrays_digest(arrays)).encode(), dtype=np.uint8)
        with atomic_write(path) as f:
            np.savez(f, meta=meta, **arrays)  # type: ignore[arg-type]
    finally:
        lock.release()
    return post, False



def _load_cache(path: Path, key: str, n: int, dtype: torch.dtype) -> MapaPosterior | None:
    """The cached posterior if the file exists, reads cleanly, its digests match and its arrays
    have the structure of a posterior of ``n`` points (:func:`_structure_problem`), else None,
    with a one-line notice on stderr for a file that exists but is not used."""
    if not path.exists():
        return None
    try:
        with path.open("rb") as fh, np.load(fh, allow_pickle=False) as f:
            arrays = {name: f[name] for name in ("log_q", "index", "log_rest")}
            stored_key, _, stored_digest = bytes(f["meta"]).decode().partition(":")
    except Exception:  # truncated zip, bad CRC, missing member: rebuild
        problem: str | None = "unreadable (truncated or corrupt)"
    else:
        if stored_key != key or stored_digest != _arrays_digest(arrays):
            problem = "its contents do not match its digest"
        else:  # the digest is unkeyed: it proves integrity, not origin, so check what is used
            problem = _structure_problem(arrays, n, torch.empty(0, dtype=dtype).numpy().dtype)
    if problem is not None:
        print(f"mapa-vae: notice: posterior cache {path}: {problem}; rebuilding it", file=sys.stderr)
        return None
    return MapaPosterior(*(torch.from_numpy(arrays[k]) for k in ("log_q", "index", "log_rest")))


def _structure_problem(arrays: dict[str, np.ndarray], n: int, dtype: np.dtype[Any]) -> str | None:
    """What makes ``arrays`` unfit as the top-``K`` table of ``N = n`` points, or None.

    ``log_q`` and ``index`` are ``(N, K)`` with ``1 <= K <= N``, ``log_rest`` is ``(N,)``; the
    log-probabilities have ``dtype``, are never NaN or above 0; the indices are int64 in
    ``[0, N)`` (a negative one would silently wrap around).
    """
    log_q, index, log_rest = arrays["log_q"], arrays["index"], arrays["log_rest"]
    if log_q.ndim != 2 or log_q.shape[0] != n or not 1 <= log_q.shape[1] <= n:
        return f"log_q has shape {log_q.shape}, expected ({n}, K) with 1 <= K <= {n}"
    if index.shape != log_q.shape or log_rest.shape != (n,):
        return f"index {index.shape} / log_rest {log_rest.shape} do not fit log_q {log_q.shape}"
    if index.dtype != np.int64:
        return f"index has dtype {index.dtype}, expected int64"
    if log_q.dtype != dtype or log_rest.dtype != dtype:
        return f"log-probabilities have dtype {log_q.dtype}/{log_rest.dtype}, expected {dtype}"
    if index.size and (index.min() < 0 or index.max() >= n):
        return f"an index lies outside [0, {n})"
    for name, a in (("log_q", log_q), ("log_rest", log_rest)):
        if np.isnan(a).any() or (a > 1e-6).any():
            return f"{name} holds NaN or a log-probability above 0"
    return None

