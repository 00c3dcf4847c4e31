"""Score-function estimators for discrete latents: REINFORCE, NVIL and VIMCO (one class each).

For a sigmoid belief network (:class:`~mapa_vae.models.sbn.SBN`) the states ``h`` cannot be
reparameterized, so the recognition parameters ``φ`` learn from the score function
``∇_φ log q_φ(h | x)`` times a learning signal. Each objective returns the true bound as
``value`` (detached) and a ``surrogate`` whose gradient is the estimator: for the generative
parameters ``θ`` it is the plain (importance-weighted) gradient of ``log p_θ(x, h)``, for ``φ``
the score-function term plus the direct ``∇_φ`` of the bound. With ``K`` draws ``h^k ~ q(· | x)``,
``log w_k = log p(x, h^k) − log q(h^k | x)`` ``(K, B)`` and ``L̂_K = log (1/K) Σ_k w_k``:

- :class:`Reinforce` (the ablation): signal ``L̂_K`` for every draw, no baseline. It is
  unbiased for ``∇ E[L̂_K]`` (the ELBO for ``K = 1``, the IWAE bound otherwise).
- :class:`NVIL` (Mnih & Gregor 2014): ``K`` independent single-sample ELBO estimates, each
  layer's score weighted by its local signal ``l_i`` (:meth:`~mapa_vae.models.sbn.Trace.local_signals`)
  minus an input-dependent baseline ``b_i(x)`` and a running mean ``c_i``, divided by
  ``max(1, σ_i)``, ``σ_i²`` the running variance of ``l_i − b_i(x)``. ``b`` is trained by squared
  error ``(l_i − c_i − b_i(x))²`` through the same surrogate.
- :class:`VIMCO` (Mnih & Rezende 2016): the ``K``-sample bound with per-draw leave-one-out signals
  ``L̂_K − L̂_K^{(−k)}``, where ``L̂^{(−k)}`` replaces ``w_k`` by the geometric mean of the others
  (the paper's estimator; ``mean="arithmetic"`` uses their arithmetic mean instead).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import MapaError
from ..models.latent import LatentVariableModel
from ..models.sbn import SBN
from ..registry import ESTIMATORS, Estimator, estimators_of
from .objectives import Bound, Objective

__all__ = ["NVIL", "SIGNALS", "VIMCO", "Reinforce", "leave_one_out_bounds", "score_function_objective"]


def _sbn(model: LatentVariableModel) -> SBN:
    if not isinstance(model, SBN):
        raise MapaError("score-function estimators need a sigmoid belief network, "
                        f"got {type(model).__name__}")
    return model


class Reinforce(Objective):
    """Plain REINFORCE for ``L̂_K``: ``∇ = E[L̂_K Σ_k ∇_φ log q(h^k | x) + Σ_k w̃_k ∇ log w_k]``."""

    def __init__(self, samples: int = 1) -> None:
        super().__init__()
        if samples < 1:
            raise ValueError(f"REINFORCE needs at least one sample, got {samples}")
        self.samples = samples

    def __call__(self, model: LatentVariableModel, x: Tensor, index: Tensor) -> Bound:
        t = _sbn(model).trace(x, self.samples)
        self.passes.add(x.shape[0] * self.samples, x.shape[0] * self.samples, x.shape[0])
        bound = torch.logsumexp(t.log_w(), 0) - math.log(self.samples)  # (B,)
        log_q = torch.stack(t.log_q).sum(0)  # (K, B)
        surrogate = bound + (bound.detach() * log_q).sum(0)
        return Bound(bound.detach(), surrogate)


def leave_one_out_bounds(log_w: Tensor, mean: str = "geometric") -> Tensor:
    """``L̂^{(−k)} = log (1/K) (Σ_{j≠k} w_j + ŵ_{−k})`` ``(K, B)`` for ``log w`` ``(K, B)``, K ≥ 2.

    ``ŵ_{−k}`` is the geometric mean ``exp(mean_{j≠k} log w_j)`` (VIMCO's choice) or the
    arithmetic mean of the other weights. Computed as a log-sum-exp over ``K`` copies of
    ``log w`` with entry ``k`` swapped, so no weight is exponentiated or subtracted: it stays
    finite and exact when one weight dominates the others by hundreds of nats.
    """
    k = log_w.shape[0]
    if k < 2:
        raise ValueError("leave-one-out signals need at least two samples")
    eye = torch.eye(k, dtype=torch.bool, device=log_w.device)[..., None]  # (K, K, 1)
    if mean == "geometric":
        swap = (log_w.sum(0) - log_w) / (k - 1)  # (K, B): mean of the others' log w
    elif mean == "arithmetic":
        others = log_w.expand(k, *log_w.shape).masked_fill(eye, -math.inf)  # (K, K, B)
        swap = torch.logsumexp(others, 1) - math.log(k - 1)
    else:
        raise MapaError(f"unknown VIMCO mean {mean!r}; choose geometric or arithmetic")
    swapped = torch.where(eye, swap[:, None, :], log_w[None])  # (K, K, B): row k has w_k swapped
    return torch.logsumexp(swapped, 1) - math.log(k)


class VIMCO(Objective):
    """VIMCO: ``∇ = E[Σ_k (L̂_K − L̂_K^{(−k)}) ∇_φ log q(h^k | x) + Σ_k w̃_k ∇ log w_k]``.

    The second term is the importance-weighted gradient (all the generative model gets); the
    first is unbiased because ``L̂^{(−k)}`` does not depend on ``h^k``.
    """

    def __init__(self, samples: int, mean: str = "geometric") -> None:
        super().__init__()
        if samples < 2:
            raise MapaError(f"VIMCO needs at least two samples (--samples), got {samples}")
        leave_one_out_bounds(torch.zeros(2, 1), mean)  # validates ``mean``
        self.samples, self.mean = samples, mean

    def __call__(self, model: LatentVariableModel, x: Tensor, index: Tensor) -> Bound:
        t = _sbn(model).trace(x, self.samples)
        self.passes.add(x.shape[0] * self.samples, x.shape[0] * self.samples, x.shape[0])
        log_w = t.log_w()  # (K, B)
        bound = torch.logsumexp(log_w, 0) - math.log(self.samples)  # (B,)
        with torch.no_grad():
            signal = bound - leave_one_out_bounds(log_w, self.mean)  # (K, B)
        log_q = torch.stack(t.log_q).sum(0)  # (K, B)
        surrogate = bound + (signal * log_q).sum(0)
        return Bound(bound.detach(), surrogate)


class NVIL(Objective):
    """NVIL with per-layer local signals, an input-dependent baseline and variance normalization.

    For layer ``i`` with signal ``l_i`` ``(K, B)`` and baseline ``b_i(x)`` ``(B,)`` the score weight is
    ``A_i = (l_i − b_i(x) − c_i) / max(1, σ_i)``. While the model is in training mode ``c_i`` and
    ``σ_i²`` are updated from the batch first, as exponential moving averages with ``momentum``
    (0.8, as in the reference implementations); in eval mode they stay fixed. Subtracting
    ``b_i(x) + c_i`` leaves the gradient unbiased; dividing by ``max(1, σ_i)`` rescales layer
    ``i``'s recognition gradient by that positive factor (an adaptive step size), so ``E[∇_φ]`` is
    the ELBO's gradient divided by ``max(1, σ_i)`` per layer. ``θ`` gets ``∇_θ log p(x, h)``
    alone (the zero-mean ``−∇_φ log q`` term of the ELBO's own gradient is left out). The
    surrogate also carries
    ``−Σ_i (l_i − c_i − b_i(x))²`` (averaged over draws), which trains only the baseline network.
    Passes: ``K·B`` recognition and generative rows, plus ``B`` baseline rows counted as encoder.
    """

    def __init__(self, samples: int = 1, momentum: float = 0.8) -> None:
        super().__init__()
        if samples < 1:
            raise ValueError(f"NVIL needs at least one sample, got {samples}")
        self.samples, self.momentum = samples, momentum

    def __call__(self, model: LatentVariableModel, x: Tensor, index: Tensor) -> Bound:
        sbn = _sbn(model)
        if sbn.baseline is None:
            raise MapaError("NVIL needs the model's baseline network (build the SBN with baseline=True)")
        t = sbn.trace(x, self.samples)
        self.passes.add(x.shape[0] * (self.samples + 1), x.shape[0] * self.samples, x.shape[0])
        log_w = t.log_w()  # (K, B)
        signals = t.local_signals().detach()  # (L, K, B)
        b = sbn.baseline(x).T[:, None, :]  # (L, 1, B)
        stats = sbn.baseline
        with torch.no_grad():
            centred = signals - b  # (L, K, B)
            if sbn.training:
                a = self.momentum
                stats.mean.mul_(a).add_((1 - a) * centred.mean((1, 2)))
                stats.var.mul_(a).add_((1 - a) * centred.var((1, 2), unbiased=False))
            c = stats.mean[:, None, None]
            weight = (centred - c) / stats.var.sqrt().clamp(min=1.0)[:, None, None]  # (L, K, B)
        log_q = torch.stack(t.log_q)  # (L, K, B)
        baseline_loss = (signals - c - b).square().sum(0).mean(0)  # (B,)
        log_p = torch.stack(t.log_p).sum(0)  # (K, B): θ's gradient; ∇_φ of −log q has mean 0
        surrogate = (log_p + (weight * log_q).sum(0)).mean(0) - baseline_loss
        return Bound(log_w.mean(0).detach(), surrogate)


for _e in (  # the first is the SBN's default
    Estimator("nvil", "score-function", "SBN: NVIL (Mnih & Gregor 2014), baseline net, per-layer "
              "signals", NVIL, proposal_signal=True),
    Estimator("vimco", "score-function", "SBN: VIMCO (Mnih & Rezende 2016), geometric-mean "
              "leave-one-out", VIMCO, proposal_signal=True),
    Estimator("reinforce", "score-function", "SBN: plain score function (REINFORCE), no baseline",
              Reinforce),
):
    ESTIMATORS.register(_e)

SIGNALS = ESTIMATORS.names(where=lambda e: e.proposal_signal)
"""The score-function signals MAPA's learned index proposal can train with (``learned-<signal>``
posteriors, :mod:`~mapa_vae.inference.learned_proposal`)."""


def score_function_objective(estimator: str, samples: int) -> Objective:
    """The objective of a score-function ``estimator`` name with ``samples`` draws."""
    if estimator not in estimators_of("score-function"):
        raise MapaError(f"unknown score-function estimator {estimator!r}; choose "
                        f"{', '.join(estimators_of('score-function'))}")
    objective: Objective = ESTIMATORS[estimator].objective(samples)
    return objective
