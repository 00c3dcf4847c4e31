"""The exact top-``K`` table for 0/1 data by Hamming distance (paper Eq. 8, docs/design.md §2).

For binary ``x`` the softened Bernoulli kernel depends on a pair only through the number ``h``
of bits where ``x_n`` and ``x_i`` differ: an equal bit contributes ``log ρ``, a different one
``log(1 - ρ)``, so

    log k(x_n | x_i) = (D - h) log ρ + h log(1 - ρ),

decreasing in ``h``. The table is then a search over bit-packed codes (faiss's popcount
``hammings``, 64 bits an instruction, instead of a float64 matrix product over ``D``), and the
normalizer and the leftover mass are sums over a per-row histogram of the ``D + 1`` possible
distances, exact in log space. Ties are broken by index: row ``n`` stores the point itself
first, then the others by increasing distance and, at equal distance, increasing index.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch
from torch import Tensor

from ..kernels import BernoulliKernel
from .posterior import MapaPosterior

__all__ = ["hamming_log_kernel", "hamming_top_k", "is_binary", "pack_bits"]


_BLOCK_ENTRIES = 1 << 22  # (b, N) distances per block: 16 MB of int32 stays in cache

_hammings = faiss.hammings  # type: ignore[attr-defined]  # (a, b, na, nb, bytes, out): all pairs



def is_binary(x: Tensor) -> bool:
    """Whether every entry of ``x`` is exactly 0 or 1.

    >>> is_binary(torch.tensor([[0.0, 1.0]])), is_binary(torch.tensor([[0.0, 0.5]]))
    (True, False)
    """
    a = x.detach().to("cpu").numpy()
    return bool(np.all((a == 0) | (a == 1)))


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Boolean rows ``(N, D)`` as bit-packed codes ``(N, 8 ⌈D / 64⌉)`` uint8, zero-padded to
    whole 64-bit words (equal padding bits add nothing to a distance)."""
    packed = np.packbits(bits, axis=1)  # (N, ⌈D/8⌉)
    width = 8 * -(-packed.shape[1] // 8)
    return np.ascontiguousarray(np.pad(packed, ((0, 0), (0, width - packed.shape[1]))))


def hamming_log_kernel(kernel: BernoulliKernel, d: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``log k`` at Hamming distance ``h = 0 … D``, shape ``(D + 1,)``.

    >>> [round(v, 12) for v in hamming_log_kernel(BernoulliKernel(0.9), 2).exp().tolist()]
    [0.81, 0.09, 0.01]
    """
    h = torch.arange(d + 1, dtype=torch.float64)
    return ((d - h) * math.log(kernel.rho) + h * math.log1p(-kernel.rho)).to(dtype)


def hamming_top_k(
    data: Tensor,
    kernel: BernoulliKernel,
    k_keep: int,
    dtype: torch.dtype = torch.float64,
    rows: tuple[int, int] | None = None,
    block_size: int | None = None,
) -> MapaPosterior:
    """The exact top-``K`` table of ``q(i | n)`` for 0/1 ``data`` ``(N, D)`` under ``kernel``.

    Each block of ``b`` rows gets its ``(b, N)`` Hamming distances from faiss (``hammings``, on
    the CPU whatever the data's device), then per row: the histogram ``c_h`` of the distances
    (the point itself counted at ``h = 0``), ``log Σ_j k = logsumexp_h(log c_h + log k(h))``, the
    ``K`` nearest in the order (point itself, distance, index), and the leftover mass from the
    histogram minus what was stored. Memory ``O(b · N + N · K)``; ``block_size`` defaults to
    ``2²² / N`` rows. ``rows = (start, stop)`` computes only those rows.

    >>> x = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    >>> post = hamming_top_k(x, BernoulliKernel(0.9), 2)
    >>> post.index.tolist()  # ties at distance 1 go to the smaller index; 3 duplicates 0
    [[0, 3], [1, 0], [2, 0], [3, 0]]
    """
    n, d = data.shape[0], data[0].numel()
    start, stop = (0, n) if rows is None else rows
    codes = pack_bits(_varying_columns(data.reshape(n, d).detach().to("cpu").numpy() != 0))
    log_k = hamming_log_kernel(kernel, d)  # (D+1,), at the full D: a dropped column is an equal bit
    b = block_size or max(1, _BLOCK_ENTRIES // max(n, 1))
    log_q = torch.empty(stop - start, k_keep, dtype=dtype)
    index = torch.empty(stop - start, k_keep, dtype=torch.int64)
    log_rest = torch.full((stop - start,), -math.inf, dtype=dtype)
    dis = np.empty((min(b, max(stop - start, 0)), n), dtype=np.int32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(torch.get_num_threads())  # the run's --threads, as torch's ops
    try:
        for lo in range(start, stop, b):
            hi = min(lo + b, stop)
            _hammings(faiss.swig_ptr(codes[lo:hi]), faiss.swig_ptr(codes), hi - lo, n, codes.shape[1],
                      faiss.swig_ptr(dis))  # (b, N) int32
            rows_lo = slice(lo - start, hi - start)
            index[rows_lo], log_q[rows_lo], log_rest[rows_lo] = _block_top_k(
                dis[: hi - lo], lo, k_keep, log_k, dtype)
    finally:
        faiss.omp_set_num_threads(threads)
    return MapaPosterior(log_q, index, log_rest)


def _block_top_k(dis: np.ndarray, lo: int, k_keep: int, log_k: Tensor,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Indices ``(m, K)``, ``log q`` ``(m, K)`` and ``log_rest`` ``(m,)`` of rows ``lo …`` from
    their Hamming distances ``dis`` ``(m, N)`` (int32) to every atom."""
    m, n = dis.shape
    bins = log_k.shape[0]  # D + 1 distances
    count = torch.stack([torch.bincount(row, minlength=bins) for row in torch.from_numpy(dis)])
    cum = count.cumsum(1)  # (m, D+1)
    last = (cum < k_keep).sum(1)  # (m,): the distance of each row's K-th stored entry
    # candidates: every pair within its row's last distance, in (row, atom) order (numpy's
    # broadcast compare and flatnonzero are ~10x torch's here)
    flat = torch.from_numpy(np.flatnonzero(dis <= last.numpy().astype(np.int32)[:, None]))
    r, c = flat // n, flat % n
    h = torch.from_numpy(dis.reshape(-1)[flat.numpy()]).long()
    key = r * (bins + 1) + h + 1  # sorted by (row, distance); the point itself before all
    key = torch.where(c == r + lo, r * (bins + 1), key)
    order = torch.sort(key, stable=True).indices  # stable: equal distances keep c ascending
    per_row = cum.gather(1, last[:, None])[:, 0]  # (m,): candidates of each row
    take = order[((torch.cumsum(per_row, 0) - per_row)[:, None] + torch.arange(k_keep))]  # (m, K)
    log_norm = torch.logsumexp(count.double().log() + log_k, 1)  # (m,)
    log_q = (log_k[h[take]] - log_norm[:, None]).to(dtype)
    log_rest = torch.full((m,), -math.inf, dtype=dtype)
    if k_keep < n:
        picked = torch.where(torch.arange(bins) < last[:, None], count, 0)  # (m, D+1)
        picked[torch.arange(m), last] = k_keep - picked.sum(1)
        log_rest = (torch.logsumexp((count - picked).double().log() + log_k, 1) - log_norm).to(dtype)
    return c[take], log_q, log_rest


def _varying_columns(bits: np.ndarray) -> np.ndarray:
    """The columns of boolean ``bits`` ``(N, D)`` that are not the same in every row (a constant
    column adds nothing to any distance; sprites have ~20 % of them), at least one."""
    varying = (bits != bits[:1]).any(0)
    varying[0] |= not varying.any()
    return bits if varying.all() else bits[:, varying]
