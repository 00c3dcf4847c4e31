"""A deep Gaussian-process decoder on GPyTorch, for the VAE-DGP (Dai, Damianou, González & Lawrence 2016).

The generative model is ``z ~ N(0, I_L)``, ``h = g(z)`` (a hidden GP layer, when two layers),
``f = g'(h)`` (or ``g'(z)`` with one layer), ``x = f + ε``, ``ε ~ N(0, σ² I_D)``. Every GP layer
is a sparse variational GP (Titsias 2009; Hensman et al. 2013) with ``M`` inducing points per
output: ``q(u) = N(m, S)`` (whitened, Cholesky-parameterized), and the marginal
``q(f(z)) = N(μ(z), s²(z))`` per output, ``μ(z) = k_zu K_uu^{-1} m``,
``s²(z) = k_zz - k_zu K_uu^{-1}(K_uu - S) K_uu^{-1} k_uz``. The layers are GPyTorch's
:class:`~gpytorch.models.deep_gps.DeepGPLayer` with a whitened
:class:`~gpytorch.variational.VariationalStrategy`, a
:class:`~gpytorch.variational.CholeskyVariationalDistribution` and a
``ScaleKernel(RBFKernel(ard_num_dims=…))`` per output; GPyTorch also provides ``KL(q(u) ‖ p(u))``.

The model is the package's ordinary :class:`~mapa_vae.models.latent.LatentVariableModel`,
composed of a :class:`~mapa_vae.models.latent.GaussianEncoder` (the amortized ``q(z | x)``), a
:class:`~mapa_vae.models.latent.Decoder` whose network is :class:`GPNet` and whose likelihood is
:class:`GPPredictiveLikelihood`, and the ``N(0, I)`` prior. :class:`GPNet` maps ``z`` to the
predictive moments ``[μ(z), s²(z)]`` ``(…, 2D)`` and the likelihood turns them into
``p(x | z) = N(μ(z), s²(z) + σ²)``, so quadrature over a 1-D ``z``, importance sampling,
sampling and the training loop's checks all work on it unchanged. With two layers the hidden
``h ~ q(h | z)`` is drawn once per call (Salimbeni & Deisenroth 2017): ``p(x | z)`` is then an
unbiased one-sample estimate of ``∫ N(x; μ(h), s²(h) + σ²) q(h | z) dh``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from ..kernels import GaussianKernel, Kernel
from .latent import Decoder, GaussianEncoder, LatentVariableModel, StandardNormal
from .likelihoods import Likelihood

with warnings.catch_warnings():
    # linear_operator (GPyTorch's linear algebra) decorates two CG kernels with torch.jit.script
    # at import, which torch >= 2.10 deprecates; nothing of ours runs through them.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                            category=DeprecationWarning)
    from gpytorch.constraints import Interval
    from gpytorch.distributions import MultivariateNormal
    from gpytorch.kernels import RBFKernel, ScaleKernel
    from gpytorch.means import ConstantMean, LinearMean
    from gpytorch.models.deep_gps import DeepGPLayer
    from gpytorch.variational import CholeskyVariationalDistribution, VariationalStrategy

__all__ = ["GPLayer", "GPNet", "GPPredictiveLikelihood", "build_vae_dgp"]

BOUNDS = (1e-4, 1e4)  # for the kernels' lengthscales and output scales


class GPLayer(DeepGPLayer):
    """``out_dims`` independent sparse variational GPs ``R^in_dims → R``, ``M`` inducing points each.

    Inducing inputs ``Z`` ``(out, M, in)`` (learned), ``q(u) = N(m, S)`` per output, whitened.
    The mean is a learned constant for the output layer and a learned linear map for a hidden
    layer (Salimbeni & Deisenroth 2017, Sec. 5: a linear mean keeps deep GPs from collapsing).
    """

    def __init__(self, in_dims: int, out_dims: int, inducing: int, linear_mean: bool = False) -> None:
        if in_dims == 1:  # quantiles of N(0, 1): the prior's mass covered evenly
            grid = torch.special.ndtri((torch.arange(inducing, dtype=torch.float64) + 0.5) / inducing)
            z = grid.float()[None, :, None].expand(out_dims, inducing, 1).clone()
        else:
            z = torch.randn(out_dims, inducing, in_dims)
        batch = torch.Size([out_dims])
        q_u = CholeskyVariationalDistribution(inducing, batch_shape=batch)
        strategy = VariationalStrategy(self, z, q_u, learn_inducing_locations=True)
        super().__init__(strategy, in_dims, out_dims)
        self.mean_module = (LinearMean(in_dims, batch_shape=batch) if linear_mean
                            else ConstantMean(batch_shape=batch))
        # Finite bounds (GPyTorch's default Positive() stores an upper bound of inf): every tensor
        # of a saved model is finite, which the training loop checks before it keeps one.
        rbf = RBFKernel(ard_num_dims=in_dims, batch_shape=batch, lengthscale_constraint=Interval(*BOUNDS))
        self.covar_module = ScaleKernel(rbf, batch_shape=batch, outputscale_constraint=Interval(*BOUNDS))
        self.covar_module.outputscale = 1.0
        # short against the N(0, 1) inputs' unit scale: with 1.0 the fits sit for hundreds of
        # steps on a plateau that explains the data as GP variance (measured on the circle)
        rbf.lengthscale = 0.3

    def forward(self, x: Tensor) -> MultivariateNormal:
        """The GP prior at inputs ``x`` ``(…, out, N, in)``: ``N(m(x), K(x, x))`` per output."""
        return MultivariateNormal(self.mean_module(x), self.covar_module(x))


class GPNet(nn.Module):
    """``z ↦ [μ(z), s²(z)]`` ``(…, L) → (…, 2D)``: the GP decoder's predictive moments.

    ``layers`` is 1 (``z → f``) or 2 (``z → h → f``, the hidden width ``H = min(D, 30)`` as in
    Salimbeni & Deisenroth 2017). Inputs with any leading shape are flattened to rows and, for
    large inputs (a quadrature grid), run in chunks of ``chunk`` rows.
    """

    def __init__(self, latent_dim: int, data_dim: int, layers: int = 1, inducing: int = 32,
                 chunk: int = 8192) -> None:
        super().__init__()
        if layers not in (1, 2):
            raise ValueError(f"a GP decoder has 1 or 2 layers, got {layers}")
        self.latent_dim, self.data_dim, self.chunk = latent_dim, data_dim, chunk
        hidden = min(data_dim, 30)
        dims = [latent_dim, hidden, data_dim] if layers == 2 else [latent_dim, data_dim]
        self.layers = nn.ModuleList(
            GPLayer(a, b, inducing, linear_mean=i < len(dims) - 2)
            for i, (a, b) in enumerate(itertools.pairwise(dims))
        )

    def _moments(self, z: Tensor) -> Tensor:
        out: Any = z
        for i, layer in enumerate(self.layers):
            # are_samples: z already carries its sample dimensions; a hidden layer's MTMVN
            # output is sampled (reparameterized) by the next DeepGPLayer call
            out = layer(out, are_samples=True) if i == 0 else layer(out)
        return torch.cat([out.mean, out.variance], -1)  # (N, 2D)

    def forward(self, z: Tensor) -> Tensor:
        # GPyTorch memoizes K_uu's Cholesky in eval mode and keeps it through load_state_dict,
        # .double() and deepcopy; one M×M factorization per call is cheap, a stale one is wrong.
        for layer in self.gp_layers():
            layer.variational_strategy._clear_cache()
        lead = z.shape[:-1]
        rows = z.reshape(-1, z.shape[-1])  # (N, L)
        parts = [self._moments(rows[i : i + self.chunk]) for i in range(0, rows.shape[0], self.chunk)]
        return torch.cat(parts).reshape(*lead, 2 * self.data_dim)

    def kl_divergence(self) -> Tensor:
        """``Σ_layers Σ_outputs KL(q(u) ‖ p(u))``, a scalar (GPyTorch's closed form)."""
        kls = [layer.variational_strategy.kl_divergence().sum() for layer in self.gp_layers()]
        return torch.stack(kls).sum()

    def gp_layers(self) -> list[GPLayer]:
        """The layers, input side first."""
        return [layer for layer in self.layers if isinstance(layer, GPLayer)]


class GPPredictiveLikelihood(Likelihood):
    """``p(x | z) = N(μ(z), diag(s²(z) + σ²))`` from the GP's moments ``params = [μ, s²]`` ``(…, 2D)``.

    ``σ²`` is the data set's noise variance, fixed (a buffer), or learned (a parameter, stored
    as ``log σ²``) when ``learn_noise``.
    """

    name = "gp-gaussian"
    log_noise_var: Tensor

    def __init__(self, noise_var: float, learn_noise: bool = False) -> None:
        super().__init__()
        log_var = torch.tensor(math.log(noise_var))
        if learn_noise:
            self.log_noise_var = nn.Parameter(log_var)
        else:
            self.register_buffer("log_noise_var", log_var)
        self.learn_noise = learn_noise

    @property
    def noise_var(self) -> Tensor:
        return self.log_noise_var.exp()

    def forward(self, params: Tensor) -> Distribution:
        mean, var = params.chunk(2, dim=-1)
        return Independent(Normal(mean, (var + self.noise_var).sqrt(), validate_args=False), 1)

    def mean(self, params: Tensor) -> Tensor:
        return params.chunk(2, dim=-1)[0]

    def pairwise_log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """``log p(x_b | z_m)`` ``(B, M)`` for moments ``params`` ``(M, 2D)`` and ``x`` ``(B, D)``.

        With ``v = s² + σ²``: ``-½ Σ_d (x_d² / v_md - 2 x_d μ_md / v_md + μ_md² / v_md + log 2π v_md)``,
        two matrix products instead of a ``(B, M, D)`` broadcast (the quadrature's inner loop).
        """
        mean, var = params.chunk(2, dim=-1)
        prec = 1.0 / (var + self.noise_var)  # (M, D)
        const = (mean.square() * prec - prec.log() + math.log(2 * math.pi)).sum(-1)  # (M,)
        return -0.5 * (x.square() @ prec.T - 2 * x @ (mean * prec).T + const)

    def expected_log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """``E_{q(f)}[log N(x; f, σ²)] = Σ_d log N(x_d; μ_d, σ²) - s²_d / (2σ²)`` ``(…)``.

        ``x`` ``(…, D)`` broadcasts against ``params`` ``(…, 2D)``; the expectation over the GP's
        marginal ``q(f) = N(μ, s²)`` is exact (the data term of the SVGP bound, Hensman et al. 2013).
        """
        mean, var = params.chunk(2, dim=-1)
        noise = self.noise_var
        log_n = Normal(mean, noise.sqrt().expand_as(mean), validate_args=False).log_prob(x)
        return (log_n - var / (2 * noise)).sum(-1)

    def kernel(self) -> Kernel:
        return GaussianKernel(float(self.noise_var))

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "noise_var": float(self.noise_var), "learn_noise": self.learn_noise}


def build_vae_dgp(encoder_net: nn.Module, latent_dim: int, data_dim: int, noise_var: float,
                  layers: int = 1, inducing: int = 32, learn_noise: bool = False) -> LatentVariableModel:
    """The VAE-DGP: ``q(z | x)`` from ``encoder_net`` (outputs ``2L``: mean, log-scale), a
    ``layers``-deep GP decoder with ``inducing`` points per GP, and ``z ~ N(0, I_L)``."""
    decoder = Decoder(GPNet(latent_dim, data_dim, layers, inducing),
                      GPPredictiveLikelihood(noise_var, learn_noise))
    return LatentVariableModel(GaussianEncoder(encoder_net), decoder, StandardNormal(latent_dim))
