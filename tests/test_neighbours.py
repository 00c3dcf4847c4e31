"""The approximate MAPA posterior (faiss) against the exact one; engines and shards (the cache key
over engines: tests/test_cache.py)."""

from __future__ import annotations

import math

import pytest
import torch

from mapa_vae.errors import MapaError
from mapa_vae.inference.engines import build_posterior, concat_rows, resolve_engine
from mapa_vae.inference.exact import compute_posterior
from mapa_vae.inference.neighbours import NeighbourIndex
from mapa_vae.inference.objectives import MAPA, EmpiricalLogLikelihood
from mapa_vae.inference.posterior import MapaPosterior
from mapa_vae.kernels import BernoulliKernel, GaussianKernel, Kernel


def manifold_data(n: int = 3000, d: int = 16, latent: int = 3, binary: bool = False) -> torch.Tensor:
    """``n`` points near a ``latent``-dimensional curved manifold in ``d`` dimensions (float64)."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, latent, generator=g, dtype=torch.float64)
    w1 = torch.randn(latent, 32, generator=g, dtype=torch.float64)
    w2 = torch.randn(32, d, generator=g, dtype=torch.float64) / math.sqrt(32)
    x = torch.tanh(z @ w1) @ w2 + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return (x > 0).double() if binary else x


CASES = [
    pytest.param(lambda: GaussianKernel(0.05), False, id="gaussian"),
    pytest.param(lambda: BernoulliKernel(0.9), True, id="bernoulli"),
]


def _same(a: MapaPosterior, b: MapaPosterior) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("log_q", "index", "log_rest"))


def _check_layout(post: MapaPosterior) -> None:
    """The point itself first, the rest descending, and stored + rest mass = 1 per row."""
    n = post.n_points
    assert torch.equal(post.index[:, 0], torch.arange(n))
    assert (post.log_q[:, 1:-1] >= post.log_q[:, 2:]).all()
    assert torch.isfinite(post.log_rest).all()
    total = torch.logaddexp(torch.logsumexp(post.log_q, 1), post.log_rest)
    torch.testing.assert_close(total, torch.zeros(n, dtype=total.dtype), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("make_kernel", "binary"), CASES)
@pytest.mark.parametrize("index", ["hnsw", "ivf"])
def test_approximate_top_k_recalls_the_exact_one(make_kernel, binary, index):
    """recall@32 >= 0.9 on 3000 points; a tie with the exact K-th value counts as a hit."""
    kernel: Kernel = make_kernel()
    x, k = manifold_data(binary=binary), 32
    approx = build_posterior(x, kernel, top_k=k, engine="faiss", index=index)
    _check_layout(approx)
    log_k = kernel.log_kernel(x, x)  # (N, N): small enough here
    exact = compute_posterior(x, kernel, top_k=k)
    kth = log_k.gather(1, exact.index).min(1, keepdim=True).values  # (N, 1)
    recall = (log_k.gather(1, approx.index[:, 1:]) >= kth - 1e-9).double().mean()
    assert recall >= 0.9, f"recall@{k} = {recall:.3f}"
    # the stored entries are exact kernel ratios, only the normalizer is estimated
    log_k_stored = log_k.gather(1, approx.index)
    torch.testing.assert_close(approx.log_q - approx.log_q[:, :1], log_k_stored - log_k_stored[:, :1],
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("noise_var", [0.05, 0.5])
def test_rest_mass_estimate_is_close_to_the_exact_rest(noise_var):
    """The E neighbours past the top K plus 64 uniform draws estimate the mass outside the
    stored K within 15 % (median over rows) for a narrow and a wide kernel."""
    x, kernel = manifold_data(), GaussianKernel(noise_var)
    exact = compute_posterior(x, kernel, top_k=32)
    approx = build_posterior(x, kernel, top_k=32, engine="faiss", index="hnsw")
    err = (approx.log_rest.exp() - exact.log_rest.exp()).abs() / exact.log_rest.exp()
    assert float(err.median()) < 0.15, f"median relative error of the rest mass {err.median():.3f}"
    # uniform draws alone are unbiased but miss the near tail: far worse for the narrow kernel
    draws_only = build_posterior(x, kernel, top_k=32, engine="faiss", index="hnsw", tail_neighbours=0)
    err_draws = (draws_only.log_rest.exp() - exact.log_rest.exp()).abs() / exact.log_rest.exp()
    assert float(err_draws.median()) > float(err.median())


def test_floor_keeps_the_tail_finite(circle_data):
    """K = N - 1, no exact tail neighbours and 4 draws: most rows never draw their one unstored
    index, yet log_rest is finite, at the floor ε (N - K) / N of the stored mass."""
    n = circle_data.shape[0]
    post = build_posterior(circle_data, GaussianKernel(0.01), top_k=n - 1, engine="faiss",
                           index="flat", tail_neighbours=0, tail_samples=4, tail_floor=1e-6)
    _check_layout(post)
    floor = math.log(1e-6 / n) - math.log1p(1e-6 / n)  # the rest's share when it sits at the floor
    assert (post.log_rest >= floor - 1e-9).all()
    assert (post.log_rest - floor).abs().lt(1e-9).double().mean() > 0.5


def test_mapa_bound_with_the_approximate_posterior_stays_a_bound(circle_data, mapa_model):
    """SPEC §3: any full-support proposal keeps MAPA below the exact empiricalized likelihood in
    expectation; the approximate table (an HNSW search on 200 points, estimated rest) is one."""
    x, idx = circle_data, torch.arange(circle_data.shape[0])
    post = build_posterior(x, GaussianKernel(0.01), top_k=20, engine="faiss", index="hnsw",
                           ef_search=20, tail_samples=16)
    with torch.no_grad():
        exact = float(EmpiricalLogLikelihood(x)(mapa_model, x).value.mean())
        bound = MAPA(post, x, k=3, samples=10, generator=torch.Generator().manual_seed(0))
        draws = torch.stack([bound(mapa_model, x, idx).value.mean() for _ in range(400)])  # (R,)
    mean, se = float(draws.mean()), float(draws.std() / math.sqrt(draws.numel()))
    assert mean <= exact + 4 * se, f"MAPA {mean:.4f} ± {se:.4f} above the exact {exact:.4f}"
    assert mean > exact - 3.0  # and not vacuous


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_rest_survives_underflow(dtype):
    """Two clusters 10 apart with σ² = 0.01: each point stores its own cluster and the rest,
    the other cluster at log k ≈ -5000, underflows any exp; it is still found, in log space."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(12, 3, generator=g, dtype=torch.float64) * 0.1 + c for c in (0.0, 10.0)])
    kernel = GaussianKernel(0.01)
    ref = kernel.log_kernel(x, x)  # (24, 24), float64
    ref = ref - torch.logsumexp(ref, -1, keepdim=True)
    post = compute_posterior(x.to(dtype), kernel, top_k=12, dtype=dtype, block_size=7)
    assert (post.index // 12 == torch.arange(24)[:, None] // 12).all()  # its own cluster
    rest = torch.logsumexp(ref.scatter(1, post.index, -math.inf), -1)
    assert (rest < -1000).all() and torch.isfinite(post.log_rest).all()
    torch.testing.assert_close(post.log_rest.double(), rest, rtol=1e-5, atol=0)


def test_float32_exact_posterior_is_accurate_away_from_the_origin():
    """The matmul expansion of ‖x_n - x_i‖² rounds at eps · ‖x‖² / 2σ²; centring the data keeps
    float32 within 1e-2 nats of float64 for data 5 away from the origin (0.18 uncentred)."""
    x, kernel = manifold_data(n=1000) + 5.0, GaussianKernel(0.001)
    ref = compute_posterior(x, kernel, top_k=32)
    low = compute_posterior(x, kernel, top_k=32, dtype=torch.float32)
    log_k = kernel.log_kernel(x, x)
    ref_at = (log_k - torch.logsumexp(log_k, -1, keepdim=True)).gather(1, low.index)
    assert float((low.log_q.double() - ref_at).abs().max()) < 1e-2
    assert float((low.index == ref.index).double().mean()) > 0.99


def test_row_shards_concatenate_to_the_full_table():
    x, kernel = manifold_data(n=500), GaussianKernel(0.05)
    full = compute_posterior(x, kernel, top_k=24, block_size=64)
    aligned = [compute_posterior(x, kernel, top_k=24, block_size=64, rows=r)
               for r in [(0, 128), (128, 192), (192, 500)]]
    assert _same(concat_rows(aligned), full)  # shards on block boundaries: bit for bit
    ragged = [compute_posterior(x, kernel, top_k=24, block_size=64, rows=r)
              for r in [slice(0, 100), slice(100, 333), slice(333, None)]]
    joined = concat_rows(ragged)
    assert torch.equal(joined.index, full.index)
    torch.testing.assert_close(joined.log_q, full.log_q, rtol=0, atol=1e-12)
    # the approximate engine: shards from one index, and from separate (deterministic) builds
    nn = NeighbourIndex(x, kernel, top_k=24)
    full = nn.posterior(block_size=64)
    assert _same(concat_rows([nn.posterior((0, 100), block_size=64), nn.posterior((100, 500), 64)]), full)
    shards = [build_posterior(x, kernel, top_k=24, engine="faiss", block_size=64, index="flat", rows=r)
              for r in [(0, 250), (250, 500)]]
    assert _same(concat_rows(shards), full)  # a ragged shard boundary: tail draws do not move


def test_auto_engine_is_exact_for_small_data(circle_data):
    kernel = GaussianKernel(0.01)
    assert _same(build_posterior(circle_data, kernel, top_k=30),
                 compute_posterior(circle_data, kernel, top_k=30))
    assert resolve_engine(20_000, 784) == "exact"
    assert resolve_engine(200_000, 784) == "faiss"
    assert resolve_engine(200_000, 784, "cuda") == "exact"
    # 0/1 data under the Bernoulli kernel: the Hamming table is cheap enough to stay exact longer
    assert resolve_engine(50_000, 1024) == "faiss"
    assert resolve_engine(50_000, 1024, hamming=True) == "exact"
    assert resolve_engine(500_000, 1024, "cuda", hamming=True) == "faiss"  # it runs on the CPU
    with pytest.raises(MapaError, match="unknown posterior engine"):
        build_posterior(circle_data, kernel, engine="annoy")
    with pytest.raises(MapaError, match="takes no index settings"):
        build_posterior(circle_data, kernel, engine="exact", ef_search=10)
    with pytest.raises(MapaError, match="unknown neighbour index"):
        build_posterior(circle_data, kernel, engine="faiss", index="lsh")
    with pytest.raises(MapaError, match="unknown index settings"):
        build_posterior(circle_data, kernel, engine="faiss", efsearch=10)
    # settings for the engine auto might have picked are no error
    assert _same(build_posterior(circle_data, kernel, top_k=30, ef_search=10),
                 compute_posterior(circle_data, kernel, top_k=30))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engines_run_on_cuda():
    x, kernel = manifold_data(n=1000), GaussianKernel(0.05)
    cpu = compute_posterior(x, kernel, top_k=16)
    gpu = compute_posterior(x, kernel, top_k=16, device="cuda")
    assert torch.equal(gpu.index, cpu.index)
    torch.testing.assert_close(gpu.log_q, cpu.log_q, rtol=0, atol=1e-9)
    approx = build_posterior(x, kernel, top_k=16, engine="faiss", device="cuda")
    _check_layout(approx)
