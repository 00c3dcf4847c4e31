"""VAE and IWAE: a mean-field Gaussian ``q(z | x)`` and a standard-normal prior (paper Sec. 6).

Both are validated by quadrature over the 1-D latent (importance sampling for larger ones) and
need no finalization: the trained model is already a generative model with an ``N(0, I)`` prior.
"""

from __future__ import annotations

from abc import ABC

import torch
from torch import Tensor

from ..config import TrainConfig
from ..data.dataset import Dataset
from ..errors import MapaError
from ..evaluation.likelihood import quadrature_log_likelihood
from ..inference.objectives import ELBO, IWAE, Objective
from ..models.latent import Decoder, GaussianEncoder, LatentVariableModel, StandardNormal
from ..models.likelihoods import Likelihood
from ..registry import METHODS
from .base import Architecture, Method

__all__ = ["GaussianEncoderMethod", "IWAEMethod", "VAEMethod"]


class GaussianEncoderMethod(Method, ABC):
    """Mean-field Gaussian ``q(z | x)``, ``N(0, I)`` prior, quadrature validation; subclasses
    choose the objective."""

    def build(self, arch: Architecture, likelihood: Likelihood, cfg: TrainConfig) -> LatentVariableModel:
        encoder_net, decoder_net = arch.networks()
        enc = GaussianEncoder(encoder_net(2 * arch.latent_dim))  # mean and log-scale; built first
        return LatentVariableModel(enc, Decoder(decoder_net(), likelihood), StandardNormal(arch.latent_dim))

    def validation_log_likelihood(self, model: LatentVariableModel, val: Tensor, train: Tensor,
                                  cfg: TrainConfig) -> float:
        if model.latent_dim == 1:
            return float(quadrature_log_likelihood(model.decoder, val, cfg.val_grid).mean())
        return float(IWAE(max(cfg.samples, 1))(model, val, torch.arange(val.shape[0])).value.mean())


class VAEMethod(GaussianEncoderMethod):
    """The VAE: maximize the ELBO (one reparameterized sample per point)."""

    name = "vae"
    uses_samples = False

    def objective(self, model: LatentVariableModel, train: Tensor, cfg: TrainConfig,
                  data: Dataset | None = None) -> Objective:
        return ELBO(1)


METHODS.register(VAEMethod())


class IWAEMethod(GaussianEncoderMethod):
    """IWAE: maximize the ``S``-sample importance-weighted bound, with the chosen encoder
    gradient estimator (naive, STL or DReG)."""

    name = "iwae"
    estimator_family = "iwae"

    def check(self, cfg: TrainConfig) -> None:
        super().check(cfg)
        if cfg.samples < 1:
            raise MapaError(f"--samples {cfg.samples}: IWAE needs at least one sample")

    def objective(self, model: LatentVariableModel, train: Tensor, cfg: TrainConfig,
                  data: Dataset | None = None) -> Objective:
        return IWAE(cfg.samples, estimator=self.estimator(cfg))


METHODS.register(IWAEMethod())
