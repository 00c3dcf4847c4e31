"""The exact top-``K`` table of ``q(i | n)``, computed in row blocks (paper Eq. 7–8).

Each block of rows is one ``(b, N)`` log-kernel matrix (one matrix product: the kernels are affine
in an inner product), normalized by its row log-sum-exp; the ``K`` largest entries are kept with
the point itself first, and the rest is summed into the log of the leftover mass. Memory is
``O(block · N + N · K)``. The same blocked reduction gives MAPA-GT's table, the posterior of the
ground-truth empiricalized model (Eq. 7).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import MapaError
from ..kernels import BernoulliKernel, Kernel
from ..models.latent import Decoder
from .hamming import hamming_top_k, is_binary
from .posterior import MapaPosterior, resolve_top_k

__all__ = ["blocked_top_k", "compute_posterior", "ground_truth_posterior"]


def compute_posterior(
    data: Tensor,
    kernel: Kernel,
    top_k: int | None = None,
    block_size: int = 1024,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    rows: slice | tuple[int, int] | None = None,
    hamming: bool | None = None,
) -> MapaPosterior:
    """Exact top-``K`` MAPA posterior of ``data`` ``(N, D)``, in row blocks on ``device``.

    Each block of ``b`` queries builds one ``(b, N)`` log-kernel matrix, normalizes it by its
    row log-sum-exp, keeps the ``K`` largest entries (the point itself forced first) and the
    log-sum-exp of the rest. The Gaussian and Bernoulli kernels are affine in one matrix
    product (:meth:`~mapa_vae.kernels.Kernel.search_form`), so a block is a single ``addmm``.

    A block holds at most 2²⁷ entries (1 GiB in float64): ``block_size`` is capped at
    ``2²⁷ // N`` rows, so memory stays ``O(N · K)`` plus one block, at any ``N``.

    ``rows`` (a ``slice`` or ``(start, stop)``) computes only those rows, ``(stop - start, K)``,
    against all ``N`` atoms: shards from several processes or devices concatenate
    (:func:`mapa_vae.inference.engines.concat_rows`) to the full table, bit for bit when every shard
    starts at a multiple of the (capped) block size. A shard is a table, not a usable posterior.

    For the Bernoulli kernel on 0/1 data (``hamming=None``: detected; ``False``: never) the table
    is searched by Hamming distance instead (:func:`~mapa_vae.inference.hamming.hamming_top_k`):
    the same kernel values to rounding, from an exact int8 product of the ±1 codes (AMX) or a
    popcount search, on the CPU, ties broken by index.
    """
    n = data.shape[0]
    k_keep = resolve_top_k(n, top_k)
    if isinstance(rows, slice):
        start, stop, step = rows.indices(n)
        if step != 1:
            raise MapaError(f"rows must be a contiguous range, got step {step}")
    else:
        start, stop = (0, n) if rows is None else (max(int(rows[0]), 0), min(int(rows[1]), n))
    if hamming is not False and isinstance(kernel, BernoulliKernel) and is_binary(data):
        return hamming_top_k(data, kernel, k_keep, dtype, rows=(start, max(start, stop)))
    block_size = max(1, min(block_size, (1 << 27) // max(n, 1)))
    x = data.to(device=device, dtype=dtype)
    form = kernel.search_form(x)
    if form is None:
        log_k_of: Callable[[Tensor], Tensor] = lambda xb: kernel.log_kernel(xb, x)  # noqa: E731
    else:  # one (b, N) buffer for every block: a fresh one costs page faults worth ~10 % of the matmul
        buf = torch.empty(min(block_size, max(stop - start, 0)), n, dtype=dtype, device=device)
        log_k_of = lambda xb: form.block(xb, out=buf[: xb.shape[0]])  # noqa: E731
    return blocked_top_k(log_k_of, x, k_keep, block_size, dtype, rows=(start, max(start, stop)))



def blocked_top_k(
    log_k_of: Callable[[Tensor], Tensor],
    x: Tensor,
    k_keep: int,
    block_size: int,
    dtype: torch.dtype,
    rows: tuple[int, int] | None = None,
) -> MapaPosterior:
    """Normalize unnormalized ``log q(i | n)`` rows and keep the top ``K`` of each, in blocks.

    ``log_k_of(x[start:stop])`` gives a block's ``(b, N)`` log-weights, up to a constant per
    row (it cancels in the normalization); the block may be overwritten, and may be the same
    buffer on every call (a block is spent before the next call). Its ``K`` largest
    entries are kept (the point itself forced first); the rest are summed as
    ``Σ exp(max(v - m, log tiny))`` with ``m`` the ``K``-th kept value, which bounds every entry
    left, so nothing overflows and the leftover mass is not a difference of two large sums. A
    row whose sum could have lost terms to underflow, or gained them from the clamp
    (``< N · tiny / eps``: relative error above ``eps``), is recomputed with a masked
    log-sum-exp. ``rows = (start, stop)`` computes only those rows.
    """
    n, device = x.shape[0], x.device
    start, stop = (0, n) if rows is None else rows
    log_q = torch.empty(stop - start, k_keep, dtype=dtype)
    index = torch.empty(stop - start, k_keep, dtype=torch.int64)
    log_rest = torch.full((stop - start,), -math.inf, dtype=dtype)
    finfo = torch.finfo(dtype)
    underflow = n * finfo.tiny / finfo.eps  # a rest sum below this may have lost terms
    for lo in range(start, stop, block_size):
        hi = min(lo + block_size, stop)
        local = torch.arange(hi - lo, device=device)
        log_k = log_k_of(x[lo:hi]).to(dtype)  # (b, N)
        self_val = log_k[local, local + lo].clone()  # (b,)
        log_k[local, local + lo] = math.inf  # the point itself ranks first
        top_vals, top_idx = torch.topk(log_k, k_keep, dim=-1)  # (b, K)
        top_vals[:, 0] = self_val
        log_top = torch.logsumexp(top_vals, -1)  # (b,)
        if k_keep < n:
            if k_keep == 1:
                log_k[local, local + lo] = -math.inf
            shift = top_vals[:, -1:] if k_keep > 1 else log_k.amax(-1, keepdim=True)  # (b, 1)
            # in place, the block is spent; exp of a denormal is ~20x slower, and terms below
            # `tiny` matter only to rows that the underflow test below recomputes anyway
            log_k.sub_(shift).clamp_min_(math.log(finfo.tiny)).exp_()
            rest = log_k.scatter_(1, top_idx, 0.0).sum(-1)  # (b,): only the rest is left
            log_rest_b = rest.log() + shift[:, 0]
            redo = ~(rest > underflow) | ~torch.isfinite(log_rest_b)
            if bool(redo.any()):
                idx = redo.nonzero()[:, 0]
                exact = log_k_of(x[lo + idx]).to(dtype).scatter_(1, top_idx[idx], -math.inf)
                log_rest_b[idx] = torch.logsumexp(exact, -1)
            log_norm = torch.logaddexp(log_top, log_rest_b)
            log_rest[lo - start : hi - start] = (log_rest_b - log_norm).cpu()
        else:
            log_norm = log_top
        log_q[lo - start : hi - start] = (top_vals - log_norm[:, None]).cpu()
        index[lo - start : hi - start] = top_idx.cpu()
    return MapaPosterior(log_q, index, log_rest)



@torch.no_grad()
def ground_truth_posterior(
    x: Tensor, z_true: Tensor, decoder: Decoder, top_k: int | None = None, block_size: int = 1024
) -> MapaPosterior:
    """MAPA-GT's proposal (paper Eq. 7, docs/design.md §5): the true posterior of the empiricalized
    ground-truth model, whose atoms are the true codes ``z_i`` of the training points ``x_i``:

    ``p(i | x_n) = p(x_n | f_GT(z_i)) / Σ_j p(x_n | f_GT(z_j))``.

    ``x`` ``(N, D)`` and ``z_true`` ``(N, L)`` are the training points and their codes, ``decoder``
    the ground truth's. Computed in float64 log space in row blocks of ``(b, N)``; the table keeps
    ``top_k`` entries per row (default :func:`resolve_top_k`: all ``N`` for small data), sorted
    descending except that ``n`` itself is first, as :func:`compute_posterior` stores them.
    """
    if x.shape[0] != z_true.shape[0]:
        raise MapaError(f"{x.shape[0]} points but {z_true.shape[0]} true codes were given")
    n = x.shape[0]
    k_keep = resolve_top_k(n, top_k)
    dec = copy.deepcopy(decoder).double()
    params = dec.net(z_true.double())  # (N, D')
    return blocked_top_k(
        lambda xb: dec.likelihood.pairwise_log_prob(params, xb), x.double(), k_keep, block_size,
        torch.float64,
    )

