"""Inference methods: what each one trains, how it is validated and how it ends (SPEC §5).

A :class:`Method` composes the pieces the training loop needs: the model to build, the
objective to maximize, the validation score used to pick the best epoch, and the step that
turns the trained networks into a generative model with a standard-normal prior. Adding a
method means adding one class here and one entry in :data:`METHODS`; the loop is unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .evaluation import quadrature_log_likelihood
from .models import (
    MLP,
    CodeEncoder,
    Decoder,
    GaussianEncoder,
    LatentVariableModel,
    Likelihood,
    StandardNormal,
)
from .objectives import ELBO, IWAE, MAPA, EmpiricalLogLikelihood, Objective
from .posterior import cached_posterior
from .priors import fit_copula_prior

__all__ = ["METHODS", "Architecture", "IWAEMethod", "MapaMethod", "Method", "VAEMethod"]


@dataclass(frozen=True)
class Architecture:
    """Sizes shared by every method: data and latent dimensions, MLP widths, activation."""

    data_dim: int
    latent_dim: int
    hidden: tuple[int, ...]
    activation: str


@dataclass(frozen=True)
class Setting:
    """The method-specific knobs, read from the training config."""

    samples: int
    k: int
    top_k: int | None
    cache_dir: Path
    prior_steps: int
    val_grid: int
    seed: int


class Method(ABC):
    """One inference method (VAE, IWAE, MAPA)."""

    name: str

    @abstractmethod
    def build(self, arch: Architecture, likelihood: Likelihood) -> LatentVariableModel:
        """The untrained model this method optimizes."""

    @abstractmethod
    def objective(self, model: LatentVariableModel, train: Tensor, setting: Setting) -> Objective:
        """The bound maximized during training."""

    @abstractmethod
    def validation_log_likelihood(self, model: LatentVariableModel, val: Tensor, train: Tensor,
                                  setting: Setting) -> float:
        """Mean validation log-likelihood used to select the best epoch."""

    def finalize(self, model: LatentVariableModel, train: Tensor,
                 setting: Setting) -> tuple[LatentVariableModel, dict[str, Any]]:
        """The generative model to evaluate and sample (default: the trained one)."""
        return model, {}

    def build_final(self, arch: Architecture, likelihood: Likelihood) -> LatentVariableModel:
        """An empty model with the architecture :meth:`finalize` returns (for loading)."""
        return self.build(arch, likelihood)


def _decoder(arch: Architecture, likelihood: Likelihood) -> Decoder:
    return Decoder(MLP(arch.latent_dim, arch.data_dim, arch.hidden, arch.activation), likelihood)


class _GaussianEncoderMethod(Method, ABC):
    """VAE and IWAE: mean-field Gaussian ``q(z | x)``, ``N(0, I)`` prior, quadrature validation."""

    def build(self, arch: Architecture, likelihood: Likelihood) -> LatentVariableModel:
        enc = GaussianEncoder(MLP(arch.data_dim, 2 * arch.latent_dim, arch.hidden, arch.activation))
        return LatentVariableModel(enc, _decoder(arch, likelihood), StandardNormal(arch.latent_dim))

    def validation_log_likelihood(self, model: LatentVariableModel, val: Tensor, train: Tensor,
                                  setting: Setting) -> float:
        if model.latent_dim == 1:
            return float(quadrature_log_likelihood(model.decoder, val, setting.val_grid).mean())
        return float(IWAE(setting.samples)(model, val, torch.arange(val.shape[0])).value.mean())


class VAEMethod(_GaussianEncoderMethod):
    """The VAE: maximize the ELBO (one reparameterized sample per point)."""

    name = "vae"

    def objective(self, model: LatentVariableModel, train: Tensor, setting: Setting) -> Objective:
        return ELBO(1)


class IWAEMethod(_GaussianEncoderMethod):
    """IWAE: maximize the ``S``-sample importance-weighted bound."""

    name = "iwae"

    def objective(self, model: LatentVariableModel, train: Tensor, setting: Setting) -> Objective:
        return IWAE(setting.samples)


class MapaMethod(Method):
    """MAPA: a deterministic encoder and the MAPA bound over the cached index posterior; after
    training, the copula prior gives a standard-normal generative model."""

    name = "mapa"

    def build(self, arch: Architecture, likelihood: Likelihood) -> LatentVariableModel:
        enc = CodeEncoder(MLP(arch.data_dim, arch.latent_dim, arch.hidden, arch.activation))
        return LatentVariableModel(enc, _decoder(arch, likelihood), StandardNormal(arch.latent_dim))

    def objective(self, model: LatentVariableModel, train: Tensor, setting: Setting) -> Objective:
        kernel = model.decoder.likelihood.kernel()
        posterior, _ = cached_posterior(train, kernel, setting.cache_dir, setting.top_k)
        posterior.check_budget(setting.k, setting.samples)
        return MAPA(posterior.to(train.device), train, setting.k, setting.samples)

    def validation_log_likelihood(self, model: LatentVariableModel, val: Tensor, train: Tensor,
                                  setting: Setting) -> float:
        # The model being trained is the empiricalized one; score it exactly (Eq. 6).
        return float(EmpiricalLogLikelihood(train)(model, val).value.mean())

    def finalize(self, model: LatentVariableModel, train: Tensor,
                 setting: Setting) -> tuple[LatentVariableModel, dict[str, Any]]:
        final, fit = fit_copula_prior(model, train, steps=setting.prior_steps, seed=setting.seed)
        return final, {"prior_encoder_mse": fit.encoder_mse, "prior_decoder_kl": fit.decoder_kl}


METHODS: dict[str, Method] = {m.name: m for m in (MapaMethod(), VAEMethod(), IWAEMethod())}
