"""Inference methods: what each one trains, how it is validated and how it ends (paper Sec. 5–6).

A :class:`Method` composes the pieces the training loop needs: the model to build, the
objective to maximize, the validation score used to pick the best epoch, and the step that
turns the trained networks into the generative model the user gets. Adding a method is one
subclass and one ``METHODS.register`` line (see docs/design.md §14): the loop,
the command line, ``compare`` and ``reproduce`` read everything else from the method itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..config import TrainConfig
from ..data.dataset import Dataset
from ..data.images import IMAGE_DATASETS, image_shape
from ..errors import MapaError
from ..evaluation.referee import Estimate, estimate_log_likelihood
from ..inference.objectives import Objective
from ..models.latent import LatentVariableModel
from ..models.likelihoods import Likelihood
from ..models.networks import build_networks
from ..registry import estimators_of

__all__ = ["Architecture", "Method"]


@dataclass(frozen=True)
class Architecture:
    """What every method's networks share: sizes, widths, activation, and the network kind
    (``mlp``, or ``conv`` for images of ``image_shape`` ``(C, H, W)``)."""

    data_dim: int
    latent_dim: int
    hidden: tuple[int, ...]
    activation: str
    network: str = "mlp"
    image_shape: tuple[int, ...] | None = None
    channels: tuple[int, ...] = (32, 64)

    @classmethod
    def from_config(cls, cfg: TrainConfig, data_dim: int) -> Architecture:
        """The architecture ``cfg`` asks for on data of ``data_dim`` columns."""
        shape = cfg.image_shape or (image_shape(cfg.data) if cfg.data in IMAGE_DATASETS else None)
        return cls(data_dim, cfg.latent_dim, cfg.hidden, cfg.activation, cfg.network, shape, cfg.channels)

    def networks(self) -> tuple[Callable[[int], nn.Module], Callable[[], nn.Module]]:
        """Factories for the encoder network (by output width) and the decoder network."""
        return build_networks(self.network, self.data_dim, self.latent_dim, self.image_shape,
                              self.hidden, self.activation, self.channels)


class Method(ABC):
    """One inference method. Class attributes state the facts the rest of the package reads:

    - ``name``: its registry name;
    - ``uses_samples``: whether ``S`` changes what it trains (the VAE's does not: the sweep runs
      it once per cell, and its metrics record ``samples: null``);
    - ``uses_k``: whether it has MAPA's ``k`` (recorded in the metrics);
    - ``estimator_family``: the :class:`~mapa_vae.registry.Estimator` family it takes (``"iwae"``,
      ``"score-function"``) or ``None``; :attr:`estimators` lists that family's registered
      estimators, the first being its default;
    - ``likelihoods``: the observation models it can train (``LIKELIHOODS`` names); empty = all.
    """

    name: str
    uses_samples: bool = True
    uses_k: bool = False
    estimator_family: str | None = None
    likelihoods: tuple[str, ...] = ()

    @property
    def estimators(self) -> tuple[str, ...]:
        """The gradient estimators it accepts (``ESTIMATORS`` names of its family), the first
        being its default; empty when it has none."""
        return estimators_of(self.estimator_family) if self.estimator_family else ()

    def accepts(self, likelihood: str) -> bool:
        """Whether this method trains models with observation model ``likelihood``."""
        return not self.likelihoods or likelihood in self.likelihoods

    def check(self, cfg: TrainConfig) -> None:
        """Refuse, before any data is loaded or step taken, a config this method cannot run."""
        if cfg.estimator != "naive" and cfg.estimator not in self.estimators:
            allowed = ", ".join(self.estimators) or "none"
            raise MapaError(f"--estimator {cfg.estimator}: method {self.name} takes {allowed}")

    def resolve(self, cfg: TrainConfig, given: Collection[str]) -> tuple[TrainConfig, str | None]:
        """``cfg`` with this method's own defaults for its data in the knobs not in ``given``
        (the flags a user set), and one line saying what was chosen (None: nothing was)."""
        return cfg, None

    def estimator(self, cfg: TrainConfig) -> str:
        """The estimator this run uses: ``cfg.estimator`` if this method has it, else its default."""
        if cfg.estimator in self.estimators:
            return cfg.estimator
        return self.estimators[0] if self.estimators else cfg.estimator

    @abstractmethod
    def build(self, arch: Architecture, likelihood: Likelihood, cfg: TrainConfig) -> LatentVariableModel:
        """The untrained model this method optimizes."""

    @abstractmethod
    def objective(self, model: LatentVariableModel, train: Tensor, cfg: TrainConfig,
                  data: Dataset | None = None) -> Objective:
        """The bound maximized during training (``data``: the splits, for ground-truth extras)."""

    @abstractmethod
    def validation_log_likelihood(self, model: LatentVariableModel, val: Tensor, train: Tensor,
                                  cfg: TrainConfig) -> float:
        """Mean validation log-likelihood used to select the best epoch."""

    def finalize(self, model: LatentVariableModel, train: Tensor,
                 cfg: TrainConfig) -> tuple[LatentVariableModel, dict[str, Any]]:
        """The generative model to evaluate and sample (default: the trained one)."""
        return model, {}

    def build_final(self, arch: Architecture, likelihood: Likelihood,
                    cfg: TrainConfig) -> LatentVariableModel:
        """An empty model with the architecture :meth:`finalize` returns (for loading)."""
        return self.build(arch, likelihood, cfg)

    def log_likelihood(self, model: LatentVariableModel, x: Tensor, grid: int, samples: int = 1000,
                       train: Tensor | None = None, progress: bool | None = None) -> Tensor:
        """``log p(x)`` ``(B,)`` of the final model, as :meth:`evaluate` estimates it."""
        return self.evaluate(model, x, grid, samples, train, progress).values

    def evaluate(self, model: LatentVariableModel, x: Tensor, grid: int, samples: int = 1000,
                 train: Tensor | None = None, progress: bool | None = None) -> Estimate:
        """``log p(x)`` ``(B,)`` of the final model with its standard errors and how it was
        computed: quadrature for a 1-D latent under N(0, 1), else the referee's importance
        sampling with ``samples`` draws and a proposal adapted to the model
        (:func:`~mapa_vae.evaluation.estimate_log_likelihood`). ``train``: the run's training
        data (a deterministic encoder's atoms); ``progress``: a progress bar (None: on a
        terminal only)."""
        return estimate_log_likelihood(model, x, grid, samples, train, progress)

    def metrics(self, cfg: TrainConfig) -> dict[str, Any]:
        """The settings this method actually used, as the run's metrics record them."""
        return {"samples": cfg.samples if self.uses_samples else None,
                "k": cfg.mapa_k if self.uses_k else None,
                "estimator": self.estimator(cfg) if self.estimators else None}
