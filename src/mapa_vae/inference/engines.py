"""How MAPA's top-``K`` table is built: by ``engine`` name (docs/design.md §3, §8).

Both kernels are affine in one inner product (:meth:`~mapa_vae.kernels.Kernel.search_form`),
which gives two engines, each an entry of :data:`~mapa_vae.registry.ENGINES`:

- ``exact`` (:func:`~mapa_vae.inference.exact.compute_posterior`): one ``addmm`` per block of
  rows, ``O(N² D)`` flops at matmul speed and ``O(block · N + N · K)`` memory;
- ``faiss`` (:class:`~mapa_vae.inference.neighbours.NeighbourIndex`): an approximate
  nearest-neighbour index, ``O(N · K)`` memory and sub-quadratic time;
- ``auto`` picks between them by ``N``, ``D`` and the device (:func:`resolve_engine`).

Either table is a valid MAPA proposal: the bound (paper Eq. 10) holds in expectation for any fixed
proposal with full support on the tail, so an approximate table changes how tight it is, never
whether it is a bound.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from ..errors import MapaError
from ..kernels import BernoulliKernel, Kernel
from ..registry import ENGINES
from .exact import compute_posterior
from .hamming import is_binary
from .neighbours import IndexParams, NeighbourIndex
from .posterior import MapaPosterior

__all__ = [
    "AUTO_EXACT_FLOPS",
    "AUTO_EXACT_POINTS",
    "HAMMING_COST",
    "build_posterior",
    "cache_params",
    "concat_rows",
    "resolve_engine",
    "uses_hamming",
]


AUTO_EXACT_POINTS = 20_000  # engine="auto": exact up to this many points, whatever the cost



# ... and above it while the 2 N² D flops of the exact table stay under (seconds at matmul speed):
AUTO_EXACT_FLOPS = {"cpu": 4e12, "cuda": 1e16}  # ~0.5-1 min on a 2-core AVX-512 CPU; ~3 min on a GPU

# The Hamming table (0/1 data, Bernoulli kernel; always on the CPU) costs about a tenth of the
# matmul table's CPU time where its int8 product runs (AMX tiles): 10.3-10.8 against 108.6 CPU-s at
# N = 50 000, D = 1024 (benchmarks/hamming.py, docs/benchmarks/hamming-sprites50k.json); faiss's
# popcount, the fallback elsewhere, about a quarter (29.9). "auto" counts its flops at the product's rate.
HAMMING_COST = 0.1



def resolve_engine(n: int, d: int, device: torch.device | str = "cpu", hamming: bool = False) -> str:
    """``engine="auto"``: ``"exact"`` for ``N ≤ AUTO_EXACT_POINTS`` or while ``2 N² D`` flops fit
    ``AUTO_EXACT_FLOPS`` of the device type (exact on a GPU up to ~10⁶ points of 784-d),
    ``"faiss"`` above. ``hamming``: the exact table would be the Hamming search (0/1 data and the
    Bernoulli kernel), which runs on the CPU at ``HAMMING_COST`` of the matmul's time.

    >>> resolve_engine(20_000, 784), resolve_engine(1_000_000, 64), resolve_engine(1_000_000, 64, "cuda")
    ('exact', 'faiss', 'exact')
    >>> resolve_engine(50_000, 1024), resolve_engine(50_000, 1024, hamming=True)
    ('faiss', 'exact')
    """
    kind = "cpu" if hamming else torch.device(device).type
    budget = AUTO_EXACT_FLOPS.get(kind, AUTO_EXACT_FLOPS["cpu"])
    flops = 2.0 * n * n * d * (HAMMING_COST if hamming else 1.0)
    return "exact" if n <= AUTO_EXACT_POINTS or flops <= budget else "faiss"


def uses_hamming(data: Tensor, kernel: Kernel) -> bool:
    """Whether the exact table of ``data`` under ``kernel`` is the Hamming search."""
    return isinstance(kernel, BernoulliKernel) and is_binary(data)



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
    (:func:`~mapa_vae.inference.exact.compute_posterior`), ``"faiss"`` (:class:`NeighbourIndex`,
    settings ``index_params`` of :class:`IndexParams`) or ``"auto"`` (:func:`resolve_engine`).

    ``block_size`` defaults to 1024 rows (exact) or 16 384 queries (faiss); ``rows`` computes one
    shard, see :func:`concat_rows`.

    >>> x = torch.randn(300, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> from mapa_vae.kernels import GaussianKernel
    >>> post = build_posterior(x, GaussianKernel(1.0), top_k=16, engine="faiss", index="hnsw")
    >>> post.index[:3, 0].tolist(), post.log_q.shape
    ([0, 1, 2], torch.Size([300, 16]))
    """
    hamming = engine == "auto" and uses_hamming(data, kernel)
    picked = _pick(data.shape[0], data[0].numel(), engine, device, index_params, hamming)
    return ENGINES[picked](data, kernel, top_k, device, block_size, dtype, rows, **index_params)


