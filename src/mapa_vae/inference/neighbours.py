"""The approximate top-``K`` table of ``q(i | n)`` from a faiss index (docs/design.md §3, §8).

The index proposes each point's best atoms under the kernel's L2 search form; their log-kernel is
rescored exactly, and the normalizer ``Σ_j k(x_n | x_j)`` is estimated from the next neighbours
the search returns plus a uniform sample of the others, with a floor so that the mass left
outside the table, hence the tail proposal's support, is never empty. The MAPA bound (paper
Eq. 10) is a bound for any fixed proposal with full support on the tail, so missed neighbours and
an estimated normalizer make it looser, never invalid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import faiss
import numpy as np
import torch
from torch import Tensor

from ..errors import MapaError
from ..kernels import Kernel
from .exact import blocked_top_k
from .posterior import MapaPosterior, resolve_top_k

__all__ = ["IndexParams", "NeighbourIndex"]


_GATHER = 1 << 24  # elements per (b, K, D) gather when rescoring pairs (kernels.SearchForm.pairs)



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
        self.k = resolve_top_k(n, top_k)
        self.x = data.to(device=device, dtype=torch.float64)  # (N, D)
        form = kernel.search_form(self.x)
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
                exact = blocked_top_k(self.form.block, self.x, k, 1, torch.float64, rows=row)
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

