"""The MAPA posterior at scale: matmul speed, exact blocked top-K, approximate index.

In one process, side by side:

1. the machine's matmul throughput (GFLOP/s, torch.matmul), square and shaped like one
   posterior block ``(block, D) @ (D, N)``, for each dtype measured;
2. the exact top-K posterior (:func:`mapa_vae.posterior.compute_posterior`) at N = 50 000,
   D = 784: effective throughput ``2 N² D / time`` as a fraction of that dtype's block matmul,
   measured just before and just after (the machine may be shared);
3. the approximate posterior (:class:`mapa_vae.neighbours.NeighbourIndex`) at N = 10⁶, D = 64,
   K = 32, on points near an 8-d manifold (a random tanh network of an 8-d Gaussian code, plus
   noise; i.i.d. 64-d noise has no neighbour structure to find), kernel σ² = 0.2 (q(n | n) ≈ 0.8,
   a few % of the mass outside the top K): index build time, time for the
   whole table, recall@K and the error of the estimated rest mass against the exact posterior
   of 1000 rows, for HNSW (the default) and IVF (sample rows only unless ``--ivf-full``);
4. peak resident memory after each stage, against the ``4 N²`` bytes of one float32 N × N matrix.

    python benchmarks/posterior.py                      # defaults: a few minutes on 2 cores
    python benchmarks/posterior.py --n-ann 200000 --n-exact 20000   # quick
    python benchmarks/posterior.py --dtypes float32 float64 --ivf-full
    python benchmarks/posterior.py --tiny --json /tmp/posterior.json   # seconds: the CI smoke test
"""

from __future__ import annotations

import math
import os
import resource
import time

import faiss
import torch
from harness import parser, start, write_records

from mapa_vae.inference.exact import compute_posterior
from mapa_vae.inference.neighbours import IndexParams, NeighbourIndex
from mapa_vae.inference.posterior import MapaPosterior
from mapa_vae.kernels import GaussianKernel

DTYPES = {"float32": torch.float32, "float64": torch.float64}


RECORDS: list[dict[str, object]] = []  # one per measured row, for --json


