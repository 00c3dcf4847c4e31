"""Likelihoods: the pairwise log-density every evaluator relies on, for every likelihood."""

from __future__ import annotations

import pytest
import torch

from mapa_vae.models.likelihoods import make_likelihood
from mapa_vae.registry import LIKELIHOODS

CONFIGS = {"gaussian": {"noise_var": 0.05}, "bernoulli": {"rho": 0.9},
           "continuous-bernoulli": {"rho": 0.9}}


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
@pytest.mark.parametrize("m", [7, 5000])  # 5000 × 70 × 20 exceeds one block: the chunked path
def test_pairwise_log_prob_equals_the_broadcast_density(name, m):
    lik = make_likelihood({"name": name, **CONFIGS[name]})
    params = torch.randn(m, 20, dtype=torch.float64)
    x = torch.rand(70, 20, dtype=torch.float64)
    got = lik.pairwise_log_prob(params, x)
    want = torch.stack([lik(params).log_prob(x[b]) for b in range(x.shape[0])])  # (B, M)
    assert got.shape == (70, m)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
