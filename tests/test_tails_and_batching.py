"""MAPA's tail proposals and batchings: the renormalized tail, the per-point and batch-shared
tails unbiased for the exact tail sum and a bound, and batchings that partition the data."""

from __future__ import annotations

import math

import pytest
import torch

from mapa_vae.config import TrainConfig
from mapa_vae.inference.exact import compute_posterior
from mapa_vae.inference.objectives import MAPA, EmpiricalLogLikelihood
from mapa_vae.inference.posterior import MapaPosterior
from mapa_vae.inference.tails import PerPointTail, SharedTail, TailProposal
from mapa_vae.kernels import GaussianKernel
from mapa_vae.registry import BATCHINGS, TAILS
from mapa_vae.training.batching import local_batches, random_batches

TAIL_CASES = [PerPointTail(), SharedTail(), SharedTail(floor=0.5)]


def _table(x: torch.Tensor, top_k: int) -> MapaPosterior:
    return compute_posterior(x, GaussianKernel(0.5), top_k=top_k)  # wide kernel: a heavy tail


@pytest.mark.parametrize("top_k", [40, 12])  # dense table, and a sparse one with leftover mass
def test_log_tail_prob_is_the_renormalized_tail(circle_data, top_k):
    x = circle_data[:40]
    post, k, rows = _table(x, top_k), 3, torch.tensor([0, 7, 39])
    q = post.log_tail_prob(rows, k, torch.arange(40)).exp()  # (3, 40)
    torch.testing.assert_close(q.sum(-1), torch.ones(3, dtype=q.dtype), rtol=0, atol=1e-12)
    assert bool((q.gather(1, post.top(rows, k)) == 0).all())
    stored = post.index[rows, k:]  # tail entries of the table: q(i|n) / tail mass
    want = (post.log_q[rows, k:] - post.log_tail_mass(rows, k)[:, None]).exp()
    torch.testing.assert_close(q.gather(1, stored), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("tail", TAIL_CASES, ids=["per-point", "shared", "shared-floor-0.5"])
@pytest.mark.parametrize("top_k", [30, 10])
def test_tail_estimate_is_unbiased_for_the_exact_tail_sum(circle_data, tail: TailProposal, top_k):
    """E[Σ_s exp(log p_n(i_s) + offset_ns)] = Σ_{i∉B_n(k)} p_n(i) for any positive p (Eq. 10)."""
    n, k, samples, draws = 30, 4, 8, 6000
    post = _table(circle_data[:n], top_k)
    rows = torch.tensor([0, 3, 11, 12, 29])
    p = torch.rand(rows.numel(), n, dtype=torch.float64) ** 3 + 1e-3  # (B, N) arbitrary p_n(i)
    in_top = torch.zeros(rows.numel(), n, dtype=torch.bool).scatter_(1, post.top(rows, k), True)
    exact = (p * ~in_top).sum(-1)  # (B,)
    gen = torch.Generator().manual_seed(1)
    est = torch.empty(draws, rows.numel(), dtype=torch.float64)
    for r in range(draws):
        idx, offset = tail.draw(post, rows, k, samples, gen)  # (B, S) each
        est[r] = (p.gather(1, idx).log() + offset).exp().sum(-1)
    mean, se = est.mean(0), est.std(0) / math.sqrt(draws)
    assert bool(((mean - exact).abs() <= 4 * se + 1e-12).all()), (mean, exact, se)
    assert bool((se < 0.05 * exact).all())  # precise enough that a wrong weight would show


@pytest.mark.parametrize("tail_name", list(TAILS))
def test_shared_tail_bound_never_exceeds_exact_likelihood(mapa_model, circle_data, tail_name):
    post = _table(circle_data, 200)
    index = torch.arange(0, 200, 2)  # a batch of 100
    x = circle_data[index]
    objective = MAPA(post, circle_data, k=3, samples=20, tail=TAILS[tail_name]())
    with torch.no_grad():
        exact = EmpiricalLogLikelihood(circle_data)(mapa_model, x).value  # (B,)
        vals = torch.stack([objective(mapa_model, x, index).value for _ in range(300)])  # (R, B)
        autoencoder = MAPA(post, circle_data, k=1, samples=0)(mapa_model, x, index).value
    mean, se = vals.mean(0), vals.std(0) / math.sqrt(vals.shape[0])
    assert bool((mean <= exact + 4 * se + 1e-9).all())
    assert float(vals.mean()) < float(exact.mean())  # Jensen's gap is strictly positive here
    assert float(mean.mean()) > float(autoencoder.mean())  # and the tail really adds mass


def test_shared_tail_passes_grow_with_unique_atoms(mapa_model, circle_data):
    post, index = _table(circle_data, 200), torch.arange(0, 200, 2)
    per_point = MAPA(post, circle_data, k=2, samples=30, tail=PerPointTail())
    shared = MAPA(post, circle_data, k=2, samples=30, tail=SharedTail())
    with torch.no_grad():
        per_point(mapa_model, circle_data[index], index)
        shared(mapa_model, circle_data[index], index)
    assert shared.passes.decoder <= index.numel() * 2 + 30  # the B·k top atoms plus S draws
    assert per_point.passes.decoder > shared.passes.decoder


@pytest.mark.parametrize("name", list(BATCHINGS))
def test_batching_is_a_partition_redrawn_every_epoch(circle_data, name):
    batches = BATCHINGS[name]
    first, second = batches(circle_data, 32), batches(circle_data, 32)
    for epoch in (first, second):
        flat = torch.cat(epoch)
        assert sorted(flat.tolist()) == list(range(200))
        assert [b.numel() for b in epoch].count(32) == 6  # all full but one of 8
    assert not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_random_batching_is_the_historical_order(circle_data):
    torch.manual_seed(3)
    want = torch.randperm(200)
    torch.manual_seed(3)
    got = torch.cat(random_batches(circle_data, 32))
    assert torch.equal(got, want)


def test_local_batches_share_neighbours(mapa_model, circle_data):
    """Local batches are tighter, and MAPA's forward-pass reuse then touches fewer atoms."""
    post = compute_posterior(circle_data, GaussianKernel(0.01), top_k=200)

    def spread_and_passes(batches: list[torch.Tensor]) -> tuple[float, int]:
        objective = MAPA(post, circle_data, k=8, samples=0)
        spread = 0.0
        with torch.no_grad():
            for b in batches:
                spread += float(torch.cdist(circle_data[b], circle_data[b]).mean())
                objective(mapa_model, circle_data[b], b)
        return spread / len(batches), objective.passes.decoder

    local = spread_and_passes(local_batches(circle_data, 20))
    rand = spread_and_passes(random_batches(circle_data, 20))
    assert local[0] < 0.5 * rand[0]
    assert local[1] < 0.6 * rand[1]


def test_config_knobs_choose_the_parts():
    cfg = TrainConfig(tail="shared", batching="local")
    assert isinstance(TAILS[cfg.tail](), SharedTail)
    assert BATCHINGS[cfg.batching] is local_batches
