"""VAE-DGP: the GP decoder's bound against GPyTorch's exact GP, amortized codes for unseen points,
the run directory round trip, and the quadrature log-likelihood against Monte Carlo over z."""

from __future__ import annotations

import math

import pytest
import torch

from mapa_vae.cli import build_parser, config_from_args
from mapa_vae.config import TrainConfig
from mapa_vae.data.groundtruth import ground_truth
from mapa_vae.evaluation.likelihood import quadrature_log_likelihood
from mapa_vae.inference.gp_bound import DoublyStochasticGPBound, gp_data_bound
from mapa_vae.models.gp import GPLayer, build_vae_dgp
from mapa_vae.models.latent import LatentVariableModel
from mapa_vae.models.networks import MLP
from mapa_vae.storage import load_tensors
from mapa_vae.training.loop import train
from mapa_vae.training.runs import load_run

gpytorch = pytest.importorskip("gpytorch")

NOISE = 0.01


def _circle(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points of the analytic circle (σ² = 0.01) and their true codes, float64."""
    x, z = ground_truth("circle", surrogate=False).sample(n, torch.Generator().manual_seed(seed))
    return x.double(), z.double().reshape(n, 1)


class _ExactGP(gpytorch.models.ExactGP):
    """One exact GP per output, sharing the sparse layer's mean and kernel (batch of D)."""

    def __init__(self, z: torch.Tensor, y: torch.Tensor, layer: GPLayer,
                 likelihood: gpytorch.likelihoods.GaussianLikelihood) -> None:
        super().__init__(z, y, likelihood)
        self.mean_module, self.covar_module = layer.mean_module, layer.covar_module

    def forward(self, z: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))


def _exact_log_marginal(layer: GPLayer, z: torch.Tensor, x: torch.Tensor) -> float:
    """``Σ_d log N(x_d; m(z), K_d(z, z) + σ² I)`` through GPyTorch's ExactMarginalLogLikelihood."""
    d = x.shape[1]
    lik = gpytorch.likelihoods.GaussianLikelihood(batch_shape=torch.Size([d])).double()
    lik.noise = NOISE
    gp = _ExactGP(z, x.T.contiguous(), layer, lik).double().train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, gp)
    with torch.no_grad():
        return float(mll(gp(z), x.T.contiguous()).sum()) * x.shape[0]  # the mll is per point, per output


def _set_optimal_q(layer: GPLayer, inducing: torch.Tensor, z: torch.Tensor, x: torch.Tensor) -> None:
    """Put the inducing inputs at ``inducing`` ``(M, 1)`` and ``q(u)`` at its optimum for fixed
    hyper-parameters (Titsias 2009): ``Σ = K_uu + σ⁻² K_uf K_fu``, ``m = σ⁻² K_uu Σ⁻¹ K_uf (x - m(z))``,
    ``S = K_uu Σ⁻¹ K_uu``, then whitened with ``K_uu = L Lᵀ`` as GPyTorch stores it."""
    strategy = layer.variational_strategy
    d = x.shape[1]
    with torch.no_grad():
        strategy.inducing_points.copy_(inducing[None].expand(d, -1, -1))
        zb = z[None].expand(d, -1, -1)  # (D, N, 1)
        k_uu = layer.covar_module(strategy.inducing_points).to_dense()
        k_uu = k_uu + strategy.jitter_val * torch.eye(k_uu.shape[-1], dtype=k_uu.dtype)  # (D, M, M)
        k_uf = layer.covar_module(strategy.inducing_points, zb).to_dense()  # (D, M, N)
        resid = (x.T - layer.mean_module(zb))[..., None]  # (D, N, 1)
        sigma = k_uu + k_uf @ k_uf.mT / NOISE
        m_u = k_uu @ torch.linalg.solve(sigma, k_uf @ resid) / NOISE  # (D, M, 1)
        s_u = k_uu @ torch.linalg.solve(sigma, k_uu)
        chol = torch.linalg.cholesky(k_uu)
        m_v = torch.linalg.solve_triangular(chol, m_u, upper=False)[..., 0]
        a = torch.linalg.solve_triangular(chol, s_u, upper=False)
        s_v = torch.linalg.solve_triangular(chol, a.mT, upper=False)
        q = strategy._variational_distribution
        q.variational_mean.copy_(m_v)
        q.chol_variational_covar.copy_(torch.linalg.cholesky(0.5 * (s_v + s_v.mT)))
        strategy.variational_params_initialized.fill_(1)


def test_gp_bound_is_below_the_exact_marginal_likelihood_and_tight_with_inducing_at_the_inputs() -> None:
    n = 40
    x, z = _circle(n)

    def model_with(m: int) -> LatentVariableModel:
        """Same hyper-parameters for every M: the defaults, lengthscale 0.5."""
        model = build_vae_dgp(MLP(2, 2, (8,)), 1, 2, NOISE, layers=1, inducing=m).double().train()
        model.decoder.net.layers[0].covar_module.base_kernel.lengthscale = 0.5
        return model

    def bound(model: LatentVariableModel) -> float:
        with torch.no_grad():
            return float(gp_data_bound(model.decoder, z, x, n).sum())

    model = model_with(n)
    exact = _exact_log_marginal(model.decoder.net.layers[0], z, x)
    assert bound(model) < exact - 1.0  # q(u) initialized by GPyTorch at the prior on the first call
    gaps = []
    for m in (4, 12, n):  # nested inducing sets: the optimal bound cannot fall as M grows
        model = model_with(m)
        _set_optimal_q(model.decoder.net.layers[0], z[:m], z, x)
        gaps.append(exact - bound(model))
    assert all(g >= -1e-6 for g in gaps), gaps
    assert gaps[0] > 1.0, gaps  # four inducing points cannot fit a circle
    assert gaps[0] >= gaps[1] >= gaps[2] - 1e-6, gaps
    # at the inputs, only GPyTorch's predictive jitter (1e-6 per point and output) remains
    assert gaps[2] < 1e-2, gaps


