"""The MAPA bound with a learned index proposal ``q_φ(i | x_n)`` (the learned-proposal test).

MAPA proposes atoms from a fixed kernel posterior (paper Eq. 8). Here the proposal is amortized
and trained: for point ``n`` with candidates ``C_n`` (the kernel table's first ``C`` atoms, the
point itself among them) and scores ``s_φ(n, i)``
(:class:`~mapa_vae.models.index_proposal.IndexProposalNet`),

    q_φ(i | n) = (1 − ε) · π_φ(i | n) + ε / N,      π_φ(i | n) = softmax_{j∈C_n} s_φ(n, j)  (0 off C_n).

It goes into the MAPA bound exactly where the kernel's ``q`` went (Eq. 10): ``B_n(k)`` is the
top ``k`` of ``q_φ(· | n)`` and the ``S`` tail draws come i.i.d. from ``q̃_φ,k`` (``q_φ`` with
``B_n(k)`` removed, renormalized)::

    L(x_n) = log( Σ_{i∈B_n(k)} p_n(i) + (1/S) Σ_s p_n(i_s) / q̃_φ,k(i_s | n) ) − log N,
    p_n(i) = p(x_n | f(g(x_i))).

**Why it stays a lower bound.** ``T̂_n = (1/S) Σ_s p_n(i_s) / q̃(i_s)`` is unbiased for the tail
sum ``Σ_{i∉B_n(k)} p_n(i)`` for any proposal that is positive on the whole tail, and the floor
makes ``q̃_φ,k(i | n) ≥ ε / N > 0`` for every ``i ∉ B_n(k)`` whatever ``φ`` is; by Jensen,
``E L(x_n) ≤ log (1/N) Σ_i p_n(i)``, the empiricalized log-likelihood (Eq. 6). ``ε`` also caps
every importance ratio at ``N / ε`` times ``p_n``.

**Which gradient each parameter gets.** The draws depend on ``φ`` only, so the encoder and
decoder get the plain autodiff gradient of ``L`` at the drawn atoms, unbiased for
``∇ E[L]`` as in MAPA. ``φ`` gets a score-function estimator: with ``log q̃_s = log q̃_φ,k(i_s | n)``,
``∇_φ E[L] = E[ Σ_s A_s ∇_φ log q̃_s + ∇_φ L |_{i fixed} ]`` for any ``A_s = L − c_s`` with ``c_s``
independent of ``i_s``; the second term is ``L``'s own gradient through the ``1/q̃`` weights.
``B_n(k)`` is chosen by ranking, constant in ``φ`` between rank swaps, so this is the gradient of
the expected bound wherever the ranking does not change (almost everywhere). The signal ``A_s``:

- ``signal="vimco"`` (Mnih & Rezende 2016, ``S ≥ 2``): ``A_s = L − L^{(−s)}``, ``L^{(−s)}`` the
  bound with ``w_s = p_n(i_s)/q̃_s`` replaced by the geometric mean of the other draws' weights
  (:func:`~mapa_vae.inference.score_function.leave_one_out_bounds`, stable when one weight
  dominates). Unbiased.
- ``signal="nvil"`` (Mnih & Gregor 2014): ``A_s = (L − b_ψ(x_n) − c) / max(1, σ)`` for every
  draw, with ``b_ψ`` a learned input-dependent baseline trained by the squared error
  ``(L − c − b_ψ(x_n))²`` (carried by the surrogate, it trains ``ψ`` only), ``c`` and ``σ²`` the
  running mean and variance of ``L − b_ψ(x_n)`` (updated in training mode, fixed in eval mode).
  With ``S = 1`` this is NVIL's single-sample estimator; with ``S > 1`` the draws share the
  signal. Centring keeps it unbiased; dividing by ``max(1, σ)`` scales the score term only (an
  adaptive step size, as in NVIL), so the estimator is unbiased for ``∇_φ E[L]`` exactly while
  ``σ ≤ 1`` and in eval mode with ``var ≤ 1``.

Passes: the encoder and decoder run once per unique atom of the batch's ``B_n(k)`` and draws,
as :class:`~mapa_vae.inference.objectives.MAPA` with ``reuse=True``, so at the same ``k`` and
``S`` both cost the same decoder passes. The scorer's ``B·C`` rows (pairs of data points, no
decoder) are counted apart in :attr:`LearnedMAPA.proposal_rows`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import MapaError
from ..models.index_proposal import IndexProposalNet
from ..models.latent import LatentVariableModel
from .objectives import Bound, Objective
from .posterior import MapaPosterior
from .score_function import SIGNALS, leave_one_out_bounds

__all__ = ["CANDIDATES", "FLOOR", "SIGNALS", "LearnedMAPA", "ProposalRows", "proposal_net"]

CANDIDATES = 64  # candidates per point: at least this many, and at least k + S (≤ the table's K)
FLOOR = 0.05  # ε, the uniform floor's mass
_LOG_KERNEL_MIN = -1e4  # a kernel log-probability that underflowed stays finite as a feature


class ProposalRows(NamedTuple):
    """``q_φ(· | n)`` of a batch: candidate atoms ``(B, C)``, ``log π_φ`` and ``log q_φ`` on them
    ``(B, C)`` each (with gradient), the columns of ``B_n(k)`` ``(B, k)``, ``B_n(k)`` itself
    ``(B, k)`` and ``log(1 − q_φ(B_n(k) | n))`` ``(B,)``, the log-normalizer of the tail proposal."""

    candidates: Tensor
    log_pi: Tensor
    log_q: Tensor
    top_cols: Tensor
    top: Tensor
    log_tail_mass: Tensor


def proposal_net(model: LatentVariableModel) -> IndexProposalNet:
    """The model's learned proposal ``φ``, or a one-line error."""
    net = getattr(model, "index_proposal", None)
    if not isinstance(net, IndexProposalNet):
        raise MapaError("a learned index proposal needs a MAPA model built with --posterior "
                        "learned-nvil or learned-vimco (it has no index_proposal)")
    return net


