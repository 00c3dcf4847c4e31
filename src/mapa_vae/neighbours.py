"""The MAPA posterior at scale: exact blocks or an approximate neighbour index (SPEC §3, §8).

Both kernels are affine in one inner product, ``log k(x_n | x_i) = s ⟨x_n, w_i⟩ + c_i + r_n``
(:class:`SearchForm`), which gives two ways to build the top-``K`` table ``q(i | n)``:

- **exact** (:func:`mapa_vae.posterior.compute_posterior`): one ``addmm`` per block of rows,
  ``O(N² D)`` flops at matmul speed on ``device`` and ``O(block · N + N · K)`` memory;
- **faiss** (:class:`NeighbourIndex`): the ``K`` best atoms of each point from an approximate
  nearest-neighbour index, ``O(N · K)`` memory and sub-quadratic time, with the normalizer
  ``Σ_j k(x_n | x_j)`` estimated from the next neighbours the search returns and a uniform
  sample of the others (below).

:func:`build_posterior` picks between them (``engine="auto"``, rule in :func:`resolve_engine`).

The approximate table is a valid MAPA proposal: SPEC §3 (paper Eq. 10) is a lower bound on
the empiricalized log-likelihood in expectation for **any** fixed proposal with full support on
the tail. Missed neighbours, an estimated normalizer and the uniform tail change how *tight*
the bound is, never whether it is a bound. Full support needs a finite ``log_rest``, which the
floor below guarantees.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, replace
from typing import Any

import faiss
import numpy as np
import torch
from torch import Tensor

from .kernels import BernoulliKernel, GaussianKernel, Kernel
from .posterior import MapaPosterior, _blocked_top_k, compute_posterior, default_top_k
from .storage import MapaError

__all__ = [
    "AUTO_EXACT_FLOPS",
    "AUTO_EXACT_POINTS",
    "IndexParams",
    "NeighbourIndex",
    "SearchForm",
    "build_posterior",
    "cache_params",
    "concat_rows",
    "resolve_engine",
    "search_form",
]

AUTO_EXACT_POINTS = 20_000  # engine="auto": exact up to this many points, whatever the cost
# ... and above it while the 2 N² D flops of the exact table stay under (seconds at matmul speed):
AUTO_EXACT_FLOPS = {"cpu": 4e12, "cuda": 1e16}  # ~0.5-1 min on a 2-core AVX-512 CPU; ~3 min on a GPU
_GATHER = 1 << 24  # elements per (b, K, D) gather when rescoring pairs


class SearchForm(ABC):
    """A kernel written as ``log k(x_n | x_i) = s ⟨x_n, w_i⟩ + c_i + r_n`` over atoms ``(N, D)``.

    ``block`` drops the per-row constant ``r_n`` (it cancels in ``q``); ``pairs`` is exact.
    ``search_atoms`` / ``search_queries`` are float32 vectors whose **L2** nearest neighbours are
    the largest ``log k`` (faiss's HNSW over inner products degenerates on these atoms: recall
    0.004 at N = 10⁵, so inner products are reduced to L2 with one extra coordinate).
    """

    @abstractmethod
    def block(self, queries: Tensor, out: Tensor | None = None) -> Tensor:
        """``log k(queries[b] | x_i) - r_b`` for all atoms, shape ``(B, N)``, into ``out`` if given."""

    @abstractmethod
    def pairs(self, queries: Tensor, index: Tensor) -> Tensor:
        """``log k(queries[b] | x_{index[b, m]})``, shape ``(B, M)``, from ``(B, D)`` and ``(B, M)``."""

    @abstractmethod
    def search_atoms(self) -> np.ndarray:
        """``(N, D')`` float32 vectors to index."""

    @abstractmethod
    def search_queries(self, queries: Tensor) -> np.ndarray:
        """``(B, D')`` float32 query vectors."""


class _GaussianForm(SearchForm):
    """``log k = -‖x_n - x_i‖² / 2σ² = ⟨x_n, x_i⟩/σ² - ‖x_i‖²/2σ² - ‖x_n‖²/2σ²``; L2 search on x.

    Distances do not move with the origin, so the data are centred first: the expansion loses
    ``eps · ‖x‖² / 2σ²`` to rounding, 0.18 nats in float32 for data 5 away from the origin.
    """

    def __init__(self, kernel: GaussianKernel, atoms: Tensor) -> None:
        self.mean = atoms.mean(0)  # (D,)
        self.x = atoms - self.mean  # (N, D), centred
        self.scale = 1.0 / kernel.noise_var
        self.bias = self.x.pow(2).sum(-1).mul_(-0.5 * self.scale)  # (N,)

    def block(self, queries: Tensor, out: Tensor | None = None) -> Tensor:
        q = queries - self.mean  # (B, D)
        out = torch.addmm(self.bias, q, self.x.T, alpha=self.scale, out=out)  # (B, N)
        # ‖x_n - x_i‖² >= 0, lost to rounding for (near-)duplicates
        return out.clamp_max_(q.pow(2).sum(-1, keepdim=True).mul_(0.5 * self.scale))

    def pairs(self, queries: Tensor, index: Tensor) -> Tensor:
        q = queries - self.mean  # (B, D)
        dot = torch.bmm(_rows(self.x, index), q[:, :, None])[..., 0]  # (B, M)
        sq_q = q.pow(2).sum(-1, keepdim=True)  # (B, 1)
        return (dot.mul_(self.scale) + self.bias[index]).sub_(0.5 * self.scale * sq_q).clamp_max_(0.0)

    def search_atoms(self) -> np.ndarray:
        return _f32(self.x)

    def search_queries(self, queries: Tensor) -> np.ndarray:
        return _f32(queries - self.mean)


class _BernoulliForm(SearchForm):
    """``log k = ⟨x_n, w_i⟩ + c_i`` with ``w_i = logit μ_i``, ``c_i = Σ_d log(1 - μ_i^d)``.

    The inner product search is reduced to L2 (Bachrach et al. 2014): atoms
    ``[w_i, c_i, √(R² - ‖(w_i, c_i)‖²)]`` and queries ``[x_n, 1, 0]`` give
    ``‖q - a‖² = ‖q‖² + R² - 2 log k``.
    """

    def __init__(self, kernel: BernoulliKernel, atoms: Tensor) -> None:
        mu = kernel.rho * atoms + (1.0 - kernel.rho) * (1.0 - atoms)  # (N, D)
        self.weight = torch.log(mu) - torch.log1p(-mu)  # (N, D)
        self.bias = torch.log1p(-mu).sum(-1)  # (N,)

    def block(self, queries: Tensor, out: Tensor | None = None) -> Tensor:
        return torch.addmm(self.bias, queries, self.weight.T, out=out)  # (B, N)

    def pairs(self, queries: Tensor, index: Tensor) -> Tensor:
        return torch.bmm(_rows(self.weight, index), queries[:, :, None])[..., 0] + self.bias[index]

    def search_atoms(self) -> np.ndarray:
        a = torch.cat([self.weight, self.bias[:, None]], 1)  # (N, D+1)
        sq = a.pow(2).sum(-1, keepdim=True)
        return _f32(torch.cat([a, (sq.max() - sq).clamp_min_(0).sqrt_()], 1))  # (N, D+2)

    def search_queries(self, queries: Tensor) -> np.ndarray:
        one, zero = torch.ones_like(queries[:, :1]), torch.zeros_like(queries[:, :1])
        return _f32(torch.cat([queries, one, zero], 1))  # (B, D+2)


def _rows(a: Tensor, index: Tensor) -> Tensor:
    """``a[index]``, shape ``(B, M, D)`` from ``(N, D)`` and ``(B, M)``; index_select is faster."""
    return torch.index_select(a, 0, index.reshape(-1)).view(*index.shape, a.shape[1])


def _f32(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


def search_form(kernel: Kernel, atoms: Tensor) -> SearchForm | None:
    """The inner-product form of ``kernel`` over ``atoms`` ``(N, D)``, or None if it has none."""
    if isinstance(kernel, GaussianKernel):
        return _GaussianForm(kernel, atoms)
    if isinstance(kernel, BernoulliKernel):
        return _BernoulliForm(kernel, atoms)
    return None


@dataclass(frozen=True)
class IndexParams:
    """Settings of the approximate engine; all of them enter the posterior cache key.

    Chosen by measurement (benchmarks/posterior.py, K = 32, 64-d points near a manifold):
    with 3·10⁵ points near an 8-d manifold every setting below has recall@32 ≥ 0.99; near a
    24-d one HNSW keeps 0.985 (M = 16) / 0.995 (M = 32) while IVF falls to 0.78 (nprobe 32) /
    0.90 (nprobe 64). So HNSW with M = 32 is the default; IVF builds 4-10x faster and suits
    data of low intrinsic dimension. Summing ``E = 96`` searched neighbours past the top K
    exactly cuts the error of the rest mass at 10⁶ points from ~43 % (E = K = 32) to ~15 % at
    almost no cost; more uniform draws barely help. At K = 512 (10⁵ points) E = 96 finds the same
    table as E = K, in 0.58 instead of 1.03 ms a row.
    """

    index: str = "auto"  # "flat" (exact search), "hnsw", "ivf"; auto: flat up to 10 000 points
    hnsw_m: int = 32  # graph degree
    ef_construction: int = 64
    ef_search: int = 0  # 0: max(64, K + E)
    nlist: int = 0  # IVF lists; 0: 4 √N, at most N / 39 (faiss wants 39 training points a list)
    nprobe: int = 32  # IVF lists visited per query
    tail_neighbours: int = -1  # E neighbours past the top K summed exactly into the rest; -1: 96
    tail_samples: int = 64  # M uniform draws per row to estimate the mass beyond those
    tail_floor: float = 1e-6  # the rest keeps at least this share of (N - K) / N of the stored mass
    seed: int = 0  # tail draws and IVF training sample

    def resolved(self, n: int, top_k: int) -> IndexParams:
        """These settings with every ``auto`` / 0 / -1 replaced by its value for ``N``, ``K``."""
        index = self.index if self.index != "auto" else ("flat" if n <= 10_000 else "hnsw")
        if index not in ("flat", "hnsw", "ivf"):
            raise MapaError(f"unknown neighbour index {self.index!r}; use flat, hnsw, ivf or auto")
        extra = min(96 if self.tail_neighbours < 0 else self.tail_neighbours, n - top_k)
        nlist = self.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
        return replace(self, index=index, ef_search=self.ef_search or max(64, top_k + extra),
                       nlist=nlist, nprobe=min(self.nprobe, nlist), tail_neighbours=extra)


class NeighbourIndex:
    """An approximate top-``K`` MAPA posterior from a faiss index over ``data`` ``(N, D)``.

    Per row ``n`` the index proposes ``K + E`` atoms; their ``log k`` is recomputed exactly in
    float64 on ``device``. The ``K - 1`` best besides ``n`` are stored behind ``n`` itself (the
    set ``S_n``); the other proposed atoms ``E_n`` enter the mass outside ``S_n`` exactly, and
    the far rest is estimated from ``M`` indices ``j_m`` drawn uniformly from all ``N``:

    ``R̂_n = Σ_{i∈E_n} k(x_n | x_i) + (N / M) Σ_m [j_m ∉ S_n ∪ E_n] k(x_n | x_{j_m})``,

    unbiased for ``Σ_{i∉S_n} k(x_n | x_i)`` (uniform draws alone are unbiased too, but miss the
    atoms just past the top ``K`` that hold most of the rest). It is floored at
    ``ε (N - K) / N · Σ_{i∈S_n} k(x_n | x_i)`` (``ε = tail_floor``), so ``log_rest`` is finite
    even when nothing is left to draw; then ``log q = log k - log(Σ_{S_n} k + R̂_n)``.

    The tail draws depend only on ``seed`` and the row, so row shards concatenate to the full
    table. A row whose index returns fewer than ``K`` distinct atoms is computed exactly.
    faiss runs on the CPU; ``device`` holds the data and the rescoring.
    """

    def __init__(
        self,
        data: Tensor,
        kernel: Kernel,
        top_k: int | None = None,
        params: IndexParams | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        n = data.shape[0]
        self.k = default_top_k(n) if top_k is None else min(int(top_k), n)
        if self.k < 1:
            raise MapaError(f"top_k must be >= 1, got {top_k}")
        self.x = data.to(device=device, dtype=torch.float64)  # (N, D)
        form = search_form(kernel, self.x)
        if form is None:
            raise MapaError(f"the faiss engine needs a Gaussian or Bernoulli kernel, not {kernel.name!r}")
        self.form = form
        self.params = (params or IndexParams()).resolved(n, self.k)
        self.index = self._build(form.search_atoms())

    def _build(self, vectors: np.ndarray) -> faiss.Index:
        p, (n, d) = self.params, vectors.shape
        index: faiss.Index
        if p.index == "flat":
            index = faiss.IndexFlatL2(d)
        elif p.index == "hnsw":
            hnsw = faiss.IndexHNSWFlat(d, p.hnsw_m)
            hnsw.hnsw.efConstruction = p.ef_construction
            hnsw.hnsw.efSearch = p.ef_search
            index = hnsw
        else:
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, p.nlist)
            train = np.random.default_rng(p.seed).choice(n, min(n, 64 * p.nlist), replace=False)
            ivf.train(vectors[np.sort(train)])
            ivf.nprobe = p.nprobe
            index = ivf
        index.add(vectors)
        return index

    def posterior(self, rows: tuple[int, int] | None = None, block_size: int = 16_384,
                  dtype: torch.dtype = torch.float64) -> MapaPosterior:
        """The table for all rows, or only ``rows = (start, stop)`` (a shard)."""
        n, k, m = self.x.shape[0], self.k, self.params.tail_samples
        start, stop = (0, n) if rows is None else (max(rows[0], 0), min(rows[1], n))
        size = max(stop - start, 0)
        log_q = torch.empty(size, k, dtype=dtype)
        index = torch.empty(size, k, dtype=torch.int64)
        log_rest = torch.full((size,), -math.inf, dtype=dtype)
        for a in range(start - start % block_size, stop, block_size):
            lo, hi = max(a, start), min(a + block_size, stop)
            q = self.x[lo:hi]  # (b, D)
            self_idx = torch.arange(lo, hi, device=q.device)  # (b,)
            _, found = self.index.search(self.form.search_queries(q), k + self.params.tail_neighbours)
            cand = torch.from_numpy(found).to(q.device)  # (b, K+E), -1 where nothing was found
            invalid = (cand < 0) | (cand == self_idx[:, None])
            cand = torch.where(cand < 0, self_idx[:, None], cand)
            log_c = self._pairs(q, cand).masked_fill_(invalid, -math.inf)  # (b, K+E)
            best, pos = torch.topk(log_c, k - 1, dim=-1)  # (b, K-1)
            log_k = torch.cat([self._pairs(q, self_idx[:, None]), best], 1)  # (b, K): n first
            idx = torch.cat([self_idx[:, None], cand.gather(1, pos)], 1)  # (b, K)
            log_stored = torch.logsumexp(log_k, -1)  # (b,)
            if k < n:
                near = torch.logsumexp(log_c.scatter_(1, pos, -math.inf), -1)  # (b,) over E_n
                # draws for the whole aligned block, so that a row's draws do not depend on shards
                rng = np.random.default_rng([self.params.seed, a])
                j = rng.integers(0, n, (min(a + block_size, n) - a, m))[lo - a : hi - a]
                far = self._far(q, torch.cat([self_idx[:, None], cand], 1), torch.from_numpy(j).to(q.device))
                log_r = torch.logaddexp(near, far + math.log(n / m))
                floor = log_stored + math.log(self.params.tail_floor * (n - k) / n)
                log_r = torch.maximum(log_r, floor)
                log_z = torch.logaddexp(log_stored, log_r)
                log_rest[lo - start : hi - start] = (log_r - log_z).to("cpu", dtype)
            else:
                log_z = log_stored
            log_q[lo - start : hi - start] = (log_k - log_z[:, None]).to("cpu", dtype)
            index[lo - start : hi - start] = idx.cpu()
            bad = torch.isinf(best).any(-1).nonzero()[:, 0] if k > 1 else self_idx[:0]
            for r in bad.tolist():  # too few distinct atoms found: this row exactly
                row = (lo + r, lo + r + 1)
                exact = _blocked_top_k(self.form.block, self.x, k, 1, torch.float64, rows=row)
                log_q[lo + r - start] = exact.log_q[0].to(dtype)
                index[lo + r - start] = exact.index[0]
                log_rest[lo + r - start] = exact.log_rest[0].to(dtype)
        return MapaPosterior(log_q, index, log_rest)

    def _far(self, q: Tensor, known: Tensor, j: Tensor) -> Tensor:
        """``log Σ_m [j_m ∉ known_n] k(x_n | x_{j_m})`` ``(b,)`` for draws ``j`` ``(b, M)``."""
        s = torch.sort(known, -1).values  # (b, K+E+1)
        pos = torch.searchsorted(s, j).clamp_max_(s.shape[1] - 1)
        inside = s.gather(1, pos) == j  # (b, M)
        return torch.logsumexp(self._pairs(q, j).masked_fill_(inside, -math.inf), -1)

    def _pairs(self, q: Tensor, index: Tensor) -> Tensor:
        """``form.pairs`` in row chunks that keep the ``(b, M, D)`` gather small."""
        step = max(1, _GATHER // (index.shape[1] * q.shape[1]))
        return torch.cat([self.form.pairs(q[i : i + step], index[i : i + step])
                          for i in range(0, q.shape[0], step)])


def resolve_engine(n: int, d: int, device: torch.device | str = "cpu") -> str:
    """``engine="auto"``: ``"exact"`` for ``N ≤ AUTO_EXACT_POINTS`` or while ``2 N² D`` flops fit
    ``AUTO_EXACT_FLOPS`` of the device type (exact on a GPU up to ~10⁶ points of 784-d),
    ``"faiss"`` above.

    >>> resolve_engine(20_000, 784), resolve_engine(1_000_000, 64), resolve_engine(1_000_000, 64, "cuda")
    ('exact', 'faiss', 'exact')
    """
    budget = AUTO_EXACT_FLOPS.get(torch.device(device).type, AUTO_EXACT_FLOPS["cpu"])
    return "exact" if n <= AUTO_EXACT_POINTS or 2.0 * n * n * d <= budget else "faiss"


def build_posterior(
    data: Tensor,
    kernel: Kernel,
    top_k: int | None = None,
    engine: str = "auto",
    device: torch.device | str = "cpu",
    block_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    rows: tuple[int, int] | None = None,
    **index_params: Any,
) -> MapaPosterior:
    """The top-``K`` MAPA posterior of ``data`` ``(N, D)`` by ``engine``: ``"exact"``
    (:func:`~mapa_vae.posterior.compute_posterior`), ``"faiss"`` (:class:`NeighbourIndex`,
    settings ``index_params`` of :class:`IndexParams`) or ``"auto"`` (:func:`resolve_engine`).

    ``block_size`` defaults to 1024 rows (exact) or 16 384 queries (faiss); ``rows`` computes one
    shard, see :func:`concat_rows`.

    >>> x = torch.randn(300, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> post = build_posterior(x, GaussianKernel(1.0), top_k=16, engine="faiss", index="hnsw")
    >>> post.index[:3, 0].tolist(), post.log_q.shape
    ([0, 1, 2], torch.Size([300, 16]))
    """
    picked = _pick(data.shape[0], data[0].numel(), engine, device, index_params)
    if picked == "exact":
        return compute_posterior(data, kernel, top_k, block_size or 1024, device, dtype, rows=rows)
    nn = NeighbourIndex(data, kernel, top_k, _index_params(index_params), device)
    return nn.posterior(rows, block_size or 16_384, dtype)


def _pick(n: int, d: int, engine: str, device: torch.device | str, index_params: dict[str, Any]) -> str:
    """The engine that runs; index settings are an error for an explicit ``"exact"`` only."""
    if engine not in ("exact", "faiss", "auto"):
        raise MapaError(f"unknown posterior engine {engine!r}; use exact, faiss or auto")
    if engine == "exact" and index_params:
        raise MapaError(f"the exact engine takes no index settings, got {sorted(index_params)}")
    return resolve_engine(n, d, device) if engine == "auto" else engine


def _index_params(index_params: dict[str, Any]) -> IndexParams:
    try:
        return IndexParams(**index_params)
    except TypeError:
        raise MapaError(f"unknown index settings in {sorted(index_params)}; "
                        f"known: {sorted(IndexParams.__dataclass_fields__)}") from None


def cache_params(n: int, d: int, top_k: int, engine: str, device: torch.device | str,
                 **index_params: Any) -> dict[str, Any]:
    """What ``engine`` adds to the posterior cache key: nothing for the exact engine (old
    caches stay valid), else its name and every resolved :class:`IndexParams` field."""
    if _pick(n, d, engine, device, index_params) == "exact":
        return {}
    return {"engine": "faiss", **asdict(_index_params(index_params).resolved(n, top_k))}


def concat_rows(shards: list[MapaPosterior]) -> MapaPosterior:
    """Join row shards (in row order) computed with ``rows=`` into the full table."""
    fields = ("log_q", "index", "log_rest")
    return MapaPosterior(*(torch.cat([getattr(s, f) for s in shards]) for f in fields))
