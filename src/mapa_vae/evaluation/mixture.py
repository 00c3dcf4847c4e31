"""The paper's own evaluator (App. C.2): an IWAE whose proposal is fitted to the fixed model.

A mixture of Gaussians ``r(z | x)`` (50 components by default) is fitted per data set to a trained
model by the doubly reparameterized IWAE gradient (S = 500), sampled through the mixture's CDF so
that the mixture weights learn too (Figurnov et al. 2018); the fitted IWAE bound with S = 20 000
then estimates ``log p(x)``. With a 1-D latent, quadrature (:mod:`mapa_vae.evaluation.likelihood`)
is exact and cheaper; this is offered for comparison with the paper (docs/design.md §7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from ..inference.objectives import IWAE
from ..models.latent import LatentVariableModel
from ..models.networks import MLP
from .likelihood import _float64

__all__ = ["MixtureProposal", "ReparameterizedMixture", "mixture_proposal_log_likelihood"]


class ReparameterizedMixture(MixtureSameFamily):
    """``Σ_c π_c N(z; μ_c, diag σ_c²)`` with implicit reparameterization gradients.

    ``logits`` ``(B, C)``, ``loc`` and ``scale`` ``(B, C, L)``. :meth:`rsample` draws ``z`` as
    usual and attaches the gradient of the distributional transform (Figurnov et al. 2018;
    TensorFlow Probability's ``MixtureSameFamily(reparameterize=True)``): with the conditional
    CDFs ``F_d(z_d | z_{<d}) = Σ_c r_c(z_{<d}) Φ((z_d - μ_cd) / σ_cd)``, where
    ``r_c(z_{<d}) ∝ π_c Π_{j<d} N(z_j; μ_cj, σ_cj)``, holding ``u_d = F_d`` fixed gives

    ``dz_d/dφ = -(∂F_d/∂φ + Σ_{j<d} ∂F_d/∂z_j · dz_j/dφ) / q_d(z_d | z_{<d})``,

    so every parameter, the mixture weights included, is reparameterized. The sample is the
    exact draw; only its gradient is implicit.
    """

    has_rsample = True

    def __init__(self, logits: Tensor, loc: Tensor, scale: Tensor) -> None:
        self.logits, self.loc, self.scale = logits, loc, scale
        super().__init__(Categorical(logits=logits), Independent(Normal(loc, scale), 1))

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = ()) -> Tensor:
        z0 = self.sample(torch.Size(sample_shape))  # (*S, B, L), no gradient
        if not torch.is_grad_enabled():
            return z0
        log_r = torch.log_softmax(self.logits, -1).expand(*z0.shape[:-1], -1)  # (*S, B, C)
        tiny = torch.finfo(z0.dtype).tiny
        zs = []
        for d in range(z0.shape[-1]):
            comp = Normal(self.loc[..., d], self.scale[..., d])  # batch (B, C)
            r = torch.softmax(log_r, -1)  # (*S, B, C): responsibilities given z_{<d}
            at = z0[..., d, None]  # (*S, B, 1)
            cdf = (r * comp.cdf(at)).sum(-1)  # (*S, B)
            pdf = (r * comp.log_prob(at).exp()).sum(-1).detach().clamp_min(tiny)  # (*S, B)
            z_d = z0[..., d] - (cdf - cdf.detach()) / pdf  # value z0_d, gradient dz_d/dφ
            zs.append(z_d)
            log_r = log_r + comp.log_prob(z_d[..., None])
        return torch.stack(zs, -1)  # (*S, B, L)



class MixtureProposal(torch.nn.Module):
    """Amortized ``q(z | x)``: one MLP maps ``x`` ``(B, D)`` to a
    :class:`ReparameterizedMixture` of ``C`` diagonal Gaussians in ``L`` dimensions."""

    def __init__(self, d_in: int, latent_dim: int, components: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.latent_dim, self.components = latent_dim, components
        self.net = MLP(d_in, components * (1 + 2 * latent_dim), hidden)

    def forward(self, x: Tensor) -> ReparameterizedMixture:
        c, dim = self.components, self.latent_dim
        logits, loc, log_scale = self.net(x).split([c, c * dim, c * dim], -1)
        shape = (*x.shape[:-1], c, dim)
        return ReparameterizedMixture(
            logits, loc.reshape(shape), log_scale.reshape(shape).clamp(-15, 10).exp()
        )



def mixture_proposal_log_likelihood(
    model: LatentVariableModel,
    x: Tensor,
    components: int = 50,
    train_samples: int = 500,
    eval_samples: int = 20_000,
    epochs: int = 100,
    batch_size: int = 1000,
    lr: float = 1e-3,
    seed: int = 0,
    hidden: Sequence[int] = (50, 50, 50),
    chunk: int = 1000,
) -> Tensor:
    """The paper's estimate of ``log p(x)`` ``(B,)`` for a fixed model (docs/design.md §7, App. C.2).

    1. Fit a :class:`MixtureProposal` ``q(z | x)`` with ``components`` Gaussians to the fixed
       decoder and prior by maximizing the IWAE bound ``log (1/S) Σ_s p(x, z_s) / q(z_s | x)``
       with ``S = train_samples`` on ``x`` itself (Adam, ``epochs`` passes in batches of
       ``batch_size``). The gradient is DReG's (:class:`~mapa_vae.inference.objectives.IWAE`), which the
       mixture's implicit reparameterization makes available: the naive IWAE gradient's signal
       for ``q`` fades as ``S`` grows, and at ``S = 50`` it barely moved the proposal (measured).
    2. Estimate ``log p(x) ≈ log (1/S) Σ_s p(x, z_s) / q(z_s | x)`` with ``S = eval_samples``
       fresh draws, ``chunk`` at a time, merged by log-sum-exp. Any proposal makes this a lower
       bound in expectation; a well-fitted one makes it tight and its spread small.

    The paper's settings are the defaults: 50 components, ``S = 500`` to fit, ``S = 20 000`` to
    evaluate, 100 epochs of batch 1000 at lr 1e-3. Works in float64 on a copy of the model;
    ``seed`` fixes the proposal's initialization and every draw, and the caller's random state
    is left untouched.
    """
    m = _float64(model).requires_grad_(False)
    x = x.to(torch.float64)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        q = MixtureProposal(x.shape[-1], m.latent_dim, components, hidden).double().to(x.device)
        fitted = LatentVariableModel(q, m.decoder, m.prior)
        opt = torch.optim.Adam(q.parameters(), lr=lr)
        fit = IWAE(train_samples, estimator="dreg")
        for _ in range(epochs):
            for rows in torch.randperm(x.shape[0], device=x.device).split(batch_size):
                bound = fit(fitted, x[rows], rows)
                opt.zero_grad()
                (-bound.surrogate.mean()).backward()
                opt.step()
        out = []
        with torch.no_grad():
            for rows in torch.arange(x.shape[0], device=x.device).split(max(1, 2**18 // chunk)):
                parts = []  # log Σ_s w_s over each chunk of draws, (b,) each
                for start in range(0, eval_samples, chunk):
                    s = min(chunk, eval_samples - start)
                    parts.append(IWAE(s)(fitted, x[rows], rows).value + math.log(s))
                out.append(torch.logsumexp(torch.stack(parts), 0) - math.log(eval_samples))
    return torch.cat(out)

