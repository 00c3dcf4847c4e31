"""Evaluating a learned generative model against the ground truth (docs/design.md §7).

With a 1-D latent and a standard-normal prior, ``log p(x) = log ∫ p(x | f(z)) φ(z) dz`` is an
integral over one variable. :func:`quadrature_log_likelihood` computes it with the midpoint rule
in probability space: ``z_j = Φ⁻¹((j + ½) / M)`` carries prior mass ``1 / M`` each, so
``log p(x) ≈ logsumexp_j log p(x | f(z_j)) - log M``. The grid is dense where the prior has
mass (spacing ``≈ 1 / (M φ(z))``), and ``M = 2¹⁶`` resolves posteriors far narrower than any
of the paper's data sets produce. For other latent sizes, :func:`importance_log_likelihood`
gives an importance-sampled lower bound (in expectation) with a defensive mixture proposal, and
:func:`mixture_proposal_log_likelihood` is the paper's own evaluator (App. C.2): an IWAE whose
proposal, a mixture of Gaussians, is fitted to the fixed model before a large-``S`` estimate.

The test KL is ``KL[p_GT ‖ p] = E_{x~p_GT}[log p_GT(x) - log p(x)]``, estimated on fresh
ground-truth samples, with its standard error.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal

from ..models.latent import Decoder, LatentVariableModel, StandardNormal

__all__ = [
    "DEFAULT_GRID",
    "KLEstimate",
    "Proposal",
    "importance_log_likelihood",
    "log_likelihood",
    "quadrature_log_likelihood",
    "test_kl",
]


DEFAULT_GRID = 2**16



M = TypeVar("M", bound=torch.nn.Module)



def _device(module: torch.nn.Module, x: Tensor) -> torch.device:
    """Where ``module`` lives (its first parameter or buffer), else where ``x`` is."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return x.device



def _float64(module: M) -> M:
    return copy.deepcopy(module).double().eval()



