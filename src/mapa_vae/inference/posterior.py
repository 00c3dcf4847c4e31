"""The MAPA posterior over data-point indices, ``q(i | n)`` (paper Eq. 8, docs/design.md §2–3).

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

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import MapaError

__all__ = ["MapaPosterior", "default_top_k", "leave_one_out", "resolve_top_k", "uniform_posterior"]


CACHE_FORMAT = 1



DENSE_LIMIT = 2048  # below this many points, keep the full posterior (K = N) by default



SPARSE_K = 512



def default_top_k(n: int) -> int:
    """``N`` for small data (exact tail), else 512 neighbours per point."""
    return n if n <= DENSE_LIMIT else SPARSE_K


def resolve_top_k(n: int, top_k: int | None) -> int:
    """``K``, the entries stored per row: ``top_k`` (at most ``N``), or :func:`default_top_k`.

    >>> resolve_top_k(100, None), resolve_top_k(5000, None), resolve_top_k(100, 300)
    (100, 512, 100)
    """
    k_keep = default_top_k(n) if top_k is None else min(int(top_k), n)
    if k_keep < 1:
        raise MapaError(f"top_k must be >= 1, got {top_k}")
    return k_keep



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
            raise MapaError(f"MAPA needs k >= 1 (--k) and S >= 0 (--samples), got k={k}, S={samples}")
        if samples == 0 and k > n:
            raise MapaError(f"k={k} (--k) is larger than the number of training points N={n}")
        if samples > 0 and k + samples > n - 1:
            raise MapaError(
                f"k + S = {k + samples} is larger than N - 1 = {n - 1} training points; lower "
                "--samples (S) or --k (k, by default 10 % of S); --k N with --samples 0 gives the "
                "exact likelihood"
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

    def log_tail_prob(self, rows: Tensor, k: int, idx: Tensor) -> Tensor:
        """``log q̃_k(i | n)`` for every row ``n`` of ``rows`` ``(B,)`` and atom ``i`` of ``idx``.

        ``idx`` is ``(S,)`` (the same atoms for every row) or ``(B, S)``; returns ``(B, S)``:
        ``-inf`` inside ``B_n(k)``, ``log q(i|n) - log Σ_{j∉B_n(k)} q(j|n)`` on the stored tail,
        and the leftover mass spread uniformly, ``log_rest - log(N - K)`` minus the same
        normalizer, on the atoms not stored: the density :meth:`sample_tail` draws from.
        """
        b, n, kk = rows.shape[0], self.n_points, self.top_k
        idx = (idx.expand(b, -1) if idx.dim() == 1 else idx).contiguous()  # (B, S)
        sorted_idx, order = torch.sort(self.index[rows], -1)  # (B, K) each
        pos = torch.searchsorted(sorted_idx, idx).clamp_max(kk - 1)  # (B, S)
        found = torch.gather(sorted_idx, 1, pos) == idx
        col = torch.gather(order, 1, pos)  # the matched column of the row's table
        log_q = torch.gather(self.log_q[rows], 1, col)  # (B, S)
        log_q = torch.where(col < k, torch.full_like(log_q, -math.inf), log_q)
        if kk < n:
            unstored = self.log_rest[rows, None] - math.log(n - kk)  # (B, 1)
            log_q = torch.where(found, log_q, unstored.expand_as(log_q))
        return log_q - self.log_tail_mass(rows, k)[:, None]

    def dense(self) -> Tensor:
        """The full ``(N, N)`` matrix of ``log q`` (tests and figures; only when ``K = N``)."""
        if self.top_k != self.n_points:
            raise ValueError("dense() needs the full posterior (top_k = N)")
        out = torch.full((self.n_points, self.n_points), -math.inf, dtype=self.log_q.dtype)
        return out.scatter_(1, self.index, self.log_q)



def leave_one_out(post: MapaPosterior) -> MapaPosterior:
    """``q(i | n)`` with ``i = n`` removed and the rest renormalized: ``B_n(k)`` becomes the ``k``
    nearest *other* points.

    The point itself moves from column 0 to the last column with ``log q = -inf``, so it is still
    "stored" (never drawn from the leftover mass, which stays on the ``N - K`` unstored indices)
    but has no mass. Any proposal gives a lower bound on the empiricalized log-likelihood (a term
    left out of Eq. 6's sum only lowers it), so MAPA with this ``q`` still bounds ``log p(x_n)``,
    now by how well the *other* atoms explain ``x_n``: the leave-one-out likelihood that chooses
    a kernel density's bandwidth, here training the decoder to be smooth between codes.

    >>> post = leave_one_out(uniform_posterior(4))
    >>> post.index[1].tolist(), [round(v, 4) for v in post.log_q[1].exp().tolist()]
    ([2, 3, 0, 1], [0.3333, 0.3333, 0.3333, 0.0])
    """
    if post.top_k < 2:
        raise MapaError("a leave-one-out posterior needs at least 2 stored neighbours per point")
    others = post.log_q[:, 1:]  # (N, K-1)
    log_norm = torch.logaddexp(torch.logsumexp(others, -1), post.log_rest)  # (N,): 1 - q(n | n)
    log_q = torch.cat([others - log_norm[:, None], torch.full_like(post.log_q[:, :1], -math.inf)], 1)
    index = torch.cat([post.index[:, 1:], post.index[:, :1]], 1)
    return MapaPosterior(log_q, index, post.log_rest - log_norm)


def uniform_posterior(n: int, top_k: int | None = None, dtype: torch.dtype = torch.float64) -> MapaPosterior:
    """MAPA-naive's proposal (docs/design.md §5): ``q(i | n) = 1 / N`` for every ``i``.

    Row ``n`` stores ``n, n+1, …`` (mod ``N``), the point itself first so that ``B_n(1) = {n}``;
    any fixed order is as good as another when all ``q`` tie. With ``top_k < N`` (default
    :func:`default_top_k`) the other ``N - K`` indices share the leftover mass ``(N - K) / N``,
    which the tail sampler spreads uniformly: the proposal stays exactly uniform.

    >>> post = uniform_posterior(4)
    >>> post.index[1].tolist(), post.log_q[1].exp().tolist()
    ([1, 2, 3, 0], [0.25, 0.25, 0.25, 0.25])
    """
    if n < 1:
        raise MapaError(f"a uniform posterior needs N >= 1, got N={n}")
    k_keep = resolve_top_k(n, top_k)
    if k_keep < 1:
        raise MapaError(f"a uniform posterior needs N >= 1 and top_k >= 1, got N={n}, top_k={top_k}")
    index = (torch.arange(n)[:, None] + torch.arange(k_keep)) % n  # (N, K)
    log_q = torch.full((n, k_keep), -math.log(n), dtype=dtype)
    rest = math.log((n - k_keep) / n) if k_keep < n else -math.inf
    return MapaPosterior(log_q, index, torch.full((n,), rest, dtype=dtype))

