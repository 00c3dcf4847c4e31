"""Networks, likelihoods and the latent-variable model (SPEC §1).

Every stochastic piece returns a ``torch.distributions.Distribution``: a :class:`Likelihood`
maps decoder outputs to ``p(x | f(z))``, a :class:`Decoder` maps ``z`` to that distribution,
a :class:`GaussianEncoder` maps ``x`` to a mean-field ``q(z | x)`` and :class:`StandardNormal`
is the prior. MAPA's encoder ``g_ψ`` is deterministic (the atoms of the empirical prior are
``z_i = g_ψ(x_i)``), so :class:`CodeEncoder` returns a tensor of codes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import (
    Bernoulli,
    ContinuousBernoulli,
    Distribution,
    Independent,
    Normal,
)

from .kernels import BernoulliKernel, GaussianKernel, Kernel
from .storage import MapaError

__all__ = [
    "MLP",
    "BernoulliLikelihood",
    "CodeEncoder",
    "ContinuousBernoulliLikelihood",
    "Decoder",
    "GaussianEncoder",
    "GaussianLikelihood",
    "LatentVariableModel",
    "Likelihood",
    "Prior",
    "StandardNormal",
    "make_likelihood",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
}


class MLP(nn.Sequential):
    """Fully connected network ``d_in → hidden… → d_out`` (the paper's is 3 × 50, tanh here)."""

    def __init__(
        self, d_in: int, d_out: int, hidden: Sequence[int] = (50, 50, 50), activation: str = "tanh"
    ) -> None:
        if activation not in ACTIVATIONS:
            raise MapaError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        widths = [d_in, *hidden]
        for a, b in pairwise(widths):
            layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(widths[-1], d_out))
        super().__init__(*layers)


class Likelihood(nn.Module, ABC):
    """Observation model ``p(x | f(z))``: maps decoder outputs ``(..., D)`` to a distribution
    with batch shape ``(...)`` and event shape ``(D,)``."""

    name: str

    @abstractmethod
    def forward(self, params: Tensor) -> Distribution: ...

    @abstractmethod
    def mean(self, params: Tensor) -> Tensor:
        """``E[x | f(z)]`` for decoder outputs ``params``."""

    @abstractmethod
    def kernel(self) -> Kernel:
        """The MAPA kernel matched to this noise model (SPEC §2)."""

    def pairwise_log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """``log p(x_b | params_m)`` for every pair: params ``(M, D')``, x ``(B, D)`` → ``(B, M)``.

        This generic version broadcasts ``(B, m, D)`` blocks of at most 2²² elements, so memory
        stays bounded; likelihoods whose log-density is linear in ``x`` override it with one
        matrix product.
        """
        step = max(1, 2**22 // max(1, x.shape[0] * x.shape[-1]))
        return torch.cat([self(params[None, i : i + step]).log_prob(x[:, None, :])
                          for i in range(0, params.shape[0], step)], -1)

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor arguments, so a checkpoint can rebuild it."""

    def check_data(self, x: Tensor, where: str) -> None:
        """Raise a one-line error if ``x`` lies outside this likelihood's support."""


class GaussianLikelihood(Likelihood):
    """``x ~ N(f(z), σ² I)`` with a fixed noise variance ``σ²``."""

    name = "gaussian"

    def __init__(self, noise_var: float) -> None:
        super().__init__()
        if not (math.isfinite(noise_var) and noise_var > 0):
            raise MapaError(f"noise variance must be positive and finite, got {noise_var}")
        self.noise_var = float(noise_var)

    def forward(self, params: Tensor) -> Distribution:
        scale = torch.full_like(params, math.sqrt(self.noise_var))
        return Independent(Normal(params, scale, validate_args=False), 1)

    def mean(self, params: Tensor) -> Tensor:
        return params

    def kernel(self) -> Kernel:
        return GaussianKernel(self.noise_var)

    def pairwise_log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        # -‖x - m‖² / 2σ² - D/2 log 2πσ², with the squared distance as one matrix product
        d = x.shape[-1]
        log_k = GaussianKernel(self.noise_var).log_kernel(x, params)  # (B, M)
        return log_k - 0.5 * d * math.log(2 * math.pi * self.noise_var)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "noise_var": self.noise_var}


