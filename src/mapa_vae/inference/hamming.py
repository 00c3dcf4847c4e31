"""The exact top-``K`` table for 0/1 data by Hamming distance (paper Eq. 8, docs/design.md §2).

For binary ``x`` the softened Bernoulli kernel depends on a pair only through the number ``h``
of bits where ``x_n`` and ``x_i`` differ: an equal bit contributes ``log ρ``, a different one
``log(1 - ρ)``, so

    log k(x_n | x_i) = (D - h) log ρ + h log(1 - ρ),

decreasing in ``h``. The table keeps the ``K`` nearest: row ``n`` stores the point itself first,
then the others by increasing distance and, at equal distance, increasing index. The normalizer
and the leftover mass are sums over a per-row histogram of the distances, in log space
(:func:`_table_rows`): one matrix-vector product per block, relative error at rounding level.
Two searches give the distances, integers either way, so the same table bit for bit:

- ``"product"``: with ``u``, ``v`` the 0/1 codes of two points, ``h = |u| + |v| - 2 u·v``, one
  int8 matrix product per tile (oneDNN's quantized linear layer: AMX tiles, integer
  accumulation, exact) whose output is ``min(h, 255)`` as one byte; only rows whose table needs
  a bin past 254 (no neighbour within ~230 bits at ``ρ = 0.9``) are redone with exact keys.
  About 4 ns a pair in all on one AMX core, against ~13 for faiss's popcount and ~45 for the
  float64 matrix-product table (benchmarks/hamming.py);
- ``"popcount"``: faiss's ``hammings`` on bit-packed codes, 64 bits an instruction.

``method="auto"`` takes the product where the CPU has AMX tiles and the product reproduces a
small exact case (:func:`product_available`, checked once), the popcount search elsewhere.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import faiss
import numpy as np
import torch
from torch import Tensor

from ..errors import MapaError
from ..kernels import BernoulliKernel
from .posterior import MapaPosterior

__all__ = ["hamming_log_kernel", "hamming_top_k", "is_binary", "pack_bits", "product_available"]


METHODS = ("auto", "product", "popcount")
_BLOCK_ENTRIES = 1 << 22  # popcount: (b, N) int32 distances per block, 16 MB
_PRODUCT_ROWS = 512  # product: rows per block (the product runs ~25 % faster a pair than at 256)
_PRODUCT_COLS = 2048  # product: atoms per tile
_MAX_KEY = (1 << 15) - 1  # product, exact rows: keys h + (D' + 1)(row mod g) are int16
_U8_TOP = 255  # product: distances as uint8, min(h, 255)
_NEGLIGIBLE = 2.0**-80  # the histogram's terms that all N atoms together keep below this, relative
_DIGIT = 127  # extra columns carry the row term in digits ≤ 127 times weights ≤ 127 (no int16
_DIGITS = 3  # saturation even in VNNI's pairwise sums); 3 digits of weight 127 reach 48 387 > _MAX_KEY

_hammings = faiss.hammings  # type: ignore[attr-defined]  # (a, b, na, nb, bytes, out): all pairs


def is_binary(x: Tensor) -> bool:
    """Whether every entry of ``x`` is exactly 0 or 1.

    >>> is_binary(torch.tensor([[0.0, 1.0]])), is_binary(torch.tensor([[0.0, 0.5]]))
    (True, False)
    """
    a = x.detach().to("cpu").numpy()
    return bool(np.all((a == 0) | (a == 1)))


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Boolean rows ``(N, D)`` as bit-packed codes ``(N, 8 ⌈D / 64⌉)`` uint8, zero-padded to
    whole 64-bit words (equal padding bits add nothing to a distance)."""
    packed = np.packbits(bits, axis=1)  # (N, ⌈D/8⌉)
    width = 8 * -(-packed.shape[1] // 8)
    return np.ascontiguousarray(np.pad(packed, ((0, 0), (0, width - packed.shape[1]))))


def hamming_log_kernel(kernel: BernoulliKernel, d: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``log k`` at Hamming distance ``h = 0 … D``, shape ``(D + 1,)``.

    >>> [round(v, 12) for v in hamming_log_kernel(BernoulliKernel(0.9), 2).exp().tolist()]
    [0.81, 0.09, 0.01]
    """
    h = torch.arange(d + 1, dtype=torch.float64)
    return ((d - h) * math.log(kernel.rho) + h * math.log1p(-kernel.rho)).to(dtype)


def hamming_top_k(
    data: Tensor,
    kernel: BernoulliKernel,
    k_keep: int,
    dtype: torch.dtype = torch.float64,
    rows: tuple[int, int] | None = None,
    block_size: int | None = None,
    method: str = "auto",
) -> MapaPosterior:
    """The exact top-``K`` table of ``q(i | n)`` for 0/1 ``data`` ``(N, D)`` under ``kernel``.

    Each block of ``b`` rows gets its Hamming distances to all ``N`` atoms (``method``: see the
    module docstring; on the CPU whatever the data's device), then per row: the histogram
    ``c_h`` of the distances (the point itself counted at ``h = 0``), ``log Σ_j k = log Σ_h c_h k(h)``,
    the ``K`` nearest in the order (point itself, distance, index), and the leftover mass from the
    histogram less what was stored. Memory ``O(b · N + N · K)``; ``block_size`` defaults to 512
    rows (product) or ``2²² / N`` rows (popcount). ``rows = (start, stop)`` computes only those
    rows. The two methods give the same table bit for bit.

    >>> x = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    >>> post = hamming_top_k(x, BernoulliKernel(0.9), 2)
    >>> post.index.tolist()  # ties at distance 1 go to the smaller index; 3 duplicates 0
    [[0, 3], [1, 0], [2, 0], [3, 0]]
    """
    if method not in METHODS:
        raise MapaError(f"unknown Hamming search method {method!r}; known: {', '.join(METHODS)}")
    n, d = data.shape[0], data[0].numel()
    start, stop = (0, n) if rows is None else rows
    bits = _varying_columns(data.reshape(n, d).detach().to("cpu").numpy() != 0)
    fits = bits.shape[1] < _MAX_KEY  # the product's int16 keys hold one row's D' + 1 distances
    if method == "auto":
        method = "product" if fits and product_available() else "popcount"
    if method == "product" and not (fits and product_available()):
        raise MapaError("the Hamming search by int8 product needs AMX tiles, oneDNN's quantized "
                        f"linear layer and under {_MAX_KEY} varying columns; use method='popcount'")
    log_k = hamming_log_kernel(kernel, d)  # (D+1,), at the full D: a dropped column is an equal bit
    log_q = torch.empty(stop - start, k_keep, dtype=dtype)
    index = torch.empty(stop - start, k_keep, dtype=torch.int64)
    log_rest = torch.full((stop - start,), -math.inf, dtype=dtype)
    w = _weights(log_k, n)[: bits.shape[1] + 1]  # (W,): no distance exceeds D'
    search = _product_blocks if method == "product" else _popcount_blocks
    for lo, count, cand in search(bits, start, stop, k_keep, block_size, len(w)):
        out = slice(lo - start, lo - start + count.shape[0])
        index[out], log_q[out], log_rest[out] = _table_rows(count, cand, lo, n, k_keep, log_k, w)
    return MapaPosterior(log_q, index, log_rest)


# A block's result: its first row, the histogram (m, B) int64 of each row's distances (exact in every
# bin the table reads), and the candidates (row in block, atom, distance): every pair within its
# row's K-th distance, each row's atoms in increasing order.
_Block = tuple[int, Tensor, tuple[np.ndarray, np.ndarray, np.ndarray]]


def _kth_distance(cum: Tensor, k_keep: int) -> Tensor:
    """``(m,)``: the distance of each row's ``K``-th nearest, the first bin where its cumulative
    histogram ``cum`` ``(m, bins)`` reaches ``K``."""
    return torch.searchsorted(cum, torch.full((cum.shape[0], 1), k_keep, dtype=cum.dtype))[:, 0]


def _table_rows(count: Tensor, cand: tuple[np.ndarray, np.ndarray, np.ndarray], lo: int, n: int,
                k_keep: int, log_k: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Indices ``(m, K)``, ``log q`` ``(m, K)`` and ``log_rest`` ``(m,)`` (float64) of rows ``lo …``
    from their histograms ``count`` ``(m, D'+1)`` and candidates (see ``_Block``).

    ``log k`` is affine in ``h`` with slope ``s < 0``, so a row's mass over its histogram is
    ``Σ_h c_h k(h) = k(h₀) Σ_j c_{h₀+j} w_j`` with ``w_j = e^{s j} ≤ 1`` and ``h₀`` the row's
    first nonzero bin: one matrix-vector product, all terms positive and the first one at least
    1, so the sum is accurate to rounding and never underflows (``h₀ = 0`` for the normalizer,
    the point itself; the first bin of the leftover for the rest). ``w`` ``(W,)`` holds the
    weights that matter (:func:`_weights`)."""
    m, bins = count.shape
    cum = count.cumsum(1)  # (m, D'+1)
    k_col = torch.full((m, 1), k_keep, dtype=cum.dtype)
    last = _kth_distance(cum, k_keep)  # (m,)
    per_row = cum.gather(1, last[:, None])[:, 0]  # (m,): candidates of each row
    # one sort of (row, distance + 1, atom) packed in an int64, the point itself at distance slot
    # 0, orders every row as stored
    r, c, h = cand
    sn = n.bit_length()
    sh = sn + bins.bit_length()
    slot = h.astype(np.int64) + 1
    slot[c == r + lo] = 0
    key = (r << sh) | (slot << sn) | c
    key.sort()
    take = torch.from_numpy(key)[(torch.cumsum(per_row, 0) - per_row)[:, None] + torch.arange(k_keep)]
    stored = ((take >> sn) & ((1 << (sh - sn)) - 1)).sub_(1).clamp_(min=0)  # (m, K) distances
    log_norm = log_k[0] + torch.log(count[:, : len(w)].double() @ w)  # (m,)
    log_q = log_k[stored] - log_norm[:, None]
    log_rest = torch.full((m,), -math.inf, dtype=torch.float64)
    if k_keep < n:
        # the leftover's first nonzero bin: the first where the cumulative count passes K
        first = torch.searchsorted(cum, k_col, right=True)  # (m, 1)
        window = torch.nn.functional.pad(count, (0, len(w))).gather(1, first + torch.arange(len(w)))
        window[:, 0] = cum.gather(1, first)[:, 0] - k_keep  # (m, W): what is left at h₀ + j
        log_rest = log_k[first[:, 0]] + torch.log(window.double() @ w) - log_norm
    return take & ((1 << sn) - 1), log_q, log_rest


def _weights(log_k: Tensor, n: int) -> Tensor:
    """``w_j = k(j) / k(0)`` for the first ``W`` bins, ``W`` the fewest with ``N w_W < 2⁻⁸⁰``: the
    bins past them, all ``N`` atoms together, move a sum whose first term is at least 1 by less
    than ``2⁻⁸⁰`` (below float64's rounding by ``2⁻²⁷``)."""
    w = torch.exp(log_k - log_k[0])  # (D+1,)
    return w[: int((n * w >= _NEGLIGIBLE).sum())]


def _popcount_blocks(bits: np.ndarray, start: int, stop: int, k_keep: int, block_size: int | None,
                     window: int) -> Iterator[_Block]:
    """Blocks of rows by faiss's popcount ``hammings``: ``(b, N)`` int32 distances at a time, exact
    (``window`` is the product search's)."""
    n, bins = bits.shape[0], bits.shape[1] + 1
    codes = pack_bits(bits)
    b = block_size or max(1, _BLOCK_ENTRIES // max(n, 1))
    dis = np.empty((min(b, max(stop - start, 0)), n), dtype=np.int32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(torch.get_num_threads())  # the run's --threads, as torch's ops
    try:
        for lo in range(start, stop, b):
            m = min(lo + b, stop) - lo
            _hammings(faiss.swig_ptr(codes[lo:lo + m]), faiss.swig_ptr(codes), m, n, codes.shape[1],
                      faiss.swig_ptr(dis))  # (m, N) int32
            block = torch.from_numpy(dis[:m])
            shift = (torch.arange(m, dtype=torch.int32) * bins)[:, None]
            count = torch.bincount((block + shift).view(-1), minlength=m * bins).view(m, bins)
            last = _kth_distance(count.cumsum(1), k_keep).numpy().astype(np.int32)
            flat = np.flatnonzero(dis[:m] <= last[:, None])  # (row, atom) order
            yield lo, count, (*np.divmod(flat, n), dis[:m].reshape(-1)[flat])
    finally:
        faiss.omp_set_num_threads(threads)


def _product_blocks(bits: np.ndarray, start: int, stop: int, k_keep: int, block_size: int | None,
                    window: int) -> Iterator[_Block]:
    """Blocks of ``b`` rows by the int8 product. First ``min(h, 255)`` as uint8 (``b N`` bytes a
    block, one ``(b, 2048)`` product tile at a time), one histogram per row, the candidates once
    each row's ``K``-th distance is known. A row whose table needs bins past 254 (its leftover's
    first bin plus the ``window`` of bins that carry weight, see :func:`_table_rows`) is redone
    exactly (:func:`_exact_rows`)."""
    n, bins = bits.shape[0], bits.shape[1] + 1
    chunks = _product_atoms(bits)
    b = max(1, block_size or _PRODUCT_ROWS)
    rows = min(b, max(stop - start, 0))
    keys = np.empty((rows, n), dtype=np.uint8)
    mask = np.empty(rows * n, dtype=bool)
    for lo in range(start, stop, b):
        m = min(lo + b, stop) - lo
        if k_keep >= n or window >= _U8_TOP:  # every row needs far bins: exact at once
            yield lo, *_exact_rows(bits, np.arange(lo, lo + m), chunks, k_keep, mask)
            continue
        block = keys[:m]
        query = torch.from_numpy(_query_codes(bits[lo:lo + m], np.zeros(m, dtype=np.int64)))
        for c0, c1, atoms in chunks:
            torch.from_numpy(block)[:, c0:c1] = _product(query, atoms, torch.uint8)  # min(h, 255)
        count = torch.stack([torch.bincount(row, minlength=_U8_TOP + 1) for row in torch.from_numpy(block)])
        cum = count.cumsum(1)  # (m, 256): exact below bin 255, which holds every h ≥ 255
        k_col = torch.full((m, 1), k_keep, dtype=cum.dtype)
        first = torch.searchsorted(cum, k_col, right=True)[:, 0]  # the leftover's first bin
        far = (first + window > _U8_TOP).numpy()  # (m,)
        last = _kth_distance(cum, k_keep).numpy()
        threshold = np.where(far, 0, last).astype(np.uint8)[:, None]  # (m, 1)
        flat = _flat_at_most(block, threshold, mask)  # (row, atom) order
        r, c = np.divmod(flat, n)
        h = block.reshape(-1)[flat]
        if far.any():
            redo = np.flatnonzero(far)
            keep = ~far[r]
            count_far, (r_far, c_far, h_far) = _exact_rows(bits, lo + redo, chunks, k_keep, mask)
            count = torch.nn.functional.pad(count, (0, max(0, bins - count.shape[1])))
            count[redo] = torch.nn.functional.pad(count_far, (0, count.shape[1] - bins))
            r, c = np.concatenate([r[keep], redo[r_far]]), np.concatenate([c[keep], c_far])
            h = np.concatenate([h[keep], h_far])
        yield lo, count, (r, c, h)


def _exact_rows(bits: np.ndarray, rows: np.ndarray, chunks: list[tuple[int, int, _Atoms]], k_keep: int,
                mask: np.ndarray) -> tuple[Tensor, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Histograms ``(m, D'+1)`` and candidates of ``rows`` by the int8 product with exact int16
    keys ``h + (D' + 1)(row mod g)``: one histogram call per ``g`` rows."""
    n, bins, m = bits.shape[0], bits.shape[1] + 1, len(rows)
    g = _MAX_KEY // bins  # rows per histogram call: their keys stay below 2¹⁵
    shift = bins * (np.arange(m) % g)  # (m,)
    query = torch.from_numpy(_query_codes(bits[rows], shift))
    keys = torch.empty(m, n, dtype=torch.int16)
    for c0, c1, atoms in chunks:
        keys[:, c0:c1] = _product(query, atoms, torch.float32)  # exact: integers far below 2²⁴
    count = torch.empty(m, bins, dtype=torch.int64)
    for g0 in range(0, m, g):
        g1 = min(g0 + g, m)
        count[g0:g1] = torch.bincount(keys[g0:g1].view(-1), minlength=(g1 - g0) * bins).view(g1 - g0, bins)
    threshold = (_kth_distance(count.cumsum(1), k_keep).numpy() + shift).astype(np.int16)[:, None]  # (m, 1)
    block = keys.numpy()
    flat = _flat_at_most(block, threshold, mask)  # (row, atom) order
    r, c = np.divmod(flat, n)
    return count, (r, c, block.reshape(-1)[flat] - shift[r])


def _flat_at_most(a: np.ndarray, threshold: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``np.flatnonzero(a <= threshold)`` with the comparison into ``mask``, a reused buffer (a
    fresh one per block costs page faults)."""
    np.less_equal(a, threshold, out=mask[: a.size].reshape(a.shape))
    return np.flatnonzero(mask[: a.size])


# One tile of atoms for oneDNN's quantized linear layer: int8 weights prepacked for AMX, per-atom
# weight scales (1) and zero points (0), and the bias |v| in float32.
_Atoms = tuple[Tensor, Tensor, Tensor, Tensor]


def _product_atoms(bits: np.ndarray) -> list[tuple[int, int, _Atoms]]:
    """The atoms' side of ``h = |u| + |v| - 2 u·v``: rows ``-2 v``, then ``_DIGITS`` columns of
    weight 127 and one of weight 1 (the query's row term in digits), zero-padded to whole AMX
    rows of 64 bytes; one prepacked tile per ``_PRODUCT_COLS`` atoms."""
    n, d = bits.shape
    w = np.zeros((n, 64 * -(-(d + _DIGITS + 1) // 64)), dtype=np.int8)  # (N, P)
    w[:, :d] = bits
    w[:, :d] *= -2
    w[:, d:d + _DIGITS] = _DIGIT
    w[:, d + _DIGITS] = 1
    bias = torch.from_numpy(bits.sum(1, dtype=np.float32))  # (N,): |v|
    chunks = []
    for c0 in range(0, n, _PRODUCT_COLS):
        c1 = min(c0 + _PRODUCT_COLS, n)
        packed = torch.ops.onednn.qlinear_prepack(torch.from_numpy(w[c0:c1]), None)
        chunks.append((c0, c1, (packed, torch.ones(c1 - c0), torch.zeros(c1 - c0, dtype=torch.int64),
                                bias[c0:c1].clone())))
    return chunks


def _query_codes(bits: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The queries' side ``(m, P)`` uint8: ``u``, then the row term ``|u| + shift`` in base-127
    digits (``_DIGITS`` of them, each ≤ 127, against the weights 127, and the remainder against 1)."""
    m, d = bits.shape
    u = np.zeros((m, 64 * -(-(d + _DIGITS + 1) // 64)), dtype=np.uint8)
    u[:, :d] = bits
    high, u[:, d + _DIGITS] = np.divmod(bits.sum(1) + shift, _DIGIT)
    for j in range(_DIGITS):
        u[:, d + j] = np.clip(high - _DIGIT * j, 0, _DIGIT)
    return u


def _product(query: Tensor, atoms: _Atoms, dtype: torch.dtype) -> Tensor:
    """``query (m, P) uint8 · atomsᵀ + bias``, ``(m, C)``, by oneDNN's quantized linear layer with
    unit scales: integer products and sums, exact; as float32, or as uint8 clamped to 0 … 255."""
    packed, scale, zero, bias = atoms
    out = None if dtype == torch.uint8 else dtype  # None: the layer's quantized (uint8) output
    return torch.ops.onednn.qlinear_pointwise(query, 1.0, 0, packed, scale, zero, bias, 1.0, 0,
                                              out, "none", [], "")


@functools.cache
def product_available() -> bool:
    """Whether ``method="auto"`` searches by the int8 product: the CPU has AMX tiles
    (``torch.cpu._is_amx_tile_supported``; without them oneDNN's int8 kernels are no faster than
    faiss's popcount) and the product reproduces the distances of a small random case, keys up to
    near ``2¹⁵`` included (checked once per process)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if amx is None or not amx():
        return False
    rng = np.random.default_rng(0)
    bits = rng.random((40, 800)) < 0.5
    bits[20:] = bits[:20] ^ (rng.random((20, 800)) < 0.1)  # pairs ~80 apart, the rest ~400
    shift = 801 * np.arange(40)  # keys up to 801 · 40 - 1, near 2¹⁵
    try:
        ((_, _, atoms),) = _product_atoms(bits)
        keys = _product(torch.from_numpy(_query_codes(bits, shift)), atoms, torch.float32).numpy()
        near = _product(torch.from_numpy(_query_codes(bits, 0 * shift)), atoms, torch.uint8).numpy()
    except (AttributeError, RuntimeError, TypeError):  # no such op, or another signature
        return False
    h = (bits[:, None] != bits[None]).sum(-1)
    return bool(np.array_equal(keys - shift[:, None], h) and np.array_equal(near, np.minimum(h, _U8_TOP)))


def _varying_columns(bits: np.ndarray) -> np.ndarray:
    """The columns of boolean ``bits`` ``(N, D)`` that are not the same in every row (a constant
    column adds nothing to any distance; sprites have ~20 % of them), at least one."""
    varying: np.ndarray = np.any(bits, axis=0) & ~np.all(bits, axis=0)  # (D,)
    varying[0] |= not varying.any()
    return bits if varying.all() else np.compress(varying, bits, axis=1)
