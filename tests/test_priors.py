"""The copula prior for 1-D latents (App. C.3, SPEC §4)."""

from __future__ import annotations

import pytest
import torch

from mapa_vae.errors import MapaError
from mapa_vae.models.copula import MonotoneMap, copula_codes, fit_copula_prior
from mapa_vae.models.latent import StandardNormal


def test_copula_codes_are_whitened_normal_scores_in_the_same_order():
    z = torch.rand(5000, 1, dtype=torch.float64) ** 3  # skewed codes
    u = copula_codes(z)
    assert torch.equal(u.argsort(0), z.argsort(0))
    assert abs(float(u.mean())) < 1e-12 and abs(float(u.std()) - 1) < 1e-12
    # normal scores: the quartiles sit at ±0.674
    q = torch.quantile(u[:, 0], torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(q, torch.tensor([-0.6745, 0.6745], dtype=torch.float64), atol=5e-3,
                               rtol=0)


def test_copula_codes_need_a_one_dimensional_latent():
    with pytest.raises(MapaError, match="1-D latent"):
        copula_codes(torch.zeros(10, 2))


def test_exact_map_reproduces_the_trained_model_at_every_atom(mapa_model, circle_data):
    """``f† ∘ g† = f ∘ g`` on the training points, codes are the whitened normal scores."""
    x = circle_data
    new, fit = fit_copula_prior(mapa_model, x, method="map")
    with torch.no_grad():
        torch.testing.assert_close(new.encoder(x), copula_codes(mapa_model.encoder(x)), rtol=0,
                                   atol=1e-10)
        torch.testing.assert_close(new.decoder.mean(new.encoder(x)),
                                   mapa_model.decoder.mean(mapa_model.encoder(x)), rtol=0, atol=1e-10)
    assert fit.encoder_mse < 1e-18 and fit.decoder_kl < 1e-12
    # between atoms the map is monotone: the decoder path follows the codes in order
    z = torch.linspace(-3, 3, 500, dtype=torch.float64)[:, None]
    h = new.decoder.net[0]
    assert (h(z)[1:] >= h(z)[:-1]).all()


def test_monotone_map_round_trips_through_a_state_dict():
    h = MonotoneMap(torch.linspace(-2, 2, 7, dtype=torch.float64),
                    torch.linspace(0, 1, 7, dtype=torch.float64) ** 2)
    loaded = MonotoneMap()
    loaded.load_state_dict(h.state_dict())
    t = torch.randn(50, 1, dtype=torch.float64) * 3
    assert torch.equal(loaded(t), h(t))


def test_copula_prior_refit_reproduces_the_trained_model(mapa_model, circle_data):
    """The paper's refit: new networks match the old ``f(g(x))``, codes standard normal."""
    x = circle_data
    new, fit = fit_copula_prior(mapa_model, x, method="refit", steps=1500)
    assert isinstance(new.prior, StandardNormal)
    with torch.no_grad():
        z = new.encoder(x)
        old_mean = mapa_model.decoder.mean(mapa_model.encoder(x))
        new_mean = new.decoder.mean(z)
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1
    assert fit.encoder_mse < 0.05
    # KL between N(m, σ²I) and N(m', σ²I) is ‖m - m'‖² / 2σ²: report and check agree
    kl = float(((old_mean - new_mean) ** 2).sum(-1).mean() / (2 * 0.01))
    assert abs(kl - fit.decoder_kl) < 1e-6 and fit.decoder_kl < 0.5
    # the original model is untouched
    assert all(p.requires_grad for p in mapa_model.parameters())
