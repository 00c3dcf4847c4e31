"""``log p(x)`` of a sigmoid belief network: exact by enumeration, else importance sampling.

With ``N = Σ_l H_l`` latent units in all, ``log p(x) = logsumexp_h log p(x, h)`` over the
``2^N`` joint states (:func:`exact_log_likelihood`, for ``N ≤`` :data:`MAX_EXACT_UNITS`).
Beyond that, :func:`importance_log_likelihood` uses the trained recognition network as the
proposal: ``log p̂(x) = log (1/S) Σ_s p(x, h_s) / q(h_s | x)``, ``h_s ~ q(· | x)``, with the
delta-method standard error ``std_s(w_s / w̄) / √S`` of each point's estimate. For tests,
:func:`exact_bound` is the ``K``-sample bound ``E_q[log (1/K) Σ_k w_k]`` computed exactly by
enumerating all ``2^{N K}`` draws, differentiable in every parameter.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.sbn import SBN

__all__ = [
    "MAX_EXACT_UNITS",
    "SBNLogLikelihood",
    "all_states",
    "exact_bound",
    "exact_log_likelihood",
    "importance_log_likelihood",
    "sbn_log_likelihood",
]

MAX_EXACT_UNITS = 16  # 65 536 joint states: exact evaluation stays a few matrix products


def all_states(model: SBN, dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """Every joint state of the latent units, split by layer: ``[(2^N, H_l)]``."""
    n = model.n_units
    codes = torch.arange(2**n)[:, None]
    bits = codes.bitwise_right_shift(torch.arange(n)).bitwise_and(1).to(dtype)  # (2^N, N)
    return list(bits.split(list(model.layers), dim=1))


@torch.no_grad()
def exact_log_likelihood(model: SBN, x: Tensor, budget: int = 2**22) -> Tensor:
    """``log p(x)`` ``(B,)`` by summing ``p(x, h)`` over all ``2^N`` states, in blocks of states
    and points holding about ``budget`` numbers of ``(states, points, D)`` at a time."""
    p = next(model.parameters())
    x = x.to(p.device, p.dtype)
    states = [s.to(p.device) for s in all_states(model, p.dtype)]
    m, (b, d) = states[0].shape[0], x.shape
    rows = min(b, 256)
    chunk = max(1, budget // (rows * d))
    out = []
    for j in range(0, b, rows):
        xb = x[j : j + rows]
        parts = []
        for i in range(0, m, chunk):
            h = [s[i : i + chunk, None, :] for s in states]  # (M', 1, H_l)
            log_joint = torch.stack(torch.broadcast_tensors(*model.log_joint(xb, h))).sum(0)  # (M', b)
            parts.append(torch.logsumexp(log_joint, 0))
        out.append(torch.logsumexp(torch.stack(parts), 0))
    return torch.cat(out)


def exact_bound(model: SBN, x: Tensor, samples: int = 1) -> Tensor:
    """``E_{h^{1:K} ~ q}[log (1/K) Σ_k w_k]`` ``(B,)`` exactly, over all ``2^{N K}`` draws.

    ``K = 1`` is the ELBO; it is differentiable in the generative and recognition parameters.
    Only for tiny models (``N K ≤ 14`` or so).
    """
    p = next(model.parameters())
    states = all_states(model, p.dtype)
    m = states[0].shape[0]
    h = [s[:, None, :] for s in states]  # (M, 1, H_l)
    log_q = model.log_q(x, h)  # (M, B)
    log_w = torch.stack(torch.broadcast_tensors(*model.log_joint(x, h))).sum(0) - log_q  # (M, B)
    tuples = torch.tensor(list(itertools.product(range(m), repeat=samples)))  # (M^K, K)
    lw, lq = log_w[tuples], log_q[tuples]  # (M^K, K, B)
    bound = torch.logsumexp(lw, 1) - math.log(samples)  # (M^K, B)
    return (lq.sum(1).exp() * bound).sum(0)


@torch.no_grad()
def importance_log_likelihood(model: SBN, x: Tensor, samples: int = 1000,
                              chunk: int = 100) -> tuple[Tensor, Tensor]:
    """Importance-sampled ``log p(x)`` ``(B,)`` with the recognition network as proposal, and
    each estimate's delta-method standard error ``(B,)``. In expectation a lower bound."""
    p = next(model.parameters())
    x = x.to(p.device, p.dtype)
    est, err = [], []
    chunk = max(1, min(chunk, 2**22 // (samples * x.shape[1])))  # (S, chunk, D) stays ~4M numbers
    for i in range(0, x.shape[0], chunk):
        log_w = model.trace(x[i : i + chunk], samples).log_w()  # (S, b)
        lp = torch.logsumexp(log_w, 0) - math.log(samples)  # (b,)
        ratio = (log_w - lp).exp()  # (S, b): w_s / w̄
        est.append(lp)
        err.append(ratio.std(0) / math.sqrt(samples))
    return torch.cat(est).cpu(), torch.cat(err).cpu()


@dataclass(frozen=True)
class SBNLogLikelihood:
    """Per-point ``log p(x)`` ``(B,)``; ``stderr`` ``(B,)`` of each estimate (zeros when exact)."""

    values: Tensor
    stderr: Tensor
    exact: bool
    samples: int

    def describe(self) -> str:
        """How it was computed, for the command line."""
        n = self.values.shape[0]
        spread = float(self.values.std()) / math.sqrt(n) if n > 1 else 0.0
        if self.exact:
            return f"exact, by enumerating all latent states; ±{spread:.4f} standard error over points"
        mc = float(self.stderr.square().mean().sqrt()) / math.sqrt(n)
        return (f"importance sampling with the recognition network, S={self.samples}; "
                f"standard error ±{spread:.4f} over points, ±{mc:.4f} Monte Carlo")


def sbn_log_likelihood(model: SBN, x: Tensor, samples: int = 1000) -> SBNLogLikelihood:
    """Exact ``log p(x)`` when the model has at most :data:`MAX_EXACT_UNITS` latent units, else
    importance sampling with ``samples`` draws (at least 1000)."""
    with torch.no_grad():
        if model.n_units <= MAX_EXACT_UNITS:
            values = exact_log_likelihood(model, x).cpu()
            return SBNLogLikelihood(values, torch.zeros_like(values), True, 0)
        samples = max(samples, 1000)
        values, stderr = importance_log_likelihood(model, x, samples)
        return SBNLogLikelihood(values, stderr, False, samples)