def peak_rss() -> int:
    """Peak resident set size of this process so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def matmul_seconds(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b, out=out)
    return time.perf_counter() - t


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 3) -> float:
    """Best-of-``reps`` GFLOP/s of ``(m, k) @ (k, n)`` into a preallocated output."""
    a, b, out = torch.rand(m, k, dtype=dtype), torch.rand(k, n, dtype=dtype), torch.empty(m, n, dtype=dtype)
    matmul_seconds(a, b, out, 1)  # warm up
    return 2.0 * m * k * n / min(matmul_seconds(a, b, out, 1) for _ in range(reps)) / 1e9


def memory_line(stage: str, n: int) -> None:
    """An N × N float32 matrix, once written, would put at least ``4 N²`` bytes in the RSS."""
    rss, square = peak_rss(), 4.0 * n * n
    print(f"  peak RSS after {stage}: {gib(rss)}, {square / rss:.0f}x less than one float32 N×N "
          f"matrix ({gib(square)}): no N×N allocation: {'yes' if rss < square else 'NO'}")


def exact_stage(n: int, d: int, k: int, block: int, dtypes: list[str], pairs: int = 5) -> float:
    """Exact posterior throughput per dtype; returns the first dtype's GFLOP/s.

    The machine may be shared, so besides the whole table the ratio to matmul is also taken in
    ``pairs`` back-to-back pairs (4 blocks of the posterior, then the same 4 block matmuls);
    the median of those ratios is the least sensitive to other load."""
    print(f"\n== exact top-K posterior: N = {n}, D = {d}, K = {k}, block = {block}, Gaussian kernel, "
          "uniform [0, 1] data ==")
    x = torch.rand(n, d, generator=torch.Generator().manual_seed(0))
    kernel, flops, first = GaussianKernel(1.0), 2.0 * n * n * d, 0.0
    for name in dtypes:
        dtype = DTYPES[name]
        before = matmul_gflops(block, d, n, dtype)
        t = time.perf_counter()
        post = compute_posterior(x, kernel, top_k=k, block_size=block, dtype=dtype)
        seconds = time.perf_counter() - t
        after = matmul_gflops(block, d, n, dtype)
        rate = flops / seconds / 1e9
        total = torch.logaddexp(torch.logsumexp(post.log_q.double(), 1), post.log_rest.double())
        print(f"  {name}: whole table {seconds:.1f} s = {rate:.1f} GFLOP/s effective; block matmul "
              f"{before:.1f} (before) / {after:.1f} (after) GFLOP/s -> {rate / before:.0%} / "
              f"{rate / after:.0%}; rows sum to 1 within {float(total.abs().max()):.1e}")
        memory_line(f"the {name} table", n)
        RECORDS.append({"stage": "exact", "engine": "exact", "dtype": name, "n": n, "d": d, "k": k,
                        "seconds": seconds, "gflops": rate, "matmul_gflops": before,
                        "peak_rss_bytes": peak_rss()})
        xd = x.to(dtype)
        a, out = xd[:block], torch.empty(block, n, dtype=dtype)
        ratios = []
        for i in range(pairs):
            lo = (i * 4 * block) % max(n - 4 * block, 1)
            t = time.perf_counter()
            compute_posterior(xd, kernel, top_k=k, block_size=block, dtype=dtype, rows=(lo, lo + 4 * block))
            t_post = time.perf_counter() - t
            ratios.append(matmul_seconds(a, xd.T, out, 4) / t_post)
        ratios.sort()
        print(f"  {name}: paired (4 posterior blocks vs 4 block matmuls, x{pairs}): posterior at "
              f"{ratios[pairs // 2]:.0%} of matmul speed (median; range {ratios[0]:.0%} to {ratios[-1]:.0%})")
        first = first or rate
    return first


def manifold(n: int, d: int, latent: int = 8, noise: float = 0.05) -> torch.Tensor:
    """``n`` float32 points ``tanh(z W1) W2 + noise · ε`` with ``z ~ N(0, I_latent)``."""
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(latent, 128, generator=g) / math.sqrt(latent)
    w2 = torch.randn(128, d, generator=g) / math.sqrt(128)
    out = torch.empty(n, d)
    for i in range(0, n, 1 << 17):
        z = torch.randn(min(n - i, 1 << 17), latent, generator=g)
        out[i : i + z.shape[0]] = torch.tanh(z @ w1) @ w2 + noise * torch.randn(z.shape[0], d, generator=g)
    return out


def compare(approx: MapaPosterior, exact: MapaPosterior) -> tuple[float, float, float, float]:
    """recall@K (a tie with the exact K-th value counts), plain set recall, and the median
    absolute error of the estimated ``log_rest`` (nats) and relative error of the rest mass."""
    k = exact.top_k
    rel_a = approx.log_q[:, 1:] - approx.log_q[:, :1]  # log k(x_n | x_j) - log k(x_n | x_n)
    kth = exact.log_q[:, -1:] - exact.log_q[:, :1]
    tie = (rel_a >= kth - 1e-9 * (1 + kth.abs())).double().sum(1) / (k - 1)
    plain = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k
                          for a, b in zip(approx.index, exact.index, strict=True)])
    log_err = (approx.log_rest - exact.log_rest).abs()
    rel_err = (approx.log_rest.exp() - exact.log_rest.exp()).abs() / exact.log_rest.exp()
    return float(tie.mean()), float(plain.mean()), float(log_err.median()), float(rel_err.median())


def ann_stage(n: int, d: int, k: int, queries: int, noise_var: float, ivf_full: bool,
              exact_gflops: float) -> None:
    print(f"\n== approximate posterior: N = {n}, D = {d}, K = {k}, Gaussian kernel σ² = {noise_var}, "
          "8-d manifold data ==")
    t = time.perf_counter()
    x = manifold(n, d)
    print(f"  data: {time.perf_counter() - t:.1f} s")
    kernel = GaussianKernel(noise_var)
    lo = int(torch.randint(0, n - queries + 1, (1,), generator=torch.Generator().manual_seed(1)))
    sample = (lo, lo + queries)  # i.i.d. rows: a contiguous range is a random sample
    t = time.perf_counter()
    exact = compute_posterior(x, kernel, top_k=k, rows=sample)
    t_exact = time.perf_counter() - t
    full_exact = 2.0 * n * n * d / (exact_gflops * 1e9)
    q_self = float(exact.log_q[:, 0].exp().median())
    print(f"  exact reference for {queries} rows (float64): {t_exact:.1f} s; median log_rest "
          f"{float(exact.log_rest.median()):.2f}, median q(n | n) {q_self:.3f}")
    print(f"  the whole exact table would take ~{full_exact:.0f} s at the {exact_gflops:.0f} GFLOP/s "
          f"measured above (~{t_exact * n / queries:.0f} s at this float64 rate)")
    chunk = (0, min(n, 16_384))  # one whole query block: the per-row rate of a full run
    for kind in ("hnsw", "ivf"):
        t = time.perf_counter()
        nn = NeighbourIndex(x, kernel, top_k=k, params=IndexParams(index=kind))
        built = time.perf_counter() - t
        approx = nn.posterior(sample)
        tie, plain, log_err, rel_err = compare(approx, exact)
        t = time.perf_counter()
        nn.posterior(chunk)
        per_row = (time.perf_counter() - t) / (chunk[1] - chunk[0])
        p = nn.params
        setting = (f"M={p.hnsw_m}, efC={p.ef_construction}, efS={p.ef_search}" if kind == "hnsw"
                   else f"nlist={p.nlist}, nprobe={p.nprobe}")
        print(f"  {kind} ({setting}; K+E = {k + p.tail_neighbours} searched, M = {p.tail_samples} draws): "
              f"build {built:.1f} s; {per_row * 1e3:.3f} ms/row (search + rescoring + rest, "
              f"{chunk[1]} rows); recall@{k} {tie:.4f} (set overlap {plain:.4f}); rest mass: median "
              f"|Δ log| {log_err:.3f} nats, relative error {rel_err:.3f}")
        RECORDS.append({"stage": "approximate", "engine": kind, "setting": setting, "n": n, "d": d,
                        "k": k, "build_seconds": built, "ms_per_row": per_row * 1e3,
                        f"recall@{k}": tie, "set_overlap": plain, "rest_median_abs_log_err": log_err,
                        "rest_median_rel_err": rel_err})
        if kind == "hnsw" or ivf_full:
            t = time.perf_counter()
            post = nn.posterior()
            table = time.perf_counter() - t
            assert torch.equal(post.index[sample[0] : sample[1]], approx.index)
            print(f"  {kind}: whole table ({n} rows) {table:.1f} s; build + table {built + table:.1f} s "
                  f"({(built + table) / full_exact:.1%} of the exact estimate)")
            del post
        else:
            print(f"  {kind}: whole table not run (--ivf-full); ~{built + per_row * n:.0f} s "
                  "extrapolated from the block")
        del nn
        memory_line(f"the {kind} stage", n)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n-exact", type=int, default=50_000)
    p.add_argument("--d-exact", type=int, default=784)
    p.add_argument("--k-exact", type=int, default=64)
    p.add_argument("--block", type=int, default=1024, help="rows per exact block")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=sorted(DTYPES))
    p.add_argument("--n", "--n-ann", dest="n_ann", type=int, default=1_000_000)
    p.add_argument("--d-ann", type=int, default=64)
    p.add_argument("--k-ann", type=int, default=32)
    p.add_argument("--queries", type=int, default=1000, help="rows checked against the exact posterior")
    p.add_argument("--noise-var", type=float, default=0.2, help="σ² of the approximate stage's kernel")
    p.add_argument("--ivf-full", action="store_true", help="also build the whole table with IVF")
    p.add_argument("--skip-exact", action="store_true")
    p.add_argument("--skip-ann", action="store_true")
    p.add_argument("--square", type=int, default=2048, help="side of the square matmul measured")
    args = p.parse_args()
    if args.tiny:
        args.n_exact, args.d_exact, args.k_exact, args.block, args.square = 600, 16, 8, 128, 128
        args.n_ann, args.d_ann, args.k_ann, args.queries = 3000, 8, 8, 50
    info = start(args)
    info["faiss_threads"] = faiss.omp_get_max_threads()

    clock = time.perf_counter()
    print(f"faiss {faiss.__version__} on {info['faiss_threads']} thread(s)")
    print("\n== matmul throughput (torch.matmul, best of 3) ==")
    for name in args.dtypes:
        dtype = DTYPES[name]
        square = matmul_gflops(args.square, args.square, args.square, dtype)
        block = matmul_gflops(args.block, args.d_exact, args.n_exact, dtype)
        print(f"  {name}: square {args.square}³ {square:.1f} GFLOP/s; block ({args.block}×{args.d_exact}) @ "
              f"({args.d_exact}×{args.n_exact}) {block:.1f} GFLOP/s")
        RECORDS.append({"stage": "matmul", "dtype": name, "square": args.square,
                        "square_gflops": square, "block_gflops": block})
    gflops = 0.0
    if not args.skip_exact:
        gflops = exact_stage(args.n_exact, args.d_exact, args.k_exact, args.block, args.dtypes)
    if not args.skip_ann:
        rate = gflops or matmul_gflops(args.block, args.d_ann, args.n_ann, DTYPES[args.dtypes[0]])
        ann_stage(args.n_ann, args.d_ann, args.k_ann, args.queries, args.noise_var, args.ivf_full, rate)
    print(f"\ntotal {time.perf_counter() - clock:.0f} s; load average now {os.getloadavg()[0]:.2f}")
    knobs = {"n_exact": args.n_exact, "d_exact": args.d_exact, "k_exact": args.k_exact,
             "block": args.block, "dtypes": args.dtypes, "n_ann": args.n_ann, "d_ann": args.d_ann,
             "k_ann": args.k_ann, "queries": args.queries, "noise_var": args.noise_var,
             "ivf_full": args.ivf_full, "skip_exact": args.skip_exact, "skip_ann": args.skip_ann,
             "square": args.square, "threads": args.threads}
    write_records(args.json, "posterior", info, knobs, RECORDS)


if __name__ == "__main__":
    main()