class _UnitIntervalLikelihood(Likelihood, ABC):
    """Likelihoods for data in [0, 1]; the MAPA kernel is the softened Bernoulli kernel."""

    def __init__(self, rho: float = 0.9) -> None:
        super().__init__()
        self.rho = float(rho)
        BernoulliKernel(self.rho)  # validates rho

    def kernel(self) -> Kernel:
        return BernoulliKernel(self.rho)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "rho": self.rho}

    def check_data(self, x: Tensor, where: str) -> None:
        bad = (x < 0) | (x > 1)
        if bool(bad.any()):
            row, col = (int(v) for v in torch.nonzero(bad)[0])
            raise MapaError(
                f"{where}: value {float(x[row, col]):g} at row {row}, column {col} is outside "
                f"[0, 1], which the {self.name} likelihood requires"
            )


class BernoulliLikelihood(_UnitIntervalLikelihood):
    """``x^d ~ Bernoulli(sigmoid(f(z)^d))``; values in [0, 1] are scored by cross-entropy."""

    name = "bernoulli"

    def forward(self, params: Tensor) -> Distribution:
        return Independent(Bernoulli(logits=params, validate_args=False), 1)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)

    def pairwise_log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        # Σ_d x_d l_d - softplus(l_d): linear in x, so all pairs are one matrix product
        return x @ params.T - F.softplus(params).sum(-1)  # (B, M)


class ContinuousBernoulliLikelihood(_UnitIntervalLikelihood):
    """Continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): a proper density on [0, 1]."""

    name = "continuous-bernoulli"

    def forward(self, params: Tensor) -> Distribution:
        return Independent(ContinuousBernoulli(logits=params, validate_args=False), 1)

    def mean(self, params: Tensor) -> Tensor:
        return ContinuousBernoulli(logits=params, validate_args=False).mean


LIKELIHOODS: dict[str, type[Likelihood]] = {
    GaussianLikelihood.name: GaussianLikelihood,
    BernoulliLikelihood.name: BernoulliLikelihood,
    ContinuousBernoulliLikelihood.name: ContinuousBernoulliLikelihood,
}


def make_likelihood(config: dict[str, Any]) -> Likelihood:
    """Rebuild a likelihood from :meth:`Likelihood.config`."""
    config = dict(config)
    name = config.pop("name")
    if name not in LIKELIHOODS:
        raise MapaError(f"unknown likelihood {name!r}; choose from {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[name](**config)


class Decoder(nn.Module):
    """``z ↦ p(x | f_θ(z))``: a network followed by a likelihood."""

    net: nn.Module
    likelihood: Likelihood

    def __init__(self, net: nn.Module, likelihood: Likelihood) -> None:
        super().__init__()
        self.net = net
        self.likelihood = likelihood

    def forward(self, z: Tensor) -> Distribution:
        return self.likelihood(self.net(z))

    def mean(self, z: Tensor) -> Tensor:
        """The noiseless decoder mean ``E[x | z]``."""
        return self.likelihood.mean(self.net(z))


class GaussianEncoder(nn.Module):
    """Mean-field ``q(z | x) = N(μ(x), diag σ(x)²)`` used by the VAE and IWAE."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net  # outputs (..., 2L): mean and log standard deviation

    def forward(self, x: Tensor) -> Distribution:
        loc, log_scale = self.net(x).chunk(2, dim=-1)
        return Independent(Normal(loc, log_scale.clamp(-15, 10).exp(), validate_args=False), 1)


class CodeEncoder(nn.Module):
    """MAPA's deterministic ``g_ψ: x ↦ z``: the atoms of the empirical prior (Eq. 5)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Prior(nn.Module, ABC):
    """A prior ``p(z)``: ``forward()`` (no input) returns a distribution with event shape ``(L,)``."""

    latent_dim: int

    @abstractmethod
    def forward(self) -> Distribution: ...


class StandardNormal(Prior):
    """The prior ``p(z) = N(0, I_L)``."""

    zero: Tensor

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("zero", torch.zeros(()))

    def forward(self) -> Distribution:
        loc = self.zero.expand(self.latent_dim)
        return Independent(Normal(loc, torch.ones_like(loc), validate_args=False), 1)


class LatentVariableModel(nn.Module):
    """``z ~ p(z)``, ``x | z ~ p(x | f(z))``, with an encoder for inference.

    ``encoder`` is a :class:`GaussianEncoder` (VAE, IWAE) or a :class:`CodeEncoder` (MAPA).
    """

    encoder: nn.Module
    decoder: Decoder
    prior: Prior

    def __init__(self, encoder: nn.Module, decoder: Decoder, prior: Prior) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior

    @property
    def latent_dim(self) -> int:
        return self.prior.latent_dim

    @torch.no_grad()
    def sample(self, n: int, mean: bool = False) -> Tensor:
        """Draw ``n`` new points by the generative process; ``mean`` skips the observation noise."""
        z = self.prior().sample((n,))  # (n, L)
        if mean:
            return self.decoder.mean(z)
        return self.decoder(z).sample()
