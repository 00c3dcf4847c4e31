"""MAPA's exact table on binary images: the Hamming search against the matrix product.

For 0/1 data the Bernoulli kernel is affine in the Hamming distance, so the exact top-K table
(:func:`mapa_vae.inference.exact.compute_posterior`) is found by a popcount search
(:func:`mapa_vae.inference.hamming.hamming_top_k`) instead of a float matrix product. In one
process, side by side on the same data: the Hamming table (timed before and after the other, the
machine may be shared), then the matrix-product table (``hamming=False``, the table every run
used before), and how far they agree:

- ``same_index``: the fraction of (row, rank) entries holding the same atom;
- ``same_set``: the fraction of rows storing the same set of atoms;
- ``differs_only_in_ties``: whether every entry that differs has the same kernel value (ties:
  the matrix product orders equal distances by rounding noise, the Hamming table by index);
- ``max_abs_diff_log_q`` / ``max_abs_diff_log_rest``: the largest value differences.

    python benchmarks/hamming.py --json docs/benchmarks/hamming-sprites50k.json  # ~10 min, 1 thread
    python benchmarks/hamming.py --n 10000                                         # ~1 min
    python benchmarks/hamming.py --tiny --json /tmp/hamming.json                   # seconds (CI)
"""

from __future__ import annotations

import resource
import time
from typing import Any

import faiss
import torch
from harness import parser, start, write_records

from mapa_vae.data.images import load_image_dataset
from mapa_vae.inference.exact import compute_posterior
from mapa_vae.inference.posterior import MapaPosterior
from mapa_vae.kernels import BernoulliKernel

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _timed(x: torch.Tensor, kernel: BernoulliKernel, top_k: int, dtype: torch.dtype,
           hamming: bool, block_size: int) -> tuple[MapaPosterior, float, float]:
    """The table, its wall-clock seconds and this process's CPU seconds (less sensitive to a
    shared machine's load than the wall clock)."""
    t, c = time.perf_counter(), time.process_time()
    post = compute_posterior(x, kernel, top_k, block_size=block_size, dtype=dtype, hamming=hamming)
    return post, time.perf_counter() - t, time.process_time() - c


def agreement(fast: MapaPosterior, slow: MapaPosterior) -> dict[str, Any]:
    """How far two top-``K`` tables of the same data agree (see the module docstring)."""
    same = fast.index == slow.index  # (N, K)
    sets = (torch.sort(fast.index, 1).values == torch.sort(slow.index, 1).values).all(1)
    diff_q = (fast.log_q.double() - slow.log_q.double()).abs()
    finite = torch.isfinite(fast.log_rest) & torch.isfinite(slow.log_rest)
    both_inf = torch.isinf(fast.log_rest) & torch.isinf(slow.log_rest)
    diff_rest = (fast.log_rest.double() - slow.log_rest.double())[finite].abs()
    return {
        "same_index": float(same.double().mean()),
        "same_set": float(sets.double().mean()),
        "differs_only_in_ties": bool((diff_q[~same] < 1e-9).all()),
        "max_abs_diff_log_q": float(diff_q.max()),
        "max_abs_diff_log_rest": float(diff_rest.max()) if diff_rest.numel() else 0.0,
        "log_rest_finite_alike": bool((finite | both_inf).all()),
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", default="sprites-binary", help="a built-in binary image data set")
    p.add_argument("--n", type=int, default=50_000, help="training images N (default 50 000)")
    p.add_argument("--data-seed", type=int, default=0, help="which draw of the data set")
    p.add_argument("--top-k", type=int, default=512, help="K entries stored per row (default 512)")
    p.add_argument("--rho", type=float, default=0.9, help="Bernoulli kernel softening (default 0.9)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float64",
                   help="table precision (default float64, the training default's table)")
    p.add_argument("--block-size", type=int, default=1024,
                   help="matrix product: rows per block (default 1024, capped at 2^27 / N)")
    args = p.parse_args()
    if args.tiny:
        args.n, args.top_k = 1500, 64
    info = start(args)
    faiss.omp_set_num_threads(args.threads)
    ds = load_image_dataset(args.data, n_train=args.n, n_val=1, n_test=1, seed=args.data_seed)
    x, kernel, dtype = ds.train, BernoulliKernel(args.rho), DTYPES[args.dtype]
    print(f"{args.data}: N = {x.shape[0]}, D = {x.shape[1]}, K = {args.top_k}, {args.dtype}", flush=True)

    fast, t_before, c_before = _timed(x, kernel, args.top_k, dtype, True, args.block_size)
    print(f"hamming        {t_before:8.1f} s ({c_before:.1f} s CPU)", flush=True)
    slow, t_matmul, c_matmul = _timed(x, kernel, args.top_k, dtype, False, args.block_size)
    print(f"matrix product {t_matmul:8.1f} s ({c_matmul:.1f} s CPU)", flush=True)
    again, t_after, c_after = _timed(x, kernel, args.top_k, dtype, True, args.block_size)
    print(f"hamming again  {t_after:8.1f} s ({c_after:.1f} s CPU)", flush=True)
    agree = agreement(fast, slow)
    repeat_identical = (torch.equal(fast.index, again.index) and torch.equal(fast.log_q, again.log_q)
                        and torch.equal(fast.log_rest, again.log_rest))
    record = {
        "data": args.data, "n": x.shape[0], "d": x.shape[1], "top_k": args.top_k,
        "seconds_hamming": t_before, "seconds_hamming_again": t_after, "seconds_matmul": t_matmul,
        "cpu_seconds_hamming": c_before, "cpu_seconds_hamming_again": c_after,
        "cpu_seconds_matmul": c_matmul,
        "speedup": t_matmul / max(t_before, t_after),
        "speedup_cpu": c_matmul / max(c_before, c_after), "hamming_repeat_identical": repeat_identical,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, **agree,
    }
    print(f"speedup {record['speedup']:.1f}x wall, {record['speedup_cpu']:.1f}x CPU (against the slower "
          f"Hamming run); same index "
          f"{agree['same_index']:.4f}, same set {agree['same_set']:.4f}, differences only in ties: "
          f"{agree['differs_only_in_ties']}; max |d log q| {agree['max_abs_diff_log_q']:.2e}, "
          f"max |d log rest| {agree['max_abs_diff_log_rest']:.2e}", flush=True)
    knobs = {"data": args.data, "n": args.n, "data_seed": args.data_seed, "top_k": args.top_k,
             "rho": args.rho, "dtype": args.dtype, "block_size": args.block_size,
             "threads": args.threads, "tiny": args.tiny}
    write_records(args.json, "hamming", info, knobs, [record])


if __name__ == "__main__":
    main()
