"""Likelihoods: the pairwise log-density every evaluator relies on, for every registered
likelihood, each built from a config by its own ``settings`` (no table of them here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mapa_vae.config import TrainConfig
from mapa_vae.models.likelihoods import Likelihood, make_likelihood
from mapa_vae.registry import LIKELIHOODS


def built(name: str) -> Likelihood:
    """The likelihood ``name`` as a run of a file of points with ``--noise-var 0.05`` builds it."""
    data = SimpleNamespace(name="points.npy", truth=None)
    return make_likelihood(LIKELIHOODS[name].settings(TrainConfig(noise_var=0.05), data))


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
@pytest.mark.parametrize("m", [7, 5000])  # 5000 × 70 × 20 exceeds one block: the chunked path
def test_pairwise_log_prob_equals_the_broadcast_density(name, m):
    lik = built(name)
    params = torch.randn(m, 20, dtype=torch.float64)
    x = torch.rand(70, 20, dtype=torch.float64)
    got = lik.pairwise_log_prob(params, x)
    want = torch.stack([lik(params).log_prob(x[b]) for b in range(x.shape[0])])  # (B, M)
    assert got.shape == (70, m)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
@pytest.mark.parametrize("shapes", [((40, 70, 20), (70, 20)),  # the referee's draws × points
                                    ((70, 3, 20), (70, 1, 20)),  # broadcast the other way
                                    ((20,), (20,))])
def test_log_prob_equals_the_distributions(name, shapes):
    """:meth:`Likelihood.log_prob` (the referee's, a faster form for the Bernoulli) gives the
    distribution's own log-density, on values anywhere in [0, 1]."""
    lik = built(name)
    params = 3 * torch.randn(shapes[0], dtype=torch.float64)
    x = torch.rand(shapes[1], dtype=torch.float64)
    x[..., :5] = x[..., :5].round()  # some exact 0s and 1s
    got, want = lik.log_prob(params, x), lik(params).log_prob(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_settings_round_trip_through_config(name):
    """What ``settings`` builds is what a checkpoint stores and rebuilds."""
    lik = built(name)
    assert lik.name == name
    again = make_likelihood(lik.config())
    assert type(again) is type(lik) and again.config() == lik.config()


def test_a_gaussian_on_a_file_needs_its_noise_variance():
    from mapa_vae.errors import MapaError

    with pytest.raises(MapaError, match="needs --noise-var"):
        LIKELIHOODS["gaussian"].settings(TrainConfig(), SimpleNamespace(name="points.npy", truth=None))
