"""The Hamming table for 0/1 data against the matrix-product table and a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch

from mapa_vae.errors import MapaError
from mapa_vae.inference.engines import concat_rows
from mapa_vae.inference.exact import compute_posterior
from mapa_vae.inference.hamming import hamming_log_kernel, hamming_top_k, product_available
from mapa_vae.kernels import BernoulliKernel

AMX = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
needs_product = pytest.mark.skipif(not product_available(), reason="no AMX tiles: no int8-product search")


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


@pytest.mark.parametrize("method", ["auto", "popcount"])
def test_rows_far_from_every_other_keep_a_finite_rest(method):
    """A rest mass ``9⁻⁶⁰⁰`` below the point's own is far below any float's range as a sum of
    exponentials; from the histogram it is exact in log space."""
    x = torch.zeros(6, 1200, dtype=torch.float64)
    x[3:, :600] = 1.0  # two groups 600 bits apart
    post = hamming_top_k(x, BernoulliKernel(0.9), 3, method=method)
    assert (post.index // 3 == torch.arange(6)[:, None] // 3).all()
    expected = math.log(3) + 600 * (math.log(0.1) - math.log(0.9)) - math.log(3)
    torch.testing.assert_close(post.log_rest, torch.full((6,), expected, dtype=torch.float64),
                               rtol=1e-12, atol=0)


def dense_table(x: torch.Tensor, kernel: BernoulliKernel) -> torch.Tensor:
    """``log q(i | n)`` ``(N, N)`` by brute force: the kernel at every distance, normalized by a
    float64 log-sum-exp."""
    h = (x[:, None, :] != x[None, :, :]).sum(-1)  # (N, N)
    log_k = hamming_log_kernel(kernel, x.shape[1])[h]
    return log_k - torch.logsumexp(log_k, 1, keepdim=True)


@pytest.mark.parametrize("method", ["product", "popcount"])
@pytest.mark.parametrize(("n", "d", "top_k", "block"), [
    (300, 8, 25, None), (211, 70, 40, 37), (120, 5, 120, 7), (90, 9, 1, None), (257, 130, 256, 256)])
def test_each_search_is_the_brute_force_table(method, n, d, top_k, block):
    """Many ties (few bits), duplicates, constant columns, ``N`` not a multiple of the block, ``K``
    of 1 and of ``N``: the same order as brute force, and values within rounding of the dense
    softmax, leftover included."""
    if method == "product" and not product_available():
        pytest.skip("no AMX tiles: no int8-product search")
    x, kernel = tied_binary_data(n, d), BernoulliKernel(0.8)
    post = hamming_top_k(x, kernel, top_k, block_size=block, method=method)
    assert torch.equal(post.index, reference_order(x, top_k))
    dense = dense_table(x, kernel)
    torch.testing.assert_close(post.log_q, dense.gather(1, post.index), rtol=0, atol=1e-12)
    rest = torch.logsumexp(dense.scatter(1, post.index, -math.inf), 1)
    torch.testing.assert_close(post.log_rest, rest, rtol=0, atol=1e-12)


@needs_product
@pytest.mark.parametrize(("n", "d", "top_k", "rho"), [(700, 40, 64, 0.8), (400, 300, 50, 0.6),
                                                      (96, 2100, 10, 0.95), (2100, 12, 700, 0.9)])
def test_product_and_popcount_give_the_same_table_bit_for_bit(n, d, top_k, rho):
    """Random 0/1 rows with ties; ``D = 2100`` puts the product's int16 keys near ``2¹⁵`` (16 rows
    of 2 101 bins a histogram call), ``N = 2100`` spans two atom tiles."""
    g = torch.Generator().manual_seed(n + d)
    x = (torch.rand(n, d, generator=g, dtype=torch.float64) < 0.2).double()
    x[: n // 5] = x[n // 5 : 2 * (n // 5)]  # duplicates
    kernel = BernoulliKernel(rho)
    a = hamming_top_k(x, kernel, top_k, method="product")
    b = hamming_top_k(x, kernel, top_k, method="popcount", block_size=53)
    for field in ("index", "log_q", "log_rest"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(a.index, reference_order(x, top_k))


@needs_product
def test_rows_whose_table_reaches_past_255_bits_are_redone_exactly():
    """The product first finds distances as ``min(h, 255)``; rows with no neighbour within 255 bits
    (outliers) sit in the same blocks as rows with close ones and are redone exactly."""
    g = torch.Generator().manual_seed(3)
    centres = (torch.rand(4, 900, generator=g) < 0.5).double()
    x = centres[torch.randint(0, 4, (310,), generator=g)]
    x = torch.where(torch.rand(x.shape, generator=g) < 0.03, 1 - x, x)  # ~30 bits off a centre
    x[::31] = (torch.rand(10, 900, generator=g) < 0.5).double()  # outliers, ~450 bits from all
    kernel = BernoulliKernel(0.7)
    a = hamming_top_k(x, kernel, 20, block_size=64, method="product")
    b = hamming_top_k(x, kernel, 20, method="popcount")
    for field in ("index", "log_q", "log_rest"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(a.index, reference_order(x, 20))
    assert torch.isfinite(a.log_rest).all()


def test_auto_takes_the_product_where_amx_is_and_refuses_unknown_methods():
    assert product_available() == AMX  # this check's speed claim and CI both assume AMX means product
    x = tied_binary_data(50, 6)
    with pytest.raises(MapaError, match="known: auto, product, popcount"):
        hamming_top_k(x, BernoulliKernel(0.9), 5, method="bits")
    if not AMX:
        with pytest.raises(MapaError, match="method='popcount'"):
            hamming_top_k(x, BernoulliKernel(0.9), 5, method="product")
