"""Inference methods: what each one trains, how it is validated and how it ends (SPEC §5).

A :class:`Method` composes the pieces the training loop needs: the model to build, the
objective to maximize, the validation score used to pick the best epoch, and the step that
turns the trained networks into a generative model with a standard-normal prior. Adding a
method means adding one class here and one entry in :data:`METHODS`; the loop is unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .architectures import build_networks
from .code_priors import build_code_prior, fit_code_prior
from .data import Dataset
from .evaluation import quadrature_log_likelihood
from .models import (
    CodeEncoder,
    Decoder,
    GaussianEncoder,
    LatentVariableModel,
    Likelihood,
    StandardNormal,
)
from .objectives import ELBO, IWAE, MAPA, EmpiricalLogLikelihood, Objective
from .posterior import MapaPosterior, cached_posterior, ground_truth_posterior, uniform_posterior
from .priors import fit_copula_prior, mapped_model
from .storage import MapaError

__all__ = ["METHODS", "Architecture", "IWAEMethod", "MapaMethod", "Method", "VAEMethod"]


@dataclass(frozen=True)
class Architecture:
    """What every method's networks share: sizes, widths, activation, and the network kind
    (``mlp``, or ``conv`` for images of ``image_shape`` ``(C, H, W)``)."""

    data_dim: int
    latent_dim: int
    hidden: tuple[int, ...]
    activation: str
    network: str = "mlp"
    image_shape: tuple[int, int, int] | None = None
    channels: tuple[int, ...] = (32, 64)

    def networks(self) -> tuple[Callable[[int], nn.Module], Callable[[], nn.Module]]:
        """Factories for the encoder network (by output width) and the decoder network."""
        return build_networks(self.network, self.data_dim, self.latent_dim, self.image_shape,
                              self.hidden, self.activation, self.channels)


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
    posterior: str = "kernel"  # MAPA's q(i|n): kernel (MAPA) | ground-truth (MAPA-GT) | uniform
    posterior_engine: str = "auto"  # kernel posterior: exact | faiss | auto (neighbours.py)
    estimator: str = "naive"  # IWAE's encoder gradient: naive | stl | dreg
    prior_fit: str = "map"  # MAPA's copula prior: map (exact) | refit (paper's Eq. 39–40)
    code_prior: str = "flow"  # MAPA, L > 1: flow | mixture fitted to the codes
    code_prior_steps: int = 2000
    code_prior_config: tuple[tuple[str, Any], ...] = ()  # the prior's constructor arguments


POSTERIORS = ("kernel", "ground-truth", "uniform")
ESTIMATORS = ("naive", "stl", "dreg")


class Method(ABC):
    """One inference method (VAE, IWAE, MAPA)."""

    name: str

    @abstractmethod
    def build(self, arch: Architecture, likelihood: Likelihood) -> LatentVariableModel:
        """The untrained model this method optimizes."""

    @abstractmethod
    def objective(self, model: LatentVariableModel, train: Tensor, setting: Setting,
                  data: Dataset | None = None) -> Objective:
        """The bound maximized during training (``data``: the splits, for ground-truth extras)."""

    @abstractmethod
    def validation_log_likelihood(self, model: LatentVariableModel, val: Tensor, train: Tensor,
                                  setting: Setting) -> float:
        """Mean validation log-likelihood used to select the best epoch."""

    def finalize(self, model: LatentVariableModel, train: Tensor,
                 setting: Setting) -> tuple[LatentVariableModel, dict[str, Any]]:
        """The generative model to evaluate and sample (default: the trained one)."""
        return model, {}

    def build_final(self, arch: Architecture, likelihood: Likelihood,
                    setting: Setting) -> LatentVariableModel:
        """An empty model with the architecture :meth:`finalize` returns (for loading)."""
        return self.build(arch, likelihood)




class _GaussianEncoderMethod(Method, ABC):
    """VAE and IWAE: mean-field Gaussian ``q(z | x)``, ``N(0, I)`` prior, quadrature validation."""

    def build(self, arch: Architecture, likelihood: Likelihood) -> LatentVariableModel:
        encoder_net, decoder_net = arch.networks()
        enc = GaussianEncoder(encoder_net(2 * arch.latent_dim))  # mean and log-scale; built first
        return LatentVariableModel(enc, Decoder(decoder_net(), likelihood), StandardNormal(arch.latent_dim))

    def validation_log_likelihood(self, model: LatentVariableModel, val: Tensor, train: Tensor,
                                  setting: Setting) -> float:
        if model.latent_dim == 1:
            return float(quadrature_log_likelihood(model.decoder, val, setting.val_grid).mean())
        return float(IWAE(setting.samples)(model, val, torch.arange(val.shape[0])).value.mean())


class VAEMethod(_GaussianEncoderMethod):
    """The VAE: maximize the ELBO (one reparameterized sample per point)."""

    name = "vae"

    def objective(self, model: LatentVariableModel, train: Tensor, setting: Setting,
                  data: Dataset | None = None) -> Objective:
        return ELBO(1)


class IWAEMethod(_GaussianEncoderMethod):
    """IWAE: maximize the ``S``-sample importance-weighted bound."""

    name = "iwae"

    def objective(self, model: LatentVariableModel, train: Tensor, setting: Setting,
                  data: Dataset | None = None) -> Objective:
        return IWAE(setting.samples, estimator=setting.estimator)


class MapaMethod(Method):
    """MAPA: a deterministic encoder and the MAPA bound over the cached index posterior; after
    training, the copula prior gives a standard-normal generative model."""

    name = "mapa"

    def build(self, arch: Architecture, likelihood: Likelihood) -> LatentVariableModel:
        encoder_net, decoder_net = arch.networks()
        enc = CodeEncoder(encoder_net(arch.latent_dim))  # built first
        return LatentVariableModel(enc, Decoder(decoder_net(), likelihood), StandardNormal(arch.latent_dim))

    def objective(self, model: LatentVariableModel, train: Tensor, setting: Setting,
                  data: Dataset | None = None) -> Objective:
        posterior = self.posterior(model, train, setting, data)
        posterior.check_budget(setting.k, setting.samples)
        return MAPA(posterior.to(train.device), train, setting.k, setting.samples)

    @staticmethod
    def posterior(model: LatentVariableModel, train: Tensor, setting: Setting,
                  data: Dataset | None) -> MapaPosterior:
        """``q(i | n)``: the kernel posterior (cached), or an ablation's (SPEC §5)."""
        if setting.posterior == "kernel":
            kernel = model.decoder.likelihood.kernel()
            return cached_posterior(train, kernel, setting.cache_dir, setting.top_k,
                                    device=train.device,  # computed where training runs
                                    engine=setting.posterior_engine)[0]
        if setting.posterior == "uniform":  # MAPA-naive
            return uniform_posterior(train.shape[0])
        if setting.posterior == "ground-truth":  # MAPA-GT, Eq. 7
            if data is None or data.truth is None or data.z_train is None:
                raise MapaError("MAPA-GT needs a built-in data set (ground-truth decoder and codes)")
            return ground_truth_posterior(data.train, data.z_train, data.truth.decoder)
        raise MapaError(f"unknown posterior {setting.posterior!r}; choose from {', '.join(POSTERIORS)}")

    def validation_log_likelihood(self, model: LatentVariableModel, val: Tensor, train: Tensor,
                                  setting: Setting) -> float:
        # The model being trained is the empiricalized one; score it exactly (Eq. 6).
        return float(EmpiricalLogLikelihood(train)(model, val).value.mean())

    def finalize(self, model: LatentVariableModel, train: Tensor,
                 setting: Setting) -> tuple[LatentVariableModel, dict[str, Any]]:
        if model.latent_dim > 1:
            return fit_code_prior(model, train, kind=setting.code_prior,
                                  steps=setting.code_prior_steps, seed=setting.seed,
                                  **dict(setting.code_prior_config))
        final, fit = fit_copula_prior(model, train, method=setting.prior_fit,
                                      steps=setting.prior_steps, seed=setting.seed)
        return final, {"prior_encoder_mse": fit.encoder_mse, "prior_decoder_kl": fit.decoder_kl}

    def build_final(self, arch: Architecture, likelihood: Likelihood,
                    setting: Setting) -> LatentVariableModel:
        model = self.build(arch, likelihood)
        if arch.latent_dim > 1:
            model.prior = build_code_prior(setting.code_prior, arch.latent_dim,
                                           **dict(setting.code_prior_config))
            return model
        return mapped_model(model) if setting.prior_fit == "map" else model


METHODS: dict[str, Method] = {m.name: m for m in (MapaMethod(), VAEMethod(), IWAEMethod())}
