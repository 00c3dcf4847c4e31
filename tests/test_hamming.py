"""The Hamming table for 0/1 data against the matrix-product table and a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch

from mapa_vae.inference.engines import concat_rows
from mapa_vae.inference.exact import compute_posterior
from mapa_vae.inference.hamming import hamming_log_kernel
from mapa_vae.kernels import BernoulliKernel


def tied_binary_data(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """``n`` random 0/1 rows of ``d`` bits, few enough bits that distances tie, with duplicates
    and two constant columns (dropped by the search, kept by the kernel)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, d, generator=g, dtype=torch.float64) < 0.3).double()
    x[:, 0], x[:, -1] = 1.0, 0.0
    x[5], x[9], x[n - 1] = x[7], x[7], x[0]
    return x


def reference_order(x: torch.Tensor, k_keep: int) -> torch.Tensor:
    """The top ``K`` by brute force: the point itself, then distance, then index."""
    n = x.shape[0]
    h = (x[:, None, :] != x[None, :, :]).sum(-1)  # (N, N)
    h[torch.arange(n), torch.arange(n)] = -1
    return torch.sort(h * n + torch.arange(n), 1).indices[:, :k_keep]


@pytest.mark.parametrize(("n", "d", "top_k"), [(300, 8, 25), (211, 70, 40), (120, 5, 120), (90, 9, 1)])
def test_hamming_table_is_the_matmul_table_with_ties_broken_by_index(n, d, top_k):
    x, kernel = tied_binary_data(n, d), BernoulliKernel(0.8)
    fast = compute_posterior(x, kernel, top_k=top_k, block_size=37)  # detected: 0/1 data
    slow = compute_posterior(x, kernel, top_k=top_k, block_size=37, hamming=False)
    assert torch.equal(fast.index, reference_order(x, top_k))
    # the same kernel values at every rank, and the same rest mass
    torch.testing.assert_close(fast.log_q, slow.log_q, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast.log_rest, slow.log_rest, rtol=0, atol=1e-12)
    # the same atoms wherever the matmul table's order is not a tie
    h = (x[:, None, :] != x[None, :, :]).sum(-1)
    boundary = h.gather(1, fast.index[:, -1:])  # the distance of each row's K-th entry
    inner = h.gather(1, fast.index) < boundary
    assert torch.equal(torch.sort(torch.where(inner, fast.index, -1), 1).values,
                       torch.sort(torch.where(h.gather(1, slow.index) < boundary, slow.index, -1), 1).values)
    assert torch.equal(fast.index[:, 0], torch.arange(n))  # duplicates never displace the point


def test_hamming_values_are_the_kernel_log_values():
    kernel, d = BernoulliKernel(0.7), 6
    x = torch.tensor([[1.0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 1], [1, 0, 1, 1, 0, 1]])
    log_k = kernel.log_kernel(x.double(), x.double())  # (3, 3), the matrix product
    h = (x[:, None, :] != x[None, :, :]).sum(-1)
    torch.testing.assert_close(hamming_log_kernel(kernel, d)[h], log_k, rtol=0, atol=1e-12)
    post = compute_posterior(x, kernel)
    dense = post.dense().exp()
    torch.testing.assert_close(dense, torch.softmax(log_k, 1), rtol=0, atol=1e-12)


def test_hamming_shards_concatenate_and_float32_follows():
    x, kernel = tied_binary_data(200, 16, seed=1), BernoulliKernel(0.9)
    full = compute_posterior(x, kernel, top_k=30)
    shards = [compute_posterior(x, kernel, top_k=30, rows=r) for r in [(0, 77), (77, 150), (150, 200)]]
    joined = concat_rows(shards)
    assert torch.equal(joined.index, full.index) and torch.equal(joined.log_q, full.log_q)
    low = compute_posterior(x.float(), kernel, top_k=30, dtype=torch.float32)
    assert low.log_q.dtype == torch.float32 and torch.equal(low.index, full.index)
    total = torch.logaddexp(torch.logsumexp(full.log_q, 1), full.log_rest)
    torch.testing.assert_close(total, torch.zeros(200, dtype=torch.float64), rtol=0, atol=1e-12)


def test_rows_far_from_every_other_keep_a_finite_rest():
    """A rest mass ``9⁻⁶⁰⁰`` below the point's own is far below any float's range as a sum of
    exponentials; from the histogram it is exact in log space."""
    x = torch.zeros(6, 1200, dtype=torch.float64)
    x[3:, :600] = 1.0  # two groups 600 bits apart
    post = compute_posterior(x, BernoulliKernel(0.9), top_k=3)
    assert (post.index // 3 == torch.arange(6)[:, None] // 3).all()
    expected = math.log(3) + 600 * (math.log(0.1) - math.log(0.9)) - math.log(3)
    torch.testing.assert_close(post.log_rest, torch.full((6,), expected, dtype=torch.float64),
                               rtol=1e-12, atol=0)
