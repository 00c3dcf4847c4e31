"""MAPA's exact table on binary images: the Hamming searches against the matrix product.

For 0/1 data the Bernoulli kernel is affine in the Hamming distance, so the exact top-K table
(:func:`mapa_vae.inference.exact.compute_posterior`) is found from Hamming distances
(:func:`mapa_vae.inference.hamming.hamming_top_k`) instead of a float64 matrix product. In one
process, side by side on the same data and one thread (CPU seconds of this process, which a
shared machine's load inflates less than the wall clock):

- ``product``: the int8 matrix product on AMX tiles (``method="product"``);
- ``popcount``: faiss's popcount search (``method="popcount"``);
- ``matmul``: the float64 matrix-product table (``hamming=False``, the table every run used
  before), ``--block-size`` rows a block;
- ``product`` again after the others (the ratios use the slower of its two runs).

Checks: the product and popcount tables are identical bit for bit (``product_is_popcount``);
against the matmul table (which orders equal distances by rounding noise, the Hamming tables by
index):

- ``same_index``: the fraction of (row, rank) entries holding the same atom;
- ``same_set``: the fraction of rows storing the same set of atoms;
- ``differs_only_in_ties``: whether every entry that differs has the same kernel value;
- ``max_abs_diff_log_q`` / ``max_abs_diff_log_rest``: the largest value differences.

``--paths`` runs a subset (``--paths product`` times the new search alone, e.g. on MNIST).

    nice -n 10 python benchmarks/hamming.py --json docs/benchmarks/hamming-sprites50k.json  # minutes
    nice -n 10 python benchmarks/hamming.py --data ../shared/data/binarized_mnist.npz --paths product
    python benchmarks/hamming.py --tiny --json /tmp/hamming.json                            # seconds (CI)
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import faiss
import torch
from harness import parser, start, write_records

from mapa_vae.data.images import load_image_dataset
from mapa_vae.data.loading import load_dataset
from mapa_vae.inference.exact import compute_posterior
from mapa_vae.inference.hamming import hamming_top_k, product_available
from mapa_vae.inference.posterior import MapaPosterior, resolve_top_k
from mapa_vae.kernels import BernoulliKernel

DTYPES = {"float32": torch.float32, "float64": torch.float64}
PATHS = ("product", "popcount", "matmul")


def timed(build: Callable[[], MapaPosterior]) -> tuple[MapaPosterior, float, float]:
    """The table, its wall-clock seconds and this process's CPU seconds."""
    t, c = time.perf_counter(), time.process_time()
    post = build()
    return post, time.perf_counter() - t, time.process_time() - c


def identical(a: MapaPosterior, b: MapaPosterior) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("index", "log_q", "log_rest"))


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
    p.add_argument("--data", default="sprites-binary",
                   help="a built-in binary image data set, or a binarized-MNIST .npz (its train split)")
    p.add_argument("--n", type=int, default=50_000, help="training images N (default 50 000)")
    p.add_argument("--data-seed", type=int, default=0, help="which draw of a built-in data set")
    p.add_argument("--top-k", type=int, default=512, help="K entries stored per row (default 512)")
    p.add_argument("--rho", type=float, default=0.9, help="Bernoulli kernel softening (default 0.9)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float64",
                   help="table precision (default float64, the training default's table)")
    p.add_argument("--block-size", type=int, default=1024,
                   help="matrix product: rows per block (default 1024, capped at 2^27 / N)")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                   help="which tables to build (default all three)")
    args = p.parse_args()
    if args.tiny:
        args.n, args.top_k = 1500, 64
    info = start(args)
    faiss.omp_set_num_threads(args.threads)
    if args.data.lower().endswith(".npz"):
        x = load_dataset(args.data).train[: args.n].double()
    else:
        x = load_image_dataset(args.data, n_train=args.n, n_val=1, n_test=1, seed=args.data_seed).train
    kernel, dtype = BernoulliKernel(args.rho), DTYPES[args.dtype]
    top_k = resolve_top_k(x.shape[0], args.top_k)
    paths = [q for q in PATHS if q in args.paths and (q != "product" or product_available())]
    print(f"{args.data}: N = {x.shape[0]}, D = {x.shape[1]}, K = {top_k}, {args.dtype}; "
          f"int8 product available: {product_available()}", flush=True)
    builds = {
        "product": lambda: hamming_top_k(x, kernel, top_k, dtype, method="product"),
        "popcount": lambda: hamming_top_k(x, kernel, top_k, dtype, method="popcount"),
        "matmul": lambda: compute_posterior(x, kernel, top_k, block_size=args.block_size, dtype=dtype,
                                            hamming=False),
    }
    tables, record = {}, {"data": args.data, "n": x.shape[0], "d": x.shape[1], "top_k": top_k}
    for name in paths + (["product"] if "product" in paths and len(paths) > 1 else []):
        again = name in tables
        post, wall, cpu = timed(builds[name])
        label = name + ("_again" if again else "")
        print(f"{label:15s} {wall:8.1f} s ({cpu:.1f} s CPU)", flush=True)
        record[f"seconds_{label}"], record[f"cpu_seconds_{label}"] = wall, cpu
        if again:
            record["product_repeat_identical"] = identical(tables["product"], post)
        else:
            tables[name] = post
    slowest = max((v for k, v in record.items() if k.startswith("cpu_seconds_product")), default=0.0)
    if "product" in tables and "popcount" in tables:
        record["product_is_popcount"] = identical(tables["product"], tables["popcount"])
        record["speedup_cpu_popcount_over_product"] = record["cpu_seconds_popcount"] / slowest
    if "matmul" in tables:
        for name in ("product", "popcount"):
            if name in tables:
                cpu = slowest if name == "product" else record["cpu_seconds_popcount"]
                record[f"speedup_cpu_matmul_over_{name}"] = record["cpu_seconds_matmul"] / cpu
        fast = tables.get("product", tables.get("popcount"))
        if fast is not None:
            record.update(agreement(fast, tables["matmul"]))
    record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("; ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in record.items() if k.startswith(("speedup", "product_", "same_", "differs",
                                                                 "max_abs"))), flush=True)
    knobs = {"data": args.data, "n": args.n, "data_seed": args.data_seed, "top_k": args.top_k,
             "rho": args.rho, "dtype": args.dtype, "block_size": args.block_size, "paths": paths,
             "threads": args.threads, "tiny": args.tiny}
    write_records(args.json, "hamming", info, knobs, [record])


if __name__ == "__main__":
    main()