class LearnedMAPA(Objective):
    """The MAPA bound with ``q_φ(i | n)`` in place of the kernel's ``q(i | n)`` (module doc).

    ``table`` is the kernel posterior whose first ``C`` entries per row are the candidates
    (``C = min(K, max(candidates, k + S))``); ``atoms`` ``(N, D)`` the training points.
    """

    def __init__(self, table: MapaPosterior, atoms: Tensor, k: int, samples: int, signal: str,
                 candidates: int = CANDIDATES, floor: float = FLOOR, momentum: float = 0.8,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        table.check_budget(k, samples)
        if signal not in SIGNALS:
            raise MapaError(f"unknown proposal signal {signal!r}; choose from {', '.join(SIGNALS)}")
        if signal == "vimco" and samples < 2:
            raise MapaError(f"a VIMCO-trained proposal needs at least two tail draws (--samples), "
                            f"got {samples}")
        if signal == "nvil" and samples < 1:
            raise MapaError("an NVIL-trained proposal needs at least one tail draw (--samples)")
        if atoms.shape[0] != table.n_points:
            raise ValueError(f"table has {table.n_points} points but {atoms.shape[0]} atoms were given")
        if table.top_k <= k:
            raise MapaError(f"a learned proposal re-ranks the table's K={table.top_k} stored "
                            f"neighbours, which must exceed k={k}; raise --top-k")
        if not 0.0 < floor < 1.0:
            raise ValueError(f"the uniform floor must lie in (0, 1), got {floor}")
        c = min(table.top_k, max(candidates, k + samples))
        self.candidates = table.index[:, :c].to(atoms.device)  # (N, C)
        self.log_kernel = table.log_q[:, :c].to(atoms.device, atoms.dtype).clamp(min=_LOG_KERNEL_MIN)
        self.atoms = atoms
        self.n = atoms.shape[0]
        self.k, self.samples, self.signal = k, samples, signal
        self.floor, self.momentum, self.generator = floor, momentum, generator
        self.proposal_rows = 0

    # --------------------------------------------------------------- q_φ and its tail
    def proposal(self, model: LatentVariableModel, index: Tensor) -> ProposalRows:
        """``q_φ(· | n)`` on the candidates of the points ``index`` ``(B,)``, and ``B_n(k)``."""
        net = proposal_net(model)
        cand = self.candidates[index]  # (B, C)
        scores = net(self.atoms[index], self.atoms[cand], self.log_kernel[index])  # (B, C)
        self.proposal_rows += cand.numel()
        log_pi = F.log_softmax(scores, -1)
        log_q = torch.logaddexp(log_pi + math.log1p(-self.floor),
                                torch.full_like(scores, math.log(self.floor / self.n)))
        top_cols = log_q.detach().topk(self.k, -1).indices  # (B, k): top k of q_φ are candidates
        top = torch.gather(cand, 1, top_cols)
        log_top = torch.logsumexp(torch.gather(log_q, 1, top_cols), -1)  # (B,)
        log_tail_mass = torch.log(-torch.expm1(log_top))  # log(1 − q_φ(B_n(k) | n))
        return ProposalRows(cand, log_pi, log_q, top_cols, top, log_tail_mass)

    def log_prob(self, rows: ProposalRows, idx: Tensor) -> Tensor:
        """``log q_φ(i | n)`` ``(B, S)`` for atoms ``idx`` ``(B, S)`` (with gradient)."""
        hit = rows.candidates[:, None, :] == idx[:, :, None]  # (B, S, C)
        pi = torch.exp(rows.log_q)  # (B, C): q_φ on the candidates (floor included)
        on_cand = (hit * pi[:, None, :]).sum(-1)  # (B, S)
        floor = torch.full_like(on_cand, self.floor / self.n)
        return torch.log(torch.where(hit.any(-1), on_cand, floor))

    def log_tail_prob(self, rows: ProposalRows, idx: Tensor) -> Tensor:
        """``log q̃_φ,k(i | n)`` ``(B, S)`` for atoms ``idx`` ``(B, S)``; ``-inf`` inside ``B_n(k)``."""
        inside = (rows.top[:, None, :] == idx[:, :, None]).any(-1)  # (B, S)
        log_q = self.log_prob(rows, idx) - rows.log_tail_mass[:, None]
        return torch.where(inside, torch.full_like(log_q, -math.inf), log_q)

    def sample_tail(self, rows: ProposalRows, samples: int) -> Tensor:
        """``samples`` i.i.d. atoms ``(B, S)`` from ``q̃_φ,k(· | n)``: a candidate outside
        ``B_n(k)`` by ``π_φ`` with probability ``(1−ε)(1 − π_φ(B_n(k)))``, else (the floor's
        ``ε (N−k)/N``) a uniform atom outside ``B_n(k)``; the two masses sum to the tail's."""
        g, dev = self.generator, rows.candidates.device
        b, c, k, n = *rows.candidates.shape, self.k, self.n
        with torch.no_grad():
            pi = torch.exp(rows.log_pi)  # (B, C)
            inside = torch.zeros(b, c, dtype=torch.bool, device=dev).scatter_(1, rows.top_cols, True)
            pi_tail = pi.masked_fill(inside, 0.0)  # (B, C)
            mass_cand = (1 - self.floor) * pi_tail.sum(-1)  # (B,)
            mass_floor = self.floor * (n - k) / n
            p_cand = mass_cand / (mass_cand + mass_floor)  # (B,)
            weights = torch.where(pi_tail.sum(-1, keepdim=True) > 0, pi_tail, (~inside).to(pi.dtype))
            col = torch.multinomial(weights, samples, replacement=True, generator=g)  # (B, S)
            from_cand = torch.gather(rows.candidates, 1, col)
            # the r-th atom (0-based) outside B_n(k): r + #{j: t_j − j ≤ r}, t the sorted B_n(k)
            shifted = torch.sort(rows.top, -1).values - torch.arange(k, device=dev)
            r = torch.randint(0, n - k, (b, samples), generator=g, device=dev)
            uniform = r + torch.searchsorted(shifted, r, right=True)
            pick = torch.rand(b, samples, generator=g, device=dev, dtype=p_cand.dtype) < p_cand[:, None]
            return torch.where(pick, from_cand, uniform)

    # --------------------------------------------------------------- the bound
    def log_likelihoods(self, model: LatentVariableModel, x: Tensor, atom_idx: Tensor) -> Tensor:
        """``log p(x_n | f(g(x_i)))`` ``(B, M)`` for atoms ``atom_idx`` ``(B, M)``, one encoder
        and decoder pass per unique atom."""
        unique, inverse = torch.unique(atom_idx, return_inverse=True)
        params = model.decoder.net(model.encoder(self.atoms[unique]))[inverse]  # (B, M, D')
        self.passes.add(unique.numel(), unique.numel(), x.shape[0])
        return model.decoder.likelihood(params).log_prob(x[:, None, :])

    def bound(self, log_p_top: Tensor, log_p_tail: Tensor, log_q_tail: Tensor) -> Tensor:
        """``L`` ``(B,)`` from ``log p_n`` on ``B_n(k)`` ``(B, k)`` and on the draws ``(B, S)``
        with their ``log q̃`` ``(B, S)``."""
        s = log_p_tail.shape[1]
        terms = torch.cat([log_p_top, log_p_tail - log_q_tail - math.log(s)], -1) if s else log_p_top
        return torch.logsumexp(terms, -1) - math.log(self.n)

    def __call__(self, model: LatentVariableModel, x: Tensor, index: Tensor) -> Bound:
        rows = self.proposal(model, index)
        draws = self.sample_tail(rows, self.samples)  # (B, S)
        log_q_tail = self.log_tail_prob(rows, draws)  # (B, S), gradient to φ
        log_p = self.log_likelihoods(model, x, torch.cat([rows.top, draws], 1))  # (B, k+S)
        log_p_top, log_p_tail = log_p[:, : self.k], log_p[:, self.k :]
        value = self.bound(log_p_top, log_p_tail, log_q_tail)  # (B,): θ, ψ and φ's direct term
        score, baseline_loss = self._signal(model, x, value, log_p_top, log_p_tail, log_q_tail)
        surrogate = value + (score * log_q_tail).sum(-1) - baseline_loss
        return Bound(value.detach(), surrogate)

    def _signal(self, model: LatentVariableModel, x: Tensor, value: Tensor, log_p_top: Tensor,
                log_p_tail: Tensor, log_q_tail: Tensor) -> tuple[Tensor, Tensor]:
        """The score weights ``A_s`` ``(B, S)`` (detached) and the baseline's loss ``(B,)``."""
        if self.signal == "vimco":
            with torch.no_grad():
                log_w = (log_p_tail - log_q_tail).T  # (S, B)
                loo = leave_one_out_bounds(log_w)  # (S, B): log (1/S)(Σ_{j≠s} w_j + ŵ_{−s})
                top = torch.logsumexp(log_p_top, -1)  # (B,)
                without = torch.logaddexp(top[None], loo) - math.log(self.n)  # L^{(−s)}
                return (value[None] - without).T, torch.zeros_like(value)
        net = proposal_net(model)
        b = net.baseline_value(x)  # (B,)
        signal = value.detach()
        with torch.no_grad():
            centred = signal - b
            if net.training:
                a = self.momentum
                net.mean.mul_(a).add_((1 - a) * centred.mean())
                net.var.mul_(a).add_((1 - a) * centred.var(unbiased=False))
            weight = (centred - net.mean) / net.var.sqrt().clamp(min=1.0)  # (B,)
        baseline_loss = (signal - net.mean - b).square()  # (B,): trains ψ only
        return weight[:, None].expand(-1, log_q_tail.shape[1]), baseline_loss

    # --------------------------------------------------------------- the whole table
    @torch.no_grad()
    def table(self, model: LatentVariableModel, chunk: int = 1024) -> MapaPosterior:
        """``q_φ(· | n)`` for every training point as a full (``K = N``) :class:`MapaPosterior`,
        the point itself first (for ``KL[p(i | x) ‖ q_φ]`` and figures)."""
        rows_out = []
        for start in range(0, self.n, chunk):
            index = torch.arange(start, min(start + chunk, self.n), device=self.atoms.device)
            rows = self.proposal(model, index)
            dense = torch.full((index.numel(), self.n), math.log(self.floor / self.n),
                               dtype=rows.log_q.dtype, device=self.atoms.device)
            rows_out.append(dense.scatter_(1, rows.candidates, rows.log_q))
        log_q = torch.cat(rows_out).cpu()  # (N, N)
        n = torch.arange(self.n)
        order = torch.argsort(log_q, -1, descending=True)
        order = torch.cat([n[:, None], order[order != n[:, None]].reshape(self.n, self.n - 1)], 1)
        return MapaPosterior(torch.gather(log_q, 1, order).double(), order,
                             torch.full((self.n,), -math.inf, dtype=torch.float64))
