"""Kernels ``k(x_n | x_i)`` that define the MAPA posterior over data-point indices (SPEC §2).

A kernel scores how plausible it is that observation ``x_n`` was generated from the latent code
of observation ``x_i``, using only the observation-noise model, never the decoder. Each kernel
returns the unnormalized log-kernel for all pairs of a query block and a set of atoms as one
matrix product, so the O(N² D) posterior is computed in row blocks at matmul speed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

__all__ = ["BernoulliKernel", "GaussianKernel", "Kernel"]


class Kernel(ABC):
    """Log-kernel ``log k(x_n | x_i)`` between queries ``(B, D)`` and atoms ``(M, D)``."""

    name: str

    @abstractmethod
    def log_kernel(self, queries: Tensor, atoms: Tensor) -> Tensor:
        """Return ``log k(queries[b] | atoms[m])``, shape ``(B, M)``."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The kernel's parameters, as they enter the posterior cache key."""


class GaussianKernel(Kernel):
    """RBF kernel matched to Gaussian noise of variance ``σ²`` (Eq. 8, Gaussian case).

    ``log k(x_n | x_i) = -‖x_n - x_i‖² / (2σ²)``, computed as
    ``-(‖x_n‖² - 2 x_n·x_i + ‖x_i‖²) / (2σ²)`` so a block is one matrix product.

    >>> k = GaussianKernel(0.5)
    >>> x = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    >>> torch.equal(k.log_kernel(x, x), torch.tensor([[0.0, -2.0], [-2.0, 0.0]], dtype=torch.float64))
    True
    """

    name = "gaussian"

    def __init__(self, noise_var: float) -> None:
        if not (math.isfinite(noise_var) and noise_var > 0):
            raise ValueError(f"noise variance must be a positive finite number, got {noise_var}")
        self.noise_var = float(noise_var)

    def log_kernel(self, queries: Tensor, atoms: Tensor) -> Tensor:
        sq_q = queries.pow(2).sum(-1, keepdim=True)  # (B, 1)
        sq_a = atoms.pow(2).sum(-1)  # (M,)
        sq_dist = (sq_q - 2.0 * queries @ atoms.T + sq_a).clamp_min_(0.0)  # (B, M)
        return sq_dist.mul_(-0.5 / self.noise_var)

    def params(self) -> dict[str, Any]:
        return {"kernel": self.name, "noise_var": self.noise_var}


class BernoulliKernel(Kernel):
    """Softened Bernoulli kernel for binary data (SPEC §2, replacing the paper's Eq. 21).

    With ``μ_i = ρ x_i + (1 - ρ)(1 - x_i)`` (elementwise, ``ρ ∈ (0.5, 1)``):
    ``log k(x_n | x_i) = Σ_d x_n^d log μ_i^d + (1 - x_n^d) log(1 - μ_i^d)``,
    which is linear in ``x_n``: ``x_n · W_i + b_i`` with ``W_i = logit μ_i`` and
    ``b_i = Σ_d log(1 - μ_i^d)``. It is never ``-inf``, unlike the paper's version.

    >>> k = BernoulliKernel(0.9)
    >>> x = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    >>> torch.allclose(k.log_kernel(x, x).diagonal(), torch.full((2,), 2 * math.log(0.9),
    ...                dtype=torch.float64))
    True
    """

    name = "bernoulli"

    def __init__(self, rho: float = 0.9) -> None:
        if not 0.5 < rho < 1.0:
            raise ValueError(f"Bernoulli kernel softening rho must lie in (0.5, 1), got {rho}")
        self.rho = float(rho)

    def log_kernel(self, queries: Tensor, atoms: Tensor) -> Tensor:
        mu = self.rho * atoms + (1.0 - self.rho) * (1.0 - atoms)  # (M, D)
        weight = torch.log(mu) - torch.log1p(-mu)  # (M, D)
        bias = torch.log1p(-mu).sum(-1)  # (M,)
        return queries @ weight.T + bias  # (B, M)

    def params(self) -> dict[str, Any]:
        return {"kernel": self.name, "rho": self.rho}
