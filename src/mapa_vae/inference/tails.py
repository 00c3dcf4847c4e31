"""Tail proposals for the MAPA bound: where its ``S`` tail draws come from (Eq. 9–10, docs/design.md §3).

The MAPA bound of point ``n`` is ``log( Σ_{i∈B_n(k)} p(x_n | f(g(x_i))) + T̂_n ) - log N``,
with ``T̂_n`` an unbiased, non-negative estimate of the tail sum
``T_n = Σ_{i∉B_n(k)} p(x_n | f(g(x_i)))``. By Jensen, ``E log(top + T̂_n) ≤ log(top + T_n)``,
so the bound holds in expectation for **any** proposal with full support on the tail. A tail
proposal returns, for a batch of rows ``(B,)``, the drawn atoms ``(B, S)`` and the log-weight
offsets ``(B, S)`` such that ``T̂_n = Σ_s exp(log p(x_n | f(g(x_{i_ns}))) + offset_ns)``:

- :class:`PerPointTail` (the paper's): each point draws its own ``S`` atoms,
  ``i_ns ~ q̃_k(· | n)``, offset ``-log q̃_k(i_ns | n) - log S``. The batch touches up to
  ``B·S`` distinct atoms, so at large ``N`` the network passes grow with ``B·S``.
- :class:`SharedTail`: the batch shares ``S`` draws ``i_s ~ r`` from one proposal, the mixture
  of its points' tail proposals with a uniform floor,

      r(i) = (1 - ε) (1/B) Σ_{m∈batch} q̃_k(i | m) + ε / N,

  and every point scores every draw: ``T̂_n = (1/S) Σ_s 1[i_s ∉ B_n(k)] p(x_n|f(g(x_{i_s}))) / r(i_s)``.
  It is unbiased, ``E T̂_n = Σ_i r(i) 1[i ∉ B_n(k)] p_n(i) / r(i) = T_n``, because ``r(i) ≥ ε/N
  > 0`` everywhere (the floor keeps the support full). The network passes now grow with the
  batch's unique atoms (the union of the ``B_n(k)`` plus ``S``), not with ``B·S``; the
  likelihood of all ``B·S`` (point, draw) pairs is still scored, which is cheap next to a pass.
  Its variance is the price: ``r(i) ≥ (1-ε) q̃_k(i | n) / B``, so a point's importance ratio is
  at most ``B / (1-ε)`` times its own proposal's; it is small when the batch's points are near
  each other (their proposals overlap: see :mod:`mapa_vae.training.batching`) and large for a
  batch of strangers.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..registry import TAILS
from .posterior import MapaPosterior

__all__ = ["PerPointTail", "SharedTail", "TailProposal", "TailTable", "make_tail"]


class TailProposal(ABC):
    """Where the MAPA bound's ``S`` tail draws come from, and their importance weights."""

    @abstractmethod
    def draw(self, posterior: MapaPosterior, rows: Tensor, k: int, samples: int,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Atoms ``(B, S)`` and offsets ``(B, S)`` (``-inf`` for a draw a row must skip)."""


@TAILS.register("per-point")
class PerPointTail(TailProposal):
    """Each point's own ``S`` i.i.d. draws from ``q̃_k(· | n)`` (Eq. 9), the paper's estimator.

    The posterior is fixed during training, so every point's sampler (:class:`TailTable`) is
    built once for a posterior and ``k`` and kept; a draw is then a lookup.

    >>> from mapa_vae.inference.posterior import uniform_posterior
    >>> idx, off = PerPointTail().draw(uniform_posterior(10), torch.tensor([0, 5]), 2, 3)
    >>> idx.shape, round(float(off[0, 0]), 4) == round(math.log(8 / 3), 4)
    (torch.Size([2, 3]), True)
    """

    def __init__(self) -> None:
        self.table: TailTable | None = None

    def draw(self, posterior: MapaPosterior, rows: Tensor, k: int, samples: int,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if self.table is None or self.table.posterior is not posterior or self.table.k != k:
            self.table = TailTable(posterior, k)
        idx, log_q = self.table.sample(rows, samples, generator)  # (B, S) each
        return idx, -log_q - math.log(samples)


class TailTable:
    """Every point's tail sampler for ``q̃_k(· | n)``, built once (``O(N·K)`` memory).

    Row ``n``'s tail has ``W = K - k + 1`` outcomes: the stored columns ``k … K-1`` with mass
    ``q(i | n)``, and one more, "not stored", with the leftover mass ``exp(log_rest[n])``,
    spread uniformly over the ``N - K`` atoms not stored. The table keeps each row's cumulative
    masses ``(N, W)`` (float64, normalized) and, when ``K < N``, its stored indices sorted and
    shifted ``(N, K)``; :meth:`sample` then draws by inverse transform, ``u ~ U[0, 1)`` and a
    binary search per draw, where :meth:`MapaPosterior.sample_tail` re-derives the row's
    normalized masses (a log-sum-exp over ``K``) at every call. Same distribution, same log
    densities; other draws from the same generator.
    """

    def __init__(self, posterior: MapaPosterior, k: int) -> None:
        self.posterior, self.k = posterior, k
        n, kk = posterior.n_points, posterior.top_k
        logits = torch.cat([posterior.log_q[:, k:], posterior.log_rest[:, None]], -1)  # (N, W)
        self.log_norm = torch.logsumexp(logits, -1, keepdim=True)  # (N, 1): log tail mass
        cdf = torch.cumsum(torch.exp((logits - self.log_norm).double()), -1)  # (N, W)
        self.cdf = cdf / cdf[:, -1:]  # the last entry exactly 1: u < 1 always lands in a row
        self.shifted: Tensor | None = None
        if kk < n:
            # The r-th index (0-based) not among a row's stored K is r + #{j: s_j - j <= r},
            # with s the row's sorted stored indices.
            stored_sorted = torch.sort(posterior.index, -1).values  # (N, K)
            self.shifted = stored_sorted - torch.arange(kk, device=stored_sorted.device)

    def sample(self, rows: Tensor, samples: int,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``samples`` draws ``i ~ q̃_k(· | n)`` per row ``(B,)``, with replacement (Eq. 9):
        indices ``(B, S)`` and their ``log q̃_k(i | n)`` ``(B, S)``."""
        post, k = self.posterior, self.k
        b, n, kk = rows.shape[0], post.n_points, post.top_k
        u = torch.rand(b, samples, generator=generator, dtype=torch.float64, device=rows.device)
        col = torch.searchsorted(self.cdf[rows], u, right=True)  # (B, S), in [0, W)
        stored = col < kk - k
        rest = post.log_rest[rows, None] - (math.log(n - kk) if kk < n else 0.0)  # (B, 1)
        if kk > k:
            at = (rows[:, None], col.clamp_max(kk - k - 1) + k)  # (B, S) cells of the table
            log_q = torch.where(stored, post.log_q[at], rest)
            idx = post.index[at]
        else:  # nothing stored past B_n(k): every draw is an unstored atom
            log_q, idx = rest.expand(b, samples), torch.zeros_like(col)
        if self.shifted is not None and not bool(stored.all()):
            r = torch.randint(0, n - kk, (b, samples), generator=generator, device=rows.device)
            unstored = r + torch.searchsorted(self.shifted[rows], r, right=True)
            idx = torch.where(stored, idx, unstored)
        return idx, log_q - self.log_norm[rows]


@TAILS.register("shared")
class SharedTail(TailProposal):
    """``S`` draws shared by the batch from ``r = (1-ε)·mean of q̃_k(·|m) + ε·uniform``.

    ``floor`` is ``ε``. Each draw picks a batch row ``m`` uniformly and then ``i ~ q̃_k(· | m)``,
    or with probability ``ε`` a uniform atom; ``r(i)`` is then evaluated exactly from the
    posterior table for every draw (``(B, S)`` lookups). Draws inside a row's own ``B_n(k)``
    get offset ``-inf`` for that row (they are already counted exactly).

    >>> from mapa_vae.inference.posterior import uniform_posterior
    >>> idx, off = SharedTail().draw(uniform_posterior(10), torch.tensor([0, 5]), 2, 4)
    >>> bool((idx[0] == idx[1]).all()), bool(torch.isinf(off[0, idx[0] < 2]).all())
    (True, True)
    """

    def __init__(self, floor: float = 0.05) -> None:
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"the uniform floor must lie in (0, 1], got {floor}")
        self.floor = floor

    def draw(self, posterior: MapaPosterior, rows: Tensor, k: int, samples: int,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        b, n, dev = rows.shape[0], posterior.n_points, rows.device
        comp = torch.randint(0, b, (samples,), generator=generator, device=dev)  # (S,)
        own, _ = posterior.sample_tail(rows[comp], k, 1, generator)  # (S, 1)
        uniform = torch.randint(0, n, (samples,), generator=generator, device=dev)
        pick_uniform = torch.rand(samples, generator=generator, device=dev) < self.floor
        draws = torch.where(pick_uniform, uniform, own[:, 0])  # (S,)
        log_tail = posterior.log_tail_prob(rows, k, draws)  # (B, S): log q̃_k(i_s | m)
        log_mix = torch.logsumexp(log_tail, 0) - math.log(b)  # (S,)
        log_r = torch.logaddexp(log_mix + math.log1p(-self.floor) if self.floor < 1 else
                                torch.full_like(log_mix, -math.inf),
                                torch.full_like(log_mix, math.log(self.floor / n)))  # (S,)
        top = posterior.top(rows, k)  # (B, k)
        inside = (top[:, :, None] == draws[None, None, :]).any(1)  # (B, S): i_s ∈ B_n(k)
        offset = (-log_r - math.log(samples)).expand(b, -1)  # (B, S)
        offset = torch.where(inside, torch.full_like(offset, -math.inf), offset)
        return draws.expand(b, -1), offset


def make_tail(name: str) -> TailProposal:
    """The tail proposal registered as ``name`` (:data:`~mapa_vae.registry.TAILS`)."""
    return TAILS[name]()
