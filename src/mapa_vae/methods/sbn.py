"""Sigmoid belief networks trained with score-function estimators (NVIL, VIMCO, REINFORCE).

``--method sbn`` builds an :class:`~mapa_vae.models.sbn.SBN` with ``--layers`` Bernoulli units
per stochastic layer (top last) and, with ``--sbn-hidden``, an MLP inside every conditional;
``--estimator`` picks :class:`~mapa_vae.inference.score_function.NVIL` (the default),
``VIMCO`` or ``REINFORCE`` with ``--samples`` draws per point. Validation and evaluation give
the exact ``log p(x)`` by enumeration when the model has at most
:data:`~mapa_vae.evaluation.sbn.MAX_EXACT_UNITS` latent units, else importance sampling with the
recognition network (validation: 100 draws; evaluation: at least 1000, with standard errors).
Observations are Bernoulli: binary images (``digits-binary``, ``sprites-binary``) or a binarized
MNIST ``.npz`` file with ``--likelihood bernoulli``.
"""

from __future__ import annotations

from torch import Tensor

from ..config import TrainConfig
from ..data.dataset import Dataset
from ..data.images import IMAGE_DATASETS
from ..errors import MapaError
from ..evaluation.referee import Estimate
from ..evaluation.sbn import (
    MAX_EXACT_UNITS,
    exact_log_likelihood,
    importance_log_likelihood,
    sbn_log_likelihood,
)
from ..inference.objectives import Objective
from ..inference.score_function import score_function_objective
from ..models.latent import LatentVariableModel
from ..models.likelihoods import Likelihood
from ..models.sbn import SBN
from ..registry import METHODS
from .base import Architecture, Method

__all__ = ["SBNMethod"]

VALIDATION_SAMPLES = 100


def _sbn(model: LatentVariableModel) -> SBN:
    if not isinstance(model, SBN):
        raise MapaError(f"method sbn expects a sigmoid belief network, got {type(model).__name__}")
    return model


class SBNMethod(Method):
    """A sigmoid belief network and its recognition network, one score-function estimator."""

    name = "sbn"
    estimator_family = "score-function"
    likelihoods = ("bernoulli",)

    def check(self, cfg: TrainConfig) -> None:
        super().check(cfg)
        if cfg.likelihood is None and cfg.data not in IMAGE_DATASETS:
            raise MapaError(f"--method sbn on {cfg.data}: pass --likelihood bernoulli (binary data)")
        name = cfg.likelihood or IMAGE_DATASETS[cfg.data].likelihood
        if name not in self.likelihoods:
            raise MapaError(f"--method sbn models binary data with a Bernoulli likelihood, not {name} "
                            "(try --data digits-binary, sprites-binary or a binarized .npz file)")
        if cfg.samples < 1:
            raise MapaError(f"--samples {cfg.samples}: method sbn needs at least one sample")
        if self.estimator(cfg) == "vimco" and cfg.samples < 2:
            raise MapaError(f"--samples {cfg.samples}: VIMCO's leave-one-out signals need at least 2")
        if len(cfg.layers) > 3:
            raise MapaError(f"--layers: an SBN here has one to three stochastic layers, "
                            f"got {len(cfg.layers)}")

    def build(self, arch: Architecture, likelihood: Likelihood, cfg: TrainConfig) -> LatentVariableModel:
        return SBN(arch.data_dim, cfg.layers, likelihood, hidden=cfg.sbn_hidden or (),
                   activation=cfg.activation, baseline=self.estimator(cfg) == "nvil")

    def objective(self, model: LatentVariableModel, train: Tensor, cfg: TrainConfig,
                  data: Dataset | None = None) -> Objective:
        return score_function_objective(self.estimator(cfg), cfg.samples)

    def validation_log_likelihood(self, model: LatentVariableModel, val: Tensor, train: Tensor,
                                  cfg: TrainConfig) -> float:
        sbn = _sbn(model)
        if sbn.n_units <= MAX_EXACT_UNITS:
            return float(exact_log_likelihood(sbn, val).mean())
        return float(importance_log_likelihood(sbn, val, VALIDATION_SAMPLES)[0].mean())

    def log_likelihood(self, model: LatentVariableModel, x: Tensor, grid: int, samples: int = 1000,
                       train: Tensor | None = None, progress: bool | None = None) -> Tensor:
        """Exact ``log p(x)`` ``(B,)`` for small models, else importance sampling (S ≥ 1000)."""
        return sbn_log_likelihood(_sbn(model), x, samples).values

    def evaluate(self, model: LatentVariableModel, x: Tensor, grid: int, samples: int = 1000,
                 train: Tensor | None = None, progress: bool | None = None) -> Estimate:
        result = sbn_log_likelihood(_sbn(model), x, samples)
        return Estimate(result.values, result.stderr, result.describe())


METHODS.register(SBNMethod())
