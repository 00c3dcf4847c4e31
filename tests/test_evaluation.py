"""Quadrature and importance-sampled log-likelihoods, and the test KL (SPEC §7)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from mapa_vae.data.groundtruth import GROUND_TRUTHS, ground_truth
from mapa_vae.evaluation.likelihood import importance_log_likelihood, quadrature_log_likelihood, test_kl
from mapa_vae.models.latent import Decoder
from mapa_vae.models.likelihoods import GaussianLikelihood


class Affine(torch.nn.Module):
    """``f(z) = a z + b`` so that ``x ~ N(b, a aᵀ + σ² I)`` exactly."""

    def __init__(self, a: list[float], b: list[float]) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.a + self.b


def test_quadrature_matches_the_closed_form_marginal():
    f = Affine([1.5, -0.7], [0.3, 0.1])
    noise = 0.05
    dec = Decoder(f, GaussianLikelihood(noise))
    x = torch.randn(50, 2, dtype=torch.float64) * 1.5
    cov = torch.outer(f.a, f.a).detach() + noise * torch.eye(2, dtype=torch.float64)
    want = MultivariateNormal(f.b.detach(), cov).log_prob(x)
    torch.testing.assert_close(quadrature_log_likelihood(dec, x), want, rtol=0, atol=1e-6)


def test_quadrature_density_integrates_to_one():
    truth = ground_truth("circle", surrogate=False)
    h = 0.025
    axis = torch.arange(-1.6, 1.6 + h / 2, h, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)  # (G, 2) covers the circle ± 6σ
    mass = quadrature_log_likelihood(truth.decoder, grid, grid=2**13).exp().sum() * h * h
    assert abs(float(mass) - 1.0) < 5e-3


def test_quadrature_matches_brute_force_monte_carlo():
    truth = ground_truth("figure-8", surrogate=False)
    x, _ = truth.sample(6, torch.Generator().manual_seed(4))
    z = torch.randn(1_000_000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        dist = truth.decoder(z)
        mc = torch.stack([torch.logsumexp(dist.log_prob(xi), 0) - math.log(z.shape[0]) for xi in x])
    torch.testing.assert_close(quadrature_log_likelihood(truth.decoder, x), mc, rtol=0, atol=0.03)


@pytest.mark.parametrize("name", list(GROUND_TRUTHS))
def test_quadrature_grid_has_converged(name):
    """The default grid (2¹⁶) agrees with one 4 times finer on every data set's curve."""
    truth = ground_truth(name, surrogate=False)
    x, _ = truth.sample(150, torch.Generator().manual_seed(2))
    coarse = quadrature_log_likelihood(truth.decoder, x, grid=2**16)
    fine = quadrature_log_likelihood(truth.decoder, x, grid=2**18)
    assert float((coarse - fine).abs().max()) < 1e-3


def test_importance_sampling_is_below_and_close_to_quadrature(vae_model, circle_data):
    x = circle_data[:20]
    exact = quadrature_log_likelihood(vae_model.decoder, x)
    runs = torch.stack([importance_log_likelihood(vae_model, x, samples=2000) for _ in range(20)])
    mean, se = runs.mean(0), runs.std(0) / math.sqrt(runs.shape[0])
    assert (mean <= exact + 4 * se + 1e-9).all()
    assert float((exact - mean).abs().max()) < 0.05


def test_kl_of_truth_to_itself_is_zero_and_to_a_perturbed_model_positive():
    truth = ground_truth("absolute-value", surrogate=False)
    x, _ = truth.sample(500, torch.Generator().manual_seed(9))
    same = test_kl(truth.model, truth.model, x, grid=2**12)
    assert same.kl == 0.0 and same.stderr == 0.0
    other = ground_truth("absolute-value", surrogate=False)
    other.model.decoder.likelihood.noise_var = 0.02  # twice the noise: a different model
    kl = test_kl(truth.model, other.model, x, grid=2**12)
    # exact KL between N(m, 0.01 I) and N(m, 0.02 I) in 2-D is log 2 - 1/2 = 0.193 on the same
    # curve; the marginals differ by about that much
    assert 0.1 < kl.kl < 0.25 and kl.stderr < 0.02


@pytest.mark.parametrize("method", ["vae", "mapa"])
def test_the_final_evaluation_gives_each_split_its_own_scores(method, vae_model, mapa_model, circle_data):
    """``train``'s final evaluation scores validation and test in one call (one pilot, one atom
    table): each split still gets its own points' values, here exact by quadrature (1-D latent),
    and MAPA's exact empiricalized score of the test points over the training atoms."""
    from mapa_vae.data.dataset import Dataset
    from mapa_vae.evaluation.referee import Referee
    from mapa_vae.registry import METHODS
    from mapa_vae.training.loop import evaluate_final

    model = vae_model if method == "vae" else mapa_model
    data = Dataset("circle", circle_data[:100], circle_data[100:130], circle_data[130:])
    out = evaluate_final(METHODS[method], model, data, grid=2**12, progress=False)
    exact = {split: quadrature_log_likelihood(model.decoder, x, 2**12).mean()
             for split, x in (("val", data.val), ("test", data.test))}
    assert out["val_log_lik"] == pytest.approx(float(exact["val"]), abs=1e-9)
    assert out["test_log_lik"] == pytest.approx(float(exact["test"]), abs=1e-9)
    assert abs(float(exact["val"] - exact["test"])) > 1e-3  # swapped splits would show
    if method == "mapa":
        empirical = Referee(model, data.train).empirical(data.test)
        assert empirical is not None
        assert out["test_empirical_log_lik"] == pytest.approx(float(empirical.mean()), abs=1e-9)