@torch.no_grad()
def quadrature_log_likelihood(decoder: Decoder, x: Tensor, grid: int = DEFAULT_GRID) -> Tensor:
    """``log p(x)`` ``(B,)`` of ``z ~ N(0, 1)``, ``x ~ decoder(z)`` by quadrature, in float64.

    >>> from mapa_vae.models import GaussianLikelihood
    >>> lin = torch.nn.Linear(1, 1, bias=False); _ = lin.weight.data.fill_(2.0)
    >>> dec = Decoder(lin, GaussianLikelihood(1.0))  # x = 2 z + ε, so x ~ N(0, 5)
    >>> x = torch.tensor([[0.0], [1.0]])
    >>> exact = Normal(0.0, math.sqrt(5.0)).log_prob(x[:, 0]).double()
    >>> bool(torch.allclose(quadrature_log_likelihood(dec, x), exact, atol=1e-6))
    True
    """
    dec = _float64(decoder)
    device = _device(dec, x)
    u = (torch.arange(grid, dtype=torch.float64, device=device) + 0.5) / grid
    z = torch.special.ndtri(u)[:, None]  # (M, 1)
    params = dec.net(z)  # (M, D')
    x = x.to(device, torch.float64)
    chunk = max(1, 2**24 // (grid * max(1, params.shape[-1])))
    out = [
        torch.logsumexp(dec.likelihood.pairwise_log_prob(params, x[i : i + chunk]), -1)
        for i in range(0, x.shape[0], chunk)
    ]  # each (c,)
    return (torch.cat(out) - math.log(grid)).cpu()



def _proposal(model: LatentVariableModel, x: Tensor, code_scale: float) -> Distribution:
    """``q(z | x)``: the model's encoder, or ``N(g(x), code_scale²)`` for a deterministic one."""
    enc = model.encoder(x)
    if isinstance(enc, Distribution):
        return enc
    return Independent(Normal(enc, torch.full_like(enc, code_scale)), 1)



class Proposal:
    """``r(z | x) = (1 - a) q(z | x) + a p(z)`` for a batch of ``B`` points.

    ``local`` has batch shape ``(B,)`` and event ``(L,)``; ``prior`` is ``p(z)``, event ``(L,)``.
    """

    def __init__(self, local: Distribution, prior: Distribution, defensive: float,
                 prior_draws: Callable[[int], Tensor] | None = None) -> None:
        if not 0.0 < defensive < 1.0:
            raise ValueError(f"defensive weight must lie in (0, 1), got {defensive}")
        self.local, self.prior, self.defensive = local, prior, defensive
        self.prior_draws = prior_draws or (lambda n: self.prior.sample((n,)))

    def sample(self, n: int) -> Tensor:
        """``n`` draws per point, ``(n, B, L)``: the prior's share drawn from the prior only
        (through ``prior_draws``, ``n ↦ (n, L)`` fresh draws of ``p``)."""
        z = self.local.sample((n,))  # (n, B, L)
        pick = torch.rand(z.shape[:-1], device=z.device) < self.defensive  # (n, B)
        count = int(pick.sum())
        if count:
            z[pick] = self.prior_draws(count).to(z)
        return z

    def log_prob(self, z: Tensor, log_p_z: Tensor) -> Tensor:
        """``log r(z | x)`` ``(n, B)`` of ``z`` ``(n, B, L)``, given ``log p(z)`` ``(n, B)``."""
        return torch.logaddexp(math.log1p(-self.defensive) + self.local.log_prob(z),
                               math.log(self.defensive) + log_p_z)



@torch.no_grad()
def importance_log_likelihood(
    model: LatentVariableModel, x: Tensor, samples: int = 1000, code_scale: float = 0.1,
    defensive: float = 0.1, chunk: int = 100,
) -> Tensor:
    """Importance-sampled ``log p(x)`` ``(B,)``: ``log (1/S) Σ_s p(x, z_s) / r(z_s | x)``.

    ``r = (1 - a) q(z | x) + a p(z)`` mixes the encoder's proposal with the model's own prior
    (``a = defensive``), so every weight is at most ``p(x | z) / a``: the support and tails
    cover the posterior's whatever the prior is (a flow fitted to MAPA's codes, or N(0, I)).
    In expectation it is a lower bound on ``log p(x)``.
    """
    m = _float64(model)
    x = x.to(_device(m, x), torch.float64)
    out = []
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk]
        p = m.prior()
        r = Proposal(_proposal(m, xb, code_scale), p, defensive)
        z = r.sample(samples)  # (S, b, L)
        log_p_z = p.log_prob(z)  # (S, b)
        log_w = m.decoder(z).log_prob(xb) + log_p_z - r.log_prob(z, log_p_z)  # (S, b)
        out.append(torch.logsumexp(log_w, 0) - math.log(samples))
    return torch.cat(out).cpu()



def log_likelihood(model: LatentVariableModel, x: Tensor, grid: int = DEFAULT_GRID,
                   samples: int = 1000) -> Tensor:
    """``log p(x)`` by quadrature for a 1-D latent under N(0, 1), else by importance sampling."""
    if model.latent_dim == 1 and isinstance(model.prior, StandardNormal):
        return quadrature_log_likelihood(model.decoder, x, grid)
    return importance_log_likelihood(model, x, samples)



@dataclass(frozen=True)
class KLEstimate:
    """Monte Carlo estimate of ``KL[p_GT ‖ p]`` and its standard error, in nats."""

    kl: float
    stderr: float
    log_lik_truth: float
    log_lik_model: float



def test_kl(truth: LatentVariableModel, model: LatentVariableModel, x_test: Tensor,
            grid: int = DEFAULT_GRID, log_lik_model: Tensor | None = None) -> KLEstimate:
    """``E_{x~p_GT}[log p_GT(x) - log p(x)]`` over ``x_test`` (fresh samples of the truth).

    ``log_lik_model``: the model's ``log p(x_test)`` ``(B,)`` when its own evaluator computed it
    (a method with its own exact or importance-sampled estimate); else :func:`log_likelihood`.
    """
    lp_truth = log_likelihood(truth, x_test, grid)
    lp_model = log_likelihood(model, x_test, grid) if log_lik_model is None else log_lik_model
    diff = lp_truth - lp_model
    n = diff.numel()
    return KLEstimate(
        kl=float(diff.mean()),
        stderr=float(diff.std() / math.sqrt(n)) if n > 1 else math.nan,
        log_lik_truth=float(lp_truth.mean()),
        log_lik_model=float(lp_model.mean()),
    )

test_kl.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite its name