@ENGINES.register("exact")
def exact_engine(data: Tensor, kernel: Kernel, top_k: int | None, device: torch.device | str,
                 block_size: int | None, dtype: torch.dtype, rows: tuple[int, int] | None,
                 **index_params: Any) -> MapaPosterior:
    """The exact blocked table, one matmul per block of rows (:func:`compute_posterior`)."""
    return compute_posterior(data, kernel, top_k, block_size or 1024, device, dtype, rows=rows)


@ENGINES.register("faiss")
def faiss_engine(data: Tensor, kernel: Kernel, top_k: int | None, device: torch.device | str,
                 block_size: int | None, dtype: torch.dtype, rows: tuple[int, int] | None,
                 **index_params: Any) -> MapaPosterior:
    """An approximate top-``K`` table from a faiss index (:class:`NeighbourIndex`)."""
    nn = NeighbourIndex(data, kernel, top_k, _index_params(index_params), device)
    return nn.posterior(rows, block_size or 16_384, dtype)


@ENGINES.register("auto")
def auto_engine(data: Tensor, kernel: Kernel, top_k: int | None, device: torch.device | str,
                block_size: int | None, dtype: torch.dtype, rows: tuple[int, int] | None,
                **index_params: Any) -> MapaPosterior:
    """Exact or faiss by ``N``, ``D`` and the device (:func:`resolve_engine`)."""
    picked = resolve_engine(data.shape[0], data[0].numel(), device, uses_hamming(data, kernel))
    return ENGINES[picked](data, kernel, top_k, device, block_size, dtype, rows, **index_params)



def _pick(n: int, d: int, engine: str, device: torch.device | str, index_params: dict[str, Any],
          hamming: bool = False) -> str:
    """The engine that runs; index settings are an error for an explicit ``"exact"`` only."""
    ENGINES[engine]  # an unknown name is a one-line error
    if engine == "exact" and index_params:
        raise MapaError(f"the exact engine takes no index settings, got {sorted(index_params)}")
    return resolve_engine(n, d, device, hamming) if engine == "auto" else engine



def _index_params(index_params: dict[str, Any]) -> IndexParams:
    try:
        return IndexParams(**index_params)
    except TypeError:
        raise MapaError(f"unknown index settings in {sorted(index_params)}; "
                        f"known: {sorted(IndexParams.__dataclass_fields__)}") from None



def cache_params(n: int, d: int, top_k: int, engine: str, device: torch.device | str,
                 hamming: bool = False, **index_params: Any) -> dict[str, Any]:
    """What ``engine`` adds to the posterior cache key: nothing for the exact engine (old
    caches stay valid), else its name and every resolved :class:`IndexParams` field.
    ``hamming``: the exact table would be the Hamming search (see :func:`resolve_engine`)."""
    if _pick(n, d, engine, device, index_params, hamming) == "exact":
        return {}
    return {"engine": "faiss", **asdict(_index_params(index_params).resolved(n, top_k))}



def concat_rows(shards: list[MapaPosterior]) -> MapaPosterior:
    """Join row shards (in row order) computed with ``rows=`` into the full table."""
    fields = ("log_q", "index", "log_rest")
    return MapaPosterior(*(torch.cat([getattr(s, f) for s in shards]) for f in fields))

