"""The per-point tail sampler built once (inference/tails.py ``TailTable``) draws from
``q̃_k(· | n)`` (Eq. 9) and reports its exact log density, for sparse and full tables."""

from __future__ import annotations

import math

import pytest
import torch

from mapa_vae.inference.posterior import MapaPosterior
from mapa_vae.inference.tails import TailTable

N = 30


def random_posterior(top_k: int) -> MapaPosterior:
    """A posterior over ``N`` points with ``top_k`` entries stored per row, the point first."""
    g = torch.Generator().manual_seed(top_k)
    log_q = torch.log_softmax(2 * torch.randn(N, N, generator=g, dtype=torch.float64), -1)
    order = torch.argsort(log_q + 1e3 * torch.eye(N, dtype=torch.float64), -1, descending=True)
    index = order[:, :top_k]  # (N, K): the point itself first, then by mass
    stored = torch.gather(log_q, 1, index)
    rest = torch.log1p(-stored.exp().sum(-1).clamp_max(1.0)) if top_k < N else \
        torch.full((N,), -math.inf, dtype=torch.float64)
    return MapaPosterior(stored, index, rest)


@pytest.mark.parametrize(("top_k", "k"), [(8, 2), (N, 3), (3, 3)])
def test_tail_table_draws_the_tail_proposal(top_k, k):
    post = random_posterior(top_k)
    rows = torch.tensor([0, 7, 29])
    draws = 100_000
    idx, log_q = TailTable(post, k).sample(rows, draws, torch.Generator().manual_seed(1))
    assert idx.shape == log_q.shape == (3, draws)
    torch.testing.assert_close(log_q, post.log_tail_prob(rows, k, idx), rtol=0, atol=1e-12)
    exact = post.log_tail_prob(rows, k, torch.arange(N)).exp()  # (3, N); 0 inside B_n(k)
    for b in range(3):
        freq = torch.bincount(idx[b], minlength=N).double() / draws
        stderr = (exact[b] * (1 - exact[b]) / draws).sqrt()
        assert bool((freq - exact[b]).abs().le(5 * stderr + 1e-12).all()), (freq, exact[b])