def test_the_minibatch_bound_scales_the_gp_kl_by_the_batch_share() -> None:
    x, _ = _circle(30)
    model = build_vae_dgp(MLP(2, 2, (8,)), 1, 2, NOISE, layers=2, inducing=6).double().train()
    bound = DoublyStochasticGPBound(num_data=30, samples=3)
    model.decoder.net(torch.zeros(1, 1, dtype=torch.float64))  # GPyTorch draws q(u)'s start here
    torch.manual_seed(1)
    full = bound(model, x, torch.arange(30)).value
    torch.manual_seed(1)
    q = model.encoder(x)
    z = q.rsample((3,))
    params = model.decoder.net(z)  # the same draws of z and of the hidden layer
    ell = model.decoder.likelihood.expected_log_prob(x, params).mean(0)
    kl_z = torch.distributions.kl_divergence(q, model.prior())
    expected = ell.sum() - kl_z.sum() - model.decoder.net.kl_divergence()
    assert torch.allclose(full.sum(), expected, rtol=1e-10)
    assert bound.passes.decoder == 90 and bound.passes.encoder == 30


@pytest.fixture(scope="module")
def fitted() -> tuple[LatentVariableModel, torch.Tensor]:
    """A VAE-DGP fitted briefly on 300 circle points (float32, full batch, Adam)."""
    torch.manual_seed(0)
    x, _ = _circle(300)
    x = x.float()
    model = build_vae_dgp(MLP(2, 2, (32, 32)), 1, 2, NOISE, layers=1, inducing=16)
    bound = DoublyStochasticGPBound(num_data=300, samples=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(200):
        opt.zero_grad()
        (-bound(model, x, torch.arange(300)).value.mean()).backward()
        opt.step()
    return model.eval(), x


def test_the_encoder_infers_codes_for_unseen_points(fitted: tuple[LatentVariableModel, torch.Tensor]) -> None:
    model, _ = fitted
    x_new, _ = _circle(200, seed=7)  # points the model never saw
    x_new = x_new.float()
    with torch.no_grad():
        codes = model.encoder(x_new).mean  # (200, 1)
        recon = model.decoder.mean(codes)
        shuffled = model.decoder.mean(codes[torch.randperm(200)])
    err = (recon - x_new).square().sum(-1).mean()
    base = (shuffled - x_new).square().sum(-1).mean()
    # the noise alone contributes 2σ² = 0.02 per point
    assert err < 0.1, float(err)
    assert err < 0.1 * base, (float(err), float(base))


def test_quadrature_log_likelihood_matches_monte_carlo_over_z(
        fitted: tuple[LatentVariableModel, torch.Tensor]) -> None:
    model, x = fitted
    x = x[:20].double()
    quad = quadrature_log_likelihood(model.decoder, x, 2**14)
    dec = model.decoder.double()
    try:
        with torch.no_grad():
            s = 100_000
            z = torch.randn(s, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
            log_p = dec.likelihood.pairwise_log_prob(dec.net(z), x)  # (20, S)
    finally:
        model.float()
    mc = torch.logsumexp(log_p, -1) - math.log(s)
    w = torch.exp(log_p - log_p.max(-1, keepdim=True).values)
    rel_se = w.std(-1) / (w.mean(-1) * math.sqrt(s))  # delta method: s.e. of log of the mean
    assert torch.all((quad - mc).abs() < 5 * rel_se + 1e-3), (quad - mc, rel_se)
    assert float(quad.mean()) > -3.0  # a fitted model, not a flat density


@pytest.mark.parametrize(("layers", "learn_noise"), [(1, False), (2, True)])
def test_save_load_rebuilds_the_model_bit_for_bit(tmp_path, layers: int, learn_noise: bool) -> None:
    flags = ["train", "--out", str(tmp_path), "--method", "vae-dgp", "--data", "circle",
             "--gp-layers", str(layers), "--inducing", "8",
             "--learn-noise" if learn_noise else "--no-learn-noise"]
    cfg = config_from_args(build_parser().parse_args(flags))
    assert (cfg.gp_layers, cfg.inducing, cfg.learn_noise) == (layers, 8, learn_noise)
    cfg = TrainConfig(**{**cfg.to_dict(), "epochs": 2, "n_train": 60, "n_val": 30, "n_test": 30,
                         "samples": 2, "eval_every": 1, "val_grid": 256, "test_grid": 256,
                         "batch_size": 30})
    result = train(cfg, tmp_path, progress=False)
    saved = load_tensors(tmp_path / "model.pt")["model"]  # torch.load(weights_only=True)
    run = load_run(tmp_path)
    reloaded = run.model.state_dict()
    assert set(reloaded) == set(saved) == set(result.model.state_dict())
    for key, value in result.model.state_dict().items():
        assert reloaded[key].dtype == value.dtype and torch.equal(reloaded[key], value), key
    noise = run.model.decoder.likelihood.log_noise_var
    assert isinstance(noise, torch.nn.Parameter) == learn_noise
    if not learn_noise:
        assert float(noise.exp()) == pytest.approx(NOISE)
    z = torch.linspace(-2, 2, 9)[:, None]
    torch.manual_seed(5)
    a = result.model.eval().decoder.net(z)
    torch.manual_seed(5)
    b = run.model.decoder.net(z)
    assert torch.equal(a, b)
    assert result.metrics["gp_layers"] == layers and math.isfinite(result.metrics["test_kl"])
