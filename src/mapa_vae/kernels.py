"""Kernels ``k(x_n | x_i)`` that define the MAPA posterior over data-point indices (docs/design.md §2).

A kernel scores how plausible it is that observation ``x_n`` was generated from the latent code
of observation ``x_i``, using only the observation-noise model, never the decoder. Each kernel
returns the unnormalized log-kernel for all pairs of a query block and a set of atoms as one
matrix product, so the O(N² D) posterior is computed in row blocks at matmul speed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .seeds import one_off_seed

__all__ = ["BernoulliKernel", "GaussianKernel", "Kernel", "SearchForm", "calibrate_rho"]


class Kernel(ABC):
    """Log-kernel ``log k(x_n | x_i)`` between queries ``(B, D)`` and atoms ``(M, D)``."""

    name: str

    @abstractmethod
    def log_kernel(self, queries: Tensor, atoms: Tensor) -> Tensor:
        """Return ``log k(queries[b] | atoms[m])``, shape ``(B, M)``."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The kernel's parameters, as they enter the posterior cache key."""

    def search_form(self, atoms: Tensor) -> SearchForm | None:
        """This kernel over ``atoms`` ``(N, D)`` as one inner product (:class:`SearchForm`), for
        the blocked exact table and the nearest-neighbour search; None if it has no such form."""
        return None


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

    def search_form(self, atoms: Tensor) -> SearchForm:
        return _GaussianForm(self, atoms)


