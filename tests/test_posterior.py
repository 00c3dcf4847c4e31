"""The MAPA posterior: kernels, blocked top-K against a dense reference, tail sampler (its cache:
tests/test_cache.py)."""

from __future__ import annotations

import math

import pytest
import torch

from mapa_vae.errors import MapaError
from mapa_vae.inference.exact import compute_posterior
from mapa_vae.kernels import BernoulliKernel, GaussianKernel, Kernel


def dense_reference(x: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """``log q(i | n)`` ``(N, N)`` written directly from Eq. 8, without the matmul tricks."""
    if isinstance(kernel, GaussianKernel):
        log_k = -((x[:, None, :] - x[None, :, :]) ** 2).sum(-1) / (2 * kernel.noise_var)
    else:
        assert isinstance(kernel, BernoulliKernel)
        mu = kernel.rho * x + (1 - kernel.rho) * (1 - x)  # (N, D) per atom
        log_k = (x[:, None, :] * mu[None].log() + (1 - x[:, None, :]) * (1 - mu[None]).log()).sum(-1)
    return log_k - torch.logsumexp(log_k, -1, keepdim=True)


def binary_data(n: int = 150, d: int = 12) -> torch.Tensor:
    return (torch.rand(n, d, dtype=torch.float64) < 0.3).double()


KERNELS = [
    pytest.param(lambda: GaussianKernel(0.01), lambda c: c, id="gaussian"),
    pytest.param(lambda: BernoulliKernel(0.9), lambda c: binary_data(), id="bernoulli"),
]


@pytest.mark.parametrize(("make_kernel", "make_data"), KERNELS)
@pytest.mark.parametrize("top_k", [7, 64, None])
def test_blocked_top_k_matches_dense_reference(make_kernel, make_data, top_k, circle_data):
    kernel, x = make_kernel(), make_data(circle_data)
    n = x.shape[0]
    ref = dense_reference(x, kernel)  # (N, N)
    post = compute_posterior(x, kernel, top_k=top_k, block_size=37)  # 37 does not divide N
    k_keep = n if top_k is None else top_k
    assert post.log_q.shape == (n, k_keep)
    # the point itself first, with its true probability
    assert torch.equal(post.index[:, 0], torch.arange(n))
    torch.testing.assert_close(post.log_q[:, 0], ref.diagonal(), rtol=0, atol=1e-9)
    # stored values are the reference's values at the stored indices
    torch.testing.assert_close(post.log_q, ref.gather(1, post.index), rtol=0, atol=1e-9)
    # and they are the K largest: the smallest stored beats the largest unstored (up to ties)
    masked = ref.scatter(1, post.index, -math.inf)
    if k_keep < n:
        assert (post.log_q.min(1).values >= masked.max(1).values - 1e-9).all()
        torch.testing.assert_close(post.log_rest, torch.logsumexp(masked, 1), rtol=0, atol=1e-9)
    else:
        assert torch.isinf(post.log_rest).all()
    total = torch.logaddexp(torch.logsumexp(post.log_q, 1), post.log_rest)
    torch.testing.assert_close(total, torch.zeros(n, dtype=total.dtype), rtol=0, atol=1e-9)


def test_self_is_most_probable_for_both_kernels(circle_data):
    for kernel, x in ((GaussianKernel(0.01), circle_data), (BernoulliKernel(0.8), binary_data())):
        ref = dense_reference(x, kernel)
        unique_rows = torch.unique(x, dim=0).shape[0] == x.shape[0]
        if unique_rows:
            assert (ref.argmax(1) == torch.arange(x.shape[0])).all()


def test_bernoulli_kernel_never_minus_infinity():
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    log_k = BernoulliKernel(0.9).log_kernel(x, x)
    assert torch.isfinite(log_k).all()
    torch.testing.assert_close(log_k[0, 1], torch.tensor(2 * math.log(0.1), dtype=torch.float64))


@pytest.mark.parametrize("top_k", [200, 40])
@pytest.mark.parametrize("k", [1, 5])
def test_tail_sampler_draws_from_renormalized_tail(circle_data, top_k, k):
    """Empirical frequencies of i ~ q̃_k(· | n) match q̃_k (Eq. 9) for dense and sparse tables."""
    x = circle_data
    n = x.shape[0]
    post = compute_posterior(x, GaussianKernel(0.5), top_k=top_k)  # wide: a heavy tail
    rows = torch.tensor([0, 17])
    draws = 40_000
    idx, log_tilde = post.sample_tail(rows, k, draws, torch.Generator().manual_seed(1))
    # exact q̃_k for these rows: stored entries past k, plus the rest spread uniformly
    for r, row in enumerate(rows):
        q = torch.full((n,), -math.inf, dtype=torch.float64)
        q[post.index[row, k:]] = post.log_q[row, k:]
        unstored = torch.ones(n, dtype=torch.bool)
        unstored[post.index[row]] = False
        if top_k < n:
            q[unstored] = post.log_rest[row] - math.log(n - top_k)
        q_tilde = q - torch.logsumexp(q, 0)
        assert not torch.isin(idx[r], post.index[row, :k]).any()  # never B_n(k)
        torch.testing.assert_close(log_tilde[r], q_tilde[idx[r]], rtol=0, atol=1e-9)
        freq = torch.bincount(idx[r], minlength=n).double() / draws
        tv = 0.5 * (freq - q_tilde.exp()).abs().sum()
        assert tv < 0.03, f"total variation {tv:.3f} between samples and q̃"
        expected = draws * float(q_tilde[unstored].exp().min()) if top_k < n else 0.0
        if expected > 20:  # every unstored index is reached: the tail has full support
            assert set(idx[r][unstored[idx[r]]].tolist()) == set(unstored.nonzero()[:, 0].tolist())


def test_check_budget_errors(circle_data):
    post = compute_posterior(circle_data[:50], GaussianKernel(0.01))
    post.check_budget(50, 0)  # k = N, S = 0: exact
    post.check_budget(9, 40)  # k + S = N - 1
    for k, s in [(51, 0), (10, 40), (0, 5), (1, -1)]:
        with pytest.raises(MapaError):
            post.check_budget(k, s)
    sparse = compute_posterior(circle_data[:50], GaussianKernel(0.01), top_k=5)
    with pytest.raises(MapaError, match="neighbours stored"):
        sparse.check_budget(6, 0)
