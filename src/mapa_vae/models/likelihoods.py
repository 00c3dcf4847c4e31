"""Observation models ``p(x | f(z))`` (docs/design.md §1), each an entry of
:data:`~mapa_vae.registry.LIKELIHOODS`.

A :class:`Likelihood` maps decoder outputs ``(..., D')`` to a distribution over ``x`` with event
shape ``(D,)``, scores every (atom, point) pair in bounded memory (one matrix product where the
log-density is linear in ``x``), checks a data set's values, and names the MAPA kernel matched to
its noise (Eq. 8): Gaussian with fixed ``σ²`` (RBF kernel), Bernoulli and continuous Bernoulli
(the softened Bernoulli kernel).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Protocol

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

from ..config import TrainConfig
from ..errors import MapaError
from ..kernels import BernoulliKernel, GaussianKernel, Kernel
from ..registry import LIKELIHOODS

__all__ = [
    "BernoulliLikelihood",
    "ContinuousBernoulliLikelihood",
    "Data",
    "GaussianLikelihood",
    "Likelihood",
    "make_likelihood",
]


class Data(Protocol):
    """What :meth:`Likelihood.settings` may read of a run's data set (a
    :class:`~mapa_vae.data.Dataset`, which imports this module: hence a protocol)."""

    @property
    def name(self) -> str: ...

    @property
    def truth(self) -> Any:
        """The ground truth it was drawn from (with its ``noise_var``), or None."""


class Likelihood(nn.Module, ABC):
    """Observation model ``p(x | f(z))``: maps decoder outputs ``(..., D)`` to a distribution
    with batch shape ``(...)`` and event shape ``(D,)``."""

    name: str
    matmul_pairs: bool = False
    """True where :meth:`pairwise_log_prob` is one matrix product with no ``(B, M, D)`` tensor
    and rounds like the elementwise log-density (MAPA then scores a batch's atoms that way)."""

    @abstractmethod
    def forward(self, params: Tensor) -> Distribution: ...

    @abstractmethod
    def mean(self, params: Tensor) -> Tensor:
        """``E[x | f(z)]`` for decoder outputs ``params``."""

    @abstractmethod
    def kernel(self) -> Kernel:
        """The MAPA kernel matched to this noise model (docs/design.md §2)."""

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """``log p(x | params)`` ``(...)`` for decoder outputs ``params`` ``(..., D')`` and points
        ``x`` ``(..., D)`` broadcast against them: ``self(params).log_prob(x)``, which a likelihood
        may compute faster (the referee scores every draw through it)."""
        log_p: Tensor = self(params).log_prob(x)
        return log_p

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

    @classmethod
    def settings(cls, cfg: TrainConfig, data: Data) -> dict[str, Any]:
        """This likelihood's :meth:`config` for a run of ``cfg`` on ``data``: ``{"name": …}``
        plus its constructor arguments, read from the config's knobs (and the data's own noise,
        where it has one). The default has no arguments; a likelihood with some overrides it."""
        return {"name": cls.name}

    @staticmethod
    def for_run(cfg: TrainConfig, data: Data, default: str) -> dict[str, Any]:
        """The settings of a run's observation model, ``cfg.likelihood`` or else the data set's
        own ``default``, built by that :data:`LIKELIHOODS` entry's :meth:`settings`."""
        settings: dict[str, Any] = LIKELIHOODS[cfg.likelihood or default].settings(cfg, data)
        return settings

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

    @classmethod
    def settings(cls, cfg: TrainConfig, data: Data) -> dict[str, Any]:
        """``--noise-var``, else the ground-truth curve's own noise variance."""
        noise_var = cfg.noise_var
        if noise_var is None:
            if data.truth is None:
                raise MapaError(f"{cfg.data}: a Gaussian likelihood needs --noise-var on this data "
                                "(or choose --likelihood bernoulli / continuous-bernoulli for data "
                                "in [0, 1])")
            noise_var = data.truth.noise_var
        return {"name": cls.name, "noise_var": noise_var}



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

    @classmethod
    def settings(cls, cfg: TrainConfig, data: Data) -> dict[str, Any]:
        """The kernel's softening ``--rho``."""
        return {"name": cls.name, "rho": cfg.rho}

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

    matmul_pairs = True

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """``Σ_d x_d l_d - softplus(l_d)``, the same value as ``self(params).log_prob(x)`` (torch's
        ``binary_cross_entropy_with_logits``) up to rounding, in 0.36 of its time in float64:
        a batched dot product where ``params`` is ``(..., B, D)`` against ``x`` ``(B, D)`` (the
        referee's draws), one softplus. Measured on (60, 100, 784) float64 logits, one thread:
        42 against 117 ms. In float32 training it gains nothing for one draw per point (0.95
        against 0.73 ms forward and backward), so the training objectives keep the distribution.

        >>> lik, l = BernoulliLikelihood(), torch.randn(3, 2, 5, dtype=torch.float64)
        >>> x = (torch.rand(2, 5) < 0.5).double()
        >>> torch.allclose(lik.log_prob(l, x), lik(l).log_prob(x))
        True
        """
        x = x.to(params.dtype)
        if x.dim() == 2 and params.dim() >= 2 and params.shape[-2:] == x.shape:
            dot = torch.einsum("nbd,bd->nb", params.reshape(-1, *x.shape), x).reshape(params.shape[:-1])
        else:
            dot = torch.linalg.vecdot(params, x)
        return dot - F.softplus(params).sum(-1)

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



for _lik in (GaussianLikelihood, BernoulliLikelihood, ContinuousBernoulliLikelihood):
    LIKELIHOODS.register(_lik)



def make_likelihood(config: dict[str, Any]) -> Likelihood:
    """Rebuild a likelihood from :meth:`Likelihood.config`."""
    config = dict(config)
    name = config.pop("name")
    return LIKELIHOODS[name](**config)

