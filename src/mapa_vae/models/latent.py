"""Networks, likelihoods and the latent-variable model (docs/design.md §1).

Every stochastic piece returns a ``torch.distributions.Distribution``: a :class:`Likelihood`
maps decoder outputs to ``p(x | f(z))``, a :class:`Decoder` maps ``z`` to that distribution,
a :class:`GaussianEncoder` maps ``x`` to a mean-field ``q(z | x)`` and :class:`StandardNormal`
is the prior. MAPA's encoder ``g_ψ`` is deterministic (the atoms of the empirical prior are
``z_i = g_ψ(x_i)``), so :class:`CodeEncoder` returns a tensor of codes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn
from torch.distributions import (
    Distribution,
    Independent,
    Normal,
)

from .likelihoods import Likelihood

__all__ = ["CodeEncoder", "Decoder", "GaussianEncoder", "LatentVariableModel", "Prior", "StandardNormal"]


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

