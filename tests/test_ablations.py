"""The ablations' proposals (SPEC §5): MAPA-naive (uniform ``q(i | n)``) and MAPA-GT (the true
posterior of the empiricalized ground truth, paper Eq. 7)."""

from __future__ import annotations

import math

import pytest
import torch

from mapa_vae.data.groundtruth import ground_truth
from mapa_vae.errors import MapaError
from mapa_vae.inference.exact import ground_truth_posterior
from mapa_vae.inference.objectives import MAPA, EmpiricalLogLikelihood
from mapa_vae.inference.posterior import MapaPosterior, uniform_posterior

NOISE_VAR = 0.01  # the circle's σ²


def circle_sample(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` circle points and their true codes, ``(n, 2)`` and ``(n, 1)``, float64."""
    return ground_truth("circle", surrogate=False).sample(n, torch.Generator().manual_seed(seed))


def brute_force_eq7(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``log p(i | x_n)`` ``(N, N)`` by a double loop over ``(n, i)`` with a hand-written
    Gaussian density, from the analytic circle ``f(z) = (cos 2πΦ(z), sin 2πΦ(z))``."""
    n, d = x.shape
    log_lik = torch.empty(n, n, dtype=torch.float64)
    for a in range(n):
        for i in range(n):
            angle = 2 * math.pi * 0.5 * (1 + math.erf(float(z[i, 0]) / math.sqrt(2)))
            sq = (float(x[a, 0]) - math.cos(angle)) ** 2 + (float(x[a, 1]) - math.sin(angle)) ** 2
            log_lik[a, i] = -sq / (2 * NOISE_VAR) - 0.5 * d * math.log(2 * math.pi * NOISE_VAR)
    return log_lik - torch.logsumexp(log_lik, -1, keepdim=True)


def check_table(post: MapaPosterior) -> None:
    """The layout every MAPA posterior shares: ``n`` first, the rest in descending order, and
    the stored mass plus the leftover summing to one."""
    n = post.n_points
    assert torch.equal(post.index[:, 0], torch.arange(n))
    assert (post.log_q[:, 1:-1] >= post.log_q[:, 2:]).all()
    total = torch.logaddexp(torch.logsumexp(post.log_q, -1), post.log_rest)
    torch.testing.assert_close(total, torch.zeros(n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("top_k", [None, 25])
def test_uniform_posterior_is_uniform(top_k):
    n = 200
    post = uniform_posterior(n, top_k=top_k)
    k_keep = n if top_k is None else top_k
    assert post.log_q.shape == (n, k_keep)
    assert (post.log_q == -math.log(n)).all()
    check_table(post)
    # each row stores distinct indices
    assert all(len(set(row.tolist())) == k_keep for row in post.index)
    if top_k is None:
        assert (post.log_rest == -math.inf).all()
        torch.testing.assert_close(post.dense(), torch.full((n, n), -math.log(n), dtype=torch.float64))


@pytest.mark.parametrize("top_k", [None, 25])
def test_uniform_tail_sampler_is_uniform(top_k):
    """Draws from ``q̃_k`` cover the ``N - k`` tail indices uniformly: the Pearson statistic over
    the 195 tail cells is within 5 standard deviations of its mean (df = 194), and
    ``log q̃_k(i) = -log(N - k)`` for every draw. With ``top_k = 25`` most draws come from the
    indices that were never stored, so this also checks the sparse table's leftover mass."""
    n, k, draws = 200, 5, 40_000
    post = uniform_posterior(n, top_k=top_k)
    rows = torch.tensor([0, 57, 199])
    idx, log_q = post.sample_tail(rows, k, draws, torch.Generator().manual_seed(0))
    torch.testing.assert_close(log_q, torch.full_like(log_q, -math.log(n - k)), rtol=0, atol=1e-12)
    df = n - k - 1
    for r in range(rows.numel()):
        counts = torch.bincount(idx[r], minlength=n).double()
        top = post.top(rows[r : r + 1], k)[0]
        assert (counts[top] == 0).all()  # B_n(k) is never drawn
        tail = counts[torch.isin(torch.arange(n), top, invert=True)]
        expected = draws / (n - k)
        chi2 = float(((tail - expected) ** 2 / expected).sum())
        assert abs(chi2 - df) < 5 * math.sqrt(2 * df), chi2


def test_ground_truth_posterior_is_eq7_by_brute_force():
    x, z = circle_sample(60)
    decoder = ground_truth("circle", surrogate=False).decoder
    post = ground_truth_posterior(x, z, decoder, block_size=17)  # 17 does not divide N
    check_table(post)
    torch.testing.assert_close(post.dense(), brute_force_eq7(x, z), rtol=0, atol=1e-10)


def test_sparse_ground_truth_posterior_keeps_the_top_entries():
    x, z = circle_sample(120)
    decoder = ground_truth("circle", surrogate=False).decoder
    dense = ground_truth_posterior(x, z, decoder).dense()  # (N, N)
    post = ground_truth_posterior(x, z, decoder, top_k=10, block_size=50)
    check_table(post)
    torch.testing.assert_close(post.log_q, dense.gather(1, post.index), rtol=0, atol=1e-12)
    rest = dense.scatter(1, post.index, -math.inf)
    torch.testing.assert_close(post.log_rest, torch.logsumexp(rest, -1), rtol=0, atol=1e-12)
    # the stored entries are the 9 largest besides n itself (up to ties)
    smallest_stored = post.log_q[:, 1:].min(-1).values
    assert (smallest_stored >= rest.max(-1).values - 1e-12).all()


def test_ground_truth_posterior_concentrates_where_uniform_does_not():
    """Eq. 7 puts most of ``x_n``'s mass on a few atoms: on the circle with σ = 0.1, the top 10
    of 200 hold over half of it for every point (measured: at least 0.60; uniform: 0.05)."""
    x, z = circle_sample(200)
    post = ground_truth_posterior(x, z, ground_truth("circle", surrogate=False).decoder)
    top_mass = torch.logsumexp(torch.sort(post.log_q, -1, descending=True).values[:, :10], -1).exp()
    assert (top_mass > 0.5).all(), float(top_mass.min())


@pytest.mark.parametrize("which", ["uniform", "ground-truth"])
def test_mapa_with_all_atoms_is_exact_for_either_proposal(which, mapa_model):
    """``k = N, S = 0`` sums over every atom, so the proposal cannot matter (Eq. 6)."""
    x, z = circle_sample(200)
    if which == "uniform":
        post = uniform_posterior(200)
    else:
        post = ground_truth_posterior(x, z, ground_truth("circle", surrogate=False).decoder)
    index = torch.arange(0, 200, 9)
    exact = EmpiricalLogLikelihood(x)(mapa_model, x[index]).value
    got = MAPA(post, x, k=200, samples=0)(mapa_model, x[index], index).value
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-10)


def test_bad_arguments_are_one_line_errors():
    x, z = circle_sample(10)
    with pytest.raises(MapaError, match="10 points but 9 true codes"):
        ground_truth_posterior(x, z[:9], ground_truth("circle", surrogate=False).decoder)
    with pytest.raises(MapaError, match="uniform posterior needs N >= 1"):
        uniform_posterior(0)
