"""The MAPA posterior over data-point indices, ``q(i | n)`` (paper Eq. 8, SPEC §2–3).

``q(i | n) = k(x_n | x_i) / Σ_j k(x_n | x_j)`` depends only on the data and the kernel, so it
is computed once, in row blocks, and kept as a sparse table: for every point ``n`` the ``K``
largest ``log q(i | n)`` with their indices, and the log of the mass left outside them. Memory
is ``O(block·N + N·K)``; no ``N × N`` matrix exists unless ``K = N`` was asked for.

The MAPA bound needs, per point, the top-``k`` indices ``B_n(k)`` (``k ≤ K``) and samples from
the tail ``q̃_k(· | n)`` (``q`` with ``B_n(k)`` removed, renormalized). The tail proposal is
``q`` itself on the stored entries past ``k`` and spreads the exact leftover mass uniformly over
the ``N - K`` indices that were not stored, so it has full support and the bound stays a bound.

The point itself is always stored first (``B_n(1) = {n}``), so ``k = 1, S = 0`` is the
autoencoder term.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch import Tensor

from .kernels import Kernel
from .models import Decoder
from .storage import MapaError, array_digest, atomic_write

__all__ = [
    "MapaPosterior",
    "cached_posterior",
    "compute_posterior",
    "default_top_k",
    "ground_truth_posterior",
    "uniform_posterior",
]

CACHE_FORMAT = 1
DENSE_LIMIT = 2048  # below this many points, keep the full posterior (K = N) by default
SPARSE_K = 512


def default_top_k(n: int) -> int:
    """``N`` for small data (exact tail), else 512 neighbours per point."""
    return n if n <= DENSE_LIMIT else SPARSE_K


@dataclass(frozen=True)
class MapaPosterior:
    """Top-``K`` table of ``log q(i | n)`` for ``N`` points.

    Attributes:
        log_q: ``(N, K)`` log-probabilities, descending per row except that column 0 is ``n``.
        index: ``(N, K)`` int64 indices of the atoms they belong to.
        log_rest: ``(N,)`` log of the mass of the ``N - K`` indices not stored (``-inf`` if none).
    """

    log_q: Tensor
    index: Tensor
    log_rest: Tensor

    @property
    def n_points(self) -> int:
        return self.log_q.shape[0]

    @property
    def top_k(self) -> int:
        return self.log_q.shape[1]

    def to(self, device: torch.device | str) -> MapaPosterior:
        return MapaPosterior(self.log_q.to(device), self.index.to(device), self.log_rest.to(device))

    def check_budget(self, k: int, samples: int) -> None:
        """Raise a one-line error unless ``B_n(k)`` and ``S`` tail draws are well defined."""
        n = self.n_points
        if k < 1 or samples < 0:
            raise MapaError(f"MAPA needs k >= 1 and S >= 0, got k={k}, S={samples}")
        if samples == 0 and k > n:
            raise MapaError(f"k={k} is larger than the number of training points N={n}")
        if samples > 0 and k + samples > n - 1:
            raise MapaError(
                f"k + S = {k + samples} is larger than N - 1 = {n - 1} training points; "
                "lower k or S (k = N with S = 0 gives the exact likelihood)"
            )
        if k > self.top_k:
            raise MapaError(f"k={k} exceeds the {self.top_k} neighbours stored; rebuild with top_k >= k")

    def top(self, rows: Tensor, k: int) -> Tensor:
        """``B_n(k)`` for each row: ``(B, k)`` indices, the point itself first."""
        return self.index[rows, :k]

    def log_tail_mass(self, rows: Tensor, k: int) -> Tensor:
        """``log Σ_{i ∉ B_n(k)} q(i | n)``, shape ``(B,)``."""
        stored = self.log_q[rows, k:]  # (B, K-k)
        return torch.logaddexp(torch.logsumexp(stored, -1), self.log_rest[rows])

    def sample_tail(
        self, rows: Tensor, k: int, samples: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``i^(s) ~ q̃_k(· | n)`` i.i.d. with replacement (Eq. 9).

        Returns indices ``(B, S)`` and their ``log q̃_k(i^(s) | n)`` ``(B, S)``.
        """
        b, n, kk = rows.shape[0], self.n_points, self.top_k
        log_stored = self.log_q[rows, k:]  # (B, K-k)
        log_rest = self.log_rest[rows, None]  # (B, 1)
        logits = torch.cat([log_stored, log_rest], -1)  # (B, K-k+1): last column is "unstored"
        log_norm = torch.logsumexp(logits, -1, keepdim=True)  # (B, 1) = log tail mass
        probs = torch.exp(logits - log_norm)
        col = torch.multinomial(probs, samples, replacement=True, generator=generator)  # (B, S)
        log_tilde = torch.gather(logits, 1, col) - log_norm  # (B, S)
        rest = col == kk - k
        safe_col = col.clamp_max(kk - k - 1) + k
        idx = torch.gather(self.index[rows], 1, safe_col) if kk > k else torch.zeros_like(col)
        if kk < n and bool(rest.any()):
            # The r-th index (0-based) not among a row's stored K is r + #{j: s_j - j <= r},
            # with s the row's sorted stored indices.
            stored_sorted = torch.sort(self.index[rows], -1).values  # (B, K)
            shifted = stored_sorted - torch.arange(kk, device=rows.device)  # (B, K)
            r = torch.randint(0, n - kk, (b, samples), generator=generator, device=rows.device)
            unstored = r + torch.searchsorted(shifted, r, right=True)
            idx = torch.where(rest, unstored, idx)
            log_tilde = torch.where(rest, log_tilde - math.log(n - kk), log_tilde)
        return idx, log_tilde

    def dense(self) -> Tensor:
        """The full ``(N, N)`` matrix of ``log q`` (tests and figures; only when ``K = N``)."""
        if self.top_k != self.n_points:
            raise ValueError("dense() needs the full posterior (top_k = N)")
        out = torch.full((self.n_points, self.n_points), -math.inf, dtype=self.log_q.dtype)
        return out.scatter_(1, self.index, self.log_q)


