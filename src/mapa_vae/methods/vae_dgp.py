"""VAE-DGP: an amortized ``q(z | x)`` and a deep Gaussian-process decoder (Dai et al. 2016).

The variational auto-encoded deep GP replaces the VAE's neural decoder by one or two sparse
variational GP layers (:mod:`mapa_vae.models.gp`, on GPyTorch) and keeps the recognition MLP, so
the codes of unseen points are one encoder pass away. It trains on the doubly-stochastic
minibatch bound (:class:`~mapa_vae.inference.gp_bound.DoublyStochasticGPBound`), with
``--samples`` draws of ``z`` per point, ``--gp-layers`` layers, ``--inducing`` points per GP and
the data set's noise variance (``--learn-noise`` to learn it).

Evaluation is on the same footing as the VAE's: the decoder's distribution is the GP's
predictive ``p(x | z) = N(μ(z), s²(z) + σ²)``, so ``log p(x) = log ∫ p(x | z) N(z; 0, 1) dz`` is
computed by the package's quadrature over a 1-D ``z`` and by importance sampling with the
encoder as proposal for larger ``L`` (:func:`~mapa_vae.evaluation.log_likelihood`, the base
:meth:`~mapa_vae.methods.Method.log_likelihood`). With two layers each grid point carries one
draw of the hidden layer, an unbiased estimate of ``p(x | z)``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..config import TrainConfig
from ..data.dataset import Dataset
from ..errors import MapaError
from ..evaluation.likelihood import log_likelihood, quadrature_log_likelihood
from ..inference.gp_bound import DoublyStochasticGPBound
from ..inference.objectives import Objective
from ..models.gp import build_vae_dgp
from ..models.latent import LatentVariableModel
from ..models.likelihoods import GaussianLikelihood, Likelihood
from ..registry import METHODS
from .base import Architecture, Method

__all__ = ["VAEDGPMethod"]


class VAEDGPMethod(Method):
    """The VAE-DGP: recognition MLP, 1 or 2 GP layers, Gaussian noise; no finalization (its prior
    is already ``N(0, I)``)."""

    name = "vae-dgp"
    likelihoods = ("gaussian",)

    def check(self, cfg: TrainConfig) -> None:
        super().check(cfg)
        if cfg.likelihood is not None and cfg.likelihood not in self.likelihoods:
            raise MapaError(f"--method vae-dgp has a Gaussian likelihood, not {cfg.likelihood}")
        if cfg.samples < 1:
            raise MapaError(f"--samples {cfg.samples}: vae-dgp needs at least one draw of z per point")

    def build(self, arch: Architecture, likelihood: Likelihood, cfg: TrainConfig) -> LatentVariableModel:
        if not isinstance(likelihood, GaussianLikelihood):
            raise MapaError(f"--method vae-dgp has a Gaussian likelihood, not {likelihood.name} "
                            "(this data set's own)")
        encoder_net, _ = arch.networks()
        return build_vae_dgp(encoder_net(2 * arch.latent_dim), arch.latent_dim, arch.data_dim,
                             likelihood.noise_var, cfg.gp_layers, cfg.inducing, cfg.learn_noise)

    def objective(self, model: LatentVariableModel, train: Tensor, cfg: TrainConfig,
                  data: Dataset | None = None) -> Objective:
        return DoublyStochasticGPBound(num_data=train.shape[0], samples=cfg.samples)

    def validation_log_likelihood(self, model: LatentVariableModel, val: Tensor, train: Tensor,
                                  cfg: TrainConfig) -> float:
        if model.latent_dim == 1:
            return float(quadrature_log_likelihood(model.decoder, val, cfg.val_grid).mean())
        return float(log_likelihood(model, val, cfg.val_grid, max(cfg.samples, 1)).mean())

    def metrics(self, cfg: TrainConfig) -> dict[str, Any]:
        return {**super().metrics(cfg), "gp_layers": cfg.gp_layers, "inducing": cfg.inducing,
                "learn_noise": cfg.learn_noise}


METHODS.register(VAEDGPMethod())