class BernoulliKernel(Kernel):
    """Softened Bernoulli kernel for binary data (docs/design.md §2, replacing the paper's Eq. 21).

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
        return _BernoulliForm(self, atoms).block(queries)  # (B, M)

    def params(self) -> dict[str, Any]:
        return {"kernel": self.name, "rho": self.rho}

    def search_form(self, atoms: Tensor) -> SearchForm:
        return _BernoulliForm(self, atoms)


def calibrate_rho(x: Tensor, perplexity: float, rows: int = 500, seed: int = 0) -> float:
    """The softening ``ρ`` at which the median perplexity of ``q(· | n)`` (Eq. 8) is ``perplexity``.

    On binary data the Bernoulli kernel is ``log k(x_n | x_i) = -β h_ni + const`` with ``h`` the
    Hamming distance and ``β = log(ρ / (1 - ρ))``, so ``q(· | n)`` is a softmax over ``-β h_n·``
    and its perplexity ``exp H[q(· | n)]`` falls as ``β`` grows. ``β`` is found by bisection on
    the median over ``rows`` random points ``n`` (their distances to all ``N`` atoms ``x``
    ``(N, D)``); it depends on the data alone, so the kernel stays fixed while a bound uses it.
    On binarized MNIST ``ρ ∈ [0.55, 0.9]`` gives perplexity 1.00: the nearest other image is a
    median 51 pixels away.

    >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> rho = calibrate_rho(x, 2.0)
    >>> q = torch.softmax(BernoulliKernel(rho).log_kernel(x, x), -1)
    >>> round(float(torch.exp(-(q * q.log()).sum(-1)).median()), 4)
    2.0
    """
    n = x.shape[0]
    if not 1.0 < perplexity < n:
        raise ValueError(f"the kernel's perplexity must lie in (1, N = {n}), got {perplexity:g}")
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(one_off_seed(seed)))[:rows]
    xf, q = x.double(), x[pick].double()
    h = q @ (1 - xf).T + (1 - q) @ xf.T  # (rows, N) Hamming distances

    def median_perplexity(beta: float) -> float:
        log_q = torch.log_softmax(-beta * h, -1)
        return float(torch.exp(-(log_q.exp() * log_q).sum(-1)).median())

    lo, hi = 0.0, 1.0  # β = 0: perplexity N; find hi with perplexity below the target
    while median_perplexity(hi) > perplexity and hi < 1e4:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if median_perplexity(mid) > perplexity else (lo, mid)
    return float(torch.sigmoid(torch.tensor(0.5 * (lo + hi), dtype=torch.float64)))


# ----------------------------------------------------------------------------- search forms

_GATHER = 1 << 24  # elements per (b, M, D) gather when scoring pairs


class SearchForm(ABC):
    """A kernel written as ``log k(x_n | x_i) = s ⟨x_n, w_i⟩ + c_i + r_n`` over atoms ``(N, D)``.

    ``block`` drops the per-row constant ``r_n`` (it cancels in ``q``); ``pairs`` is exact.
    ``search_atoms`` / ``search_queries`` are float32 vectors whose **L2** nearest neighbours are
    the largest ``log k`` (faiss's HNSW over inner products degenerates on these atoms: recall
    0.004 at N = 10⁵, so inner products are reduced to L2 with one extra coordinate).
    """

    @abstractmethod
    def block(self, queries: Tensor, out: Tensor | None = None) -> Tensor:
        """``log k(queries[b] | x_i) - r_b`` for all atoms, shape ``(B, N)``, into ``out`` if given."""

    @abstractmethod
    def pairs(self, queries: Tensor, index: Tensor) -> Tensor:
        """``log k(queries[b] | x_{index[b, m]})``, shape ``(B, M)``, from ``(B, D)`` and ``(B, M)``."""

    @abstractmethod
    def search_atoms(self) -> np.ndarray:
        """``(N, D')`` float32 vectors to index."""

    @abstractmethod
    def search_queries(self, queries: Tensor) -> np.ndarray:
        """``(B, D')`` float32 query vectors."""



class _GaussianForm(SearchForm):
    """``log k = -‖x_n - x_i‖² / 2σ² = ⟨x_n, x_i⟩/σ² - ‖x_i‖²/2σ² - ‖x_n‖²/2σ²``; L2 search on x.

    Distances do not move with the origin, so the data are centred first: the expansion loses
    ``eps · ‖x‖² / 2σ²`` to rounding, 0.18 nats in float32 for data 5 away from the origin.
    """

    def __init__(self, kernel: GaussianKernel, atoms: Tensor) -> None:
        self.mean = atoms.mean(0)  # (D,)
        self.x = atoms - self.mean  # (N, D), centred
        self.scale = 1.0 / kernel.noise_var
        self.bias = self.x.pow(2).sum(-1).mul_(-0.5 * self.scale)  # (N,)

    def block(self, queries: Tensor, out: Tensor | None = None) -> Tensor:
        q = queries - self.mean  # (B, D)
        out = torch.addmm(self.bias, q, self.x.T, alpha=self.scale, out=out)  # (B, N)
        # ‖x_n - x_i‖² >= 0, lost to rounding for (near-)duplicates
        return out.clamp_max_(q.pow(2).sum(-1, keepdim=True).mul_(0.5 * self.scale))

    def pairs(self, queries: Tensor, index: Tensor) -> Tensor:
        q = queries - self.mean  # (B, D)
        dot = torch.bmm(_rows(self.x, index), q[:, :, None])[..., 0]  # (B, M)
        sq_q = q.pow(2).sum(-1, keepdim=True)  # (B, 1)
        return (dot.mul_(self.scale) + self.bias[index]).sub_(0.5 * self.scale * sq_q).clamp_max_(0.0)

    def search_atoms(self) -> np.ndarray:
        return _f32(self.x)

    def search_queries(self, queries: Tensor) -> np.ndarray:
        return _f32(queries - self.mean)



class _BernoulliForm(SearchForm):
    """``log k = ⟨x_n, w_i⟩ + c_i`` with ``w_i = logit μ_i``, ``c_i = Σ_d log(1 - μ_i^d)``.

    The inner product search is reduced to L2 (Bachrach et al. 2014): atoms
    ``[w_i, c_i, √(R² - ‖(w_i, c_i)‖²)]`` and queries ``[x_n, 1, 0]`` give
    ``‖q - a‖² = ‖q‖² + R² - 2 log k``.
    """

    def __init__(self, kernel: BernoulliKernel, atoms: Tensor) -> None:
        mu = kernel.rho * atoms + (1.0 - kernel.rho) * (1.0 - atoms)  # (N, D)
        self.weight = torch.log(mu) - torch.log1p(-mu)  # (N, D)
        self.bias = torch.log1p(-mu).sum(-1)  # (N,)

    def block(self, queries: Tensor, out: Tensor | None = None) -> Tensor:
        return torch.addmm(self.bias, queries, self.weight.T, out=out)  # (B, N)

    def pairs(self, queries: Tensor, index: Tensor) -> Tensor:
        return torch.bmm(_rows(self.weight, index), queries[:, :, None])[..., 0] + self.bias[index]

    def search_atoms(self) -> np.ndarray:
        a = torch.cat([self.weight, self.bias[:, None]], 1)  # (N, D+1)
        sq = a.pow(2).sum(-1, keepdim=True)
        return _f32(torch.cat([a, (sq.max() - sq).clamp_min_(0).sqrt_()], 1))  # (N, D+2)

    def search_queries(self, queries: Tensor) -> np.ndarray:
        one, zero = torch.ones_like(queries[:, :1]), torch.zeros_like(queries[:, :1])
        return _f32(torch.cat([queries, one, zero], 1))  # (B, D+2)



def _rows(a: Tensor, index: Tensor) -> Tensor:
    """``a[index]``, shape ``(B, M, D)`` from ``(N, D)`` and ``(B, M)``; index_select is faster."""
    return torch.index_select(a, 0, index.reshape(-1)).view(*index.shape, a.shape[1])



def _f32(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())