def compute_posterior(
    data: Tensor,
    kernel: Kernel,
    top_k: int | None = None,
    block_size: int = 1024,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    rows: slice | tuple[int, int] | None = None,
) -> MapaPosterior:
    """Exact top-``K`` MAPA posterior of ``data`` ``(N, D)``, in row blocks on ``device``.

    Each block of ``b`` queries builds one ``(b, N)`` log-kernel matrix, normalizes it by its
    row log-sum-exp, keeps the ``K`` largest entries (the point itself forced first) and the
    log-sum-exp of the rest. The Gaussian and Bernoulli kernels are affine in one matrix
    product (:func:`mapa_vae.neighbours.search_form`), so a block is a single ``addmm``.

    A block holds at most 2²⁷ entries (1 GiB in float64): ``block_size`` is capped at
    ``2²⁷ // N`` rows, so memory stays ``O(N · K)`` plus one block, at any ``N``.

    ``rows`` (a ``slice`` or ``(start, stop)``) computes only those rows, ``(stop - start, K)``,
    against all ``N`` atoms: shards from several processes or devices concatenate
    (:func:`mapa_vae.neighbours.concat_rows`) to the full table, bit for bit when every shard
    starts at a multiple of the (capped) block size. A shard is a table, not a usable posterior.
    """
    n = data.shape[0]
    k_keep = default_top_k(n) if top_k is None else min(int(top_k), n)
    if k_keep < 1:
        raise MapaError(f"top_k must be >= 1, got {top_k}")
    if isinstance(rows, slice):
        start, stop, step = rows.indices(n)
        if step != 1:
            raise MapaError(f"rows must be a contiguous range, got step {step}")
    else:
        start, stop = (0, n) if rows is None else (max(int(rows[0]), 0), min(int(rows[1]), n))
    block_size = max(1, min(block_size, (1 << 27) // max(n, 1)))
    x = data.to(device=device, dtype=dtype)
    from .neighbours import search_form  # neighbours builds on this module

    form = search_form(kernel, x)
    if form is None:
        log_k_of: Callable[[Tensor], Tensor] = lambda xb: kernel.log_kernel(xb, x)  # noqa: E731
    else:  # one (b, N) buffer for every block: a fresh one costs page faults worth ~10 % of the matmul
        buf = torch.empty(min(block_size, max(stop - start, 0)), n, dtype=dtype, device=device)
        log_k_of = lambda xb: form.block(xb, out=buf[: xb.shape[0]])  # noqa: E731
    return _blocked_top_k(log_k_of, x, k_keep, block_size, dtype, rows=(start, max(start, stop)))


def _blocked_top_k(
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


def uniform_posterior(n: int, top_k: int | None = None, dtype: torch.dtype = torch.float64) -> MapaPosterior:
    """MAPA-naive's proposal (SPEC §5): ``q(i | n) = 1 / N`` for every ``i``.

    Row ``n`` stores ``n, n+1, …`` (mod ``N``), the point itself first so that ``B_n(1) = {n}``;
    any fixed order is as good as another when all ``q`` tie. With ``top_k < N`` (default
    :func:`default_top_k`) the other ``N - K`` indices share the leftover mass ``(N - K) / N``,
    which the tail sampler spreads uniformly: the proposal stays exactly uniform.

    >>> post = uniform_posterior(4)
    >>> post.index[1].tolist(), post.log_q[1].exp().tolist()
    ([1, 2, 3, 0], [0.25, 0.25, 0.25, 0.25])
    """
    k_keep = default_top_k(n) if top_k is None else min(int(top_k), n)
    if n < 1 or k_keep < 1:
        raise MapaError(f"a uniform posterior needs N >= 1 and top_k >= 1, got N={n}, top_k={top_k}")
    index = (torch.arange(n)[:, None] + torch.arange(k_keep)) % n  # (N, K)
    log_q = torch.full((n, k_keep), -math.log(n), dtype=dtype)
    rest = math.log((n - k_keep) / n) if k_keep < n else -math.inf
    return MapaPosterior(log_q, index, torch.full((n,), rest, dtype=dtype))


@torch.no_grad()
def ground_truth_posterior(
    x: Tensor, z_true: Tensor, decoder: Decoder, top_k: int | None = None, block_size: int = 1024
) -> MapaPosterior:
    """MAPA-GT's proposal (paper Eq. 7, SPEC §5): the true posterior of the empiricalized
    ground-truth model, whose atoms are the true codes ``z_i`` of the training points ``x_i``:

    ``p(i | x_n) = p(x_n | f_GT(z_i)) / Σ_j p(x_n | f_GT(z_j))``.

    ``x`` ``(N, D)`` and ``z_true`` ``(N, L)`` are the training points and their codes, ``decoder``
    the ground truth's. Computed in float64 log space in row blocks of ``(b, N)``; the table keeps
    ``top_k`` entries per row (default :func:`default_top_k`: all ``N`` for small data), sorted
    descending except that ``n`` itself is first, as :func:`compute_posterior` stores them.
    """
    if x.shape[0] != z_true.shape[0]:
        raise MapaError(f"{x.shape[0]} points but {z_true.shape[0]} true codes were given")
    n = x.shape[0]
    k_keep = default_top_k(n) if top_k is None else min(int(top_k), n)
    if k_keep < 1:
        raise MapaError(f"top_k must be >= 1, got {top_k}")
    dec = copy.deepcopy(decoder).double()
    params = dec.net(z_true.double())  # (N, D')
    return _blocked_top_k(
        lambda xb: dec.likelihood.pairwise_log_prob(params, xb), x.double(), k_keep, block_size,
        torch.float64,
    )


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
    resolved index settings (:func:`mapa_vae.neighbours.build_posterior`; ``"auto"`` is keyed as
    the engine it picks, so an exact pick shares the exact cache). The file stores a digest of
    its own arrays; a truncated, corrupt or mismatching file is rebuilt. A file lock makes
    concurrent builders of the same cache compute it once. Returns the posterior and whether it
    came from the cache.
    """
    from .neighbours import build_posterior, cache_params  # neighbours builds on this module

    n = data.shape[0]
    k_keep = default_top_k(n) if top_k is None else min(int(top_k), n)
    engine_key = cache_params(n, data[0].numel(), k_keep, engine, device, **index_params)
    key = _cache_key(data, kernel, k_keep, dtype, engine_key)
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"posterior-{key[:32]}.npz"
    with FileLock(str(path) + ".lock"):
        loaded = _load_cache(path, key)
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
    return post, False


def _load_cache(path: Path, key: str) -> MapaPosterior | None:
    """The cached posterior if the file exists, reads cleanly and its digests match, else None."""
    if not path.exists():
        return None
    try:
        with path.open("rb") as fh, np.load(fh, allow_pickle=False) as f:
            arrays = {name: f[name] for name in ("log_q", "index", "log_rest")}
            stored_key, _, stored_digest = bytes(f["meta"]).decode().partition(":")
    except Exception:  # truncated zip, bad CRC, missing member: rebuild
        return None
    if stored_key != key or stored_digest != _arrays_digest(arrays):
        return None
    return MapaPosterior(*(torch.from_numpy(arrays[k]) for k in ("log_q", "index", "log_rest")))
