"""Sigmoid belief networks on binarized MNIST: NVIL, VIMCO (K = 5, 50) and REINFORCE.

Each record trains ``mapa-vae``'s ``--method sbn`` through :func:`mapa_vae.train` for a fixed
budget of epochs and reports the test log-likelihood (importance sampling with the recognition
network, 1000 samples), the last epoch's training bound and seconds per epoch. The data is
``../shared/data/binarized_mnist.npz`` (beside the checkout) (or ``--mnist PATH``) when it exists, else
``sprites-binary``; ``--n-train`` / ``--n-test`` take the first rows of the file's own splits
(written to a temporary ``.npz``) so that a small budget stays small. Published numbers for
the same architectures are printed beside ours, with their budgets.

Every run states its knobs (one restart, Adam 1e-3, batch ``--batch-size``, the linear SBN's
``--activation`` unused); the last epoch's training bound is read from ``history.json`` in either
shape (a float, a list over restarts, or a record with ``train_bound_per_copy``).

    python benchmarks/sbn.py --json sbn.json --epochs 5 --n-train 5000 --layers 200
    python benchmarks/sbn.py --tiny --json /tmp/sbn.json   # seconds: the CI smoke test
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from harness import bench_config, knobs_of, parser, start, write_mnist_subset, write_records

from mapa_vae.training.loop import train

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist.npz"  # beside the checkout
LR = 1e-3

# (estimator, K, layers) -> (number, what it is, budget); see ../shared/ANCHORS.md
PUBLISHED: dict[tuple[str, int, tuple[int, ...]], str] = {
    ("nvil", 1, (200,)): "-112.5 highest training ELBO, linear 1 layer (RELAX paper table)",
    ("nvil", 1, (200, 200)): "-99.6 highest training ELBO, linear 2 layers (RELAX paper table)",
    ("vimco", 5, (200, 200, 200)): "-91.33 bound (y0ast/VIMCO: Adam 1e-3, batch 24, 2000 epochs); "
                                   "VIMCO paper about -93.6",
}

ESTIMATORS = (("nvil", 1), ("vimco", 5), ("vimco", 50), ("reinforce", 1))


def last_train_bound(history: list[dict[str, Any]], chosen: int = 0) -> float:
    """The last epoch's training bound of copy ``chosen``, from a history record of any shape:
    ``train_bound`` a float (one copy, or the chosen copy's beside ``train_bound_per_copy``) or a
    list over the copies.

    >>> last_train_bound([{"epoch": 1, "train_bound": -3.0}])
    -3.0
    >>> last_train_bound([{"epoch": 1, "train_bound": [-3.0, -2.0]}], chosen=1)
    -2.0
    >>> last_train_bound([{"epoch": 1, "train_bound": -2.0, "train_bound_per_copy": [-3.0, -2.0]}], 1)
    -2.0
    """
    value = history[-1]["train_bound"]
    return float(value[chosen]) if isinstance(value, list) else float(value)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--layers", type=int, nargs="+", action="append",
                   help="one architecture per use (default: 200 and 200 200 200)")
    p.add_argument("--n-train", type=int, default=50000)
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--estimators", nargs="+", default=[f"{e}:{k}" for e, k in ESTIMATORS],
                   help="estimator:K pairs")
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--mnist", type=Path, default=MNIST)
    args = p.parse_args()
    if args.tiny:
        args.epochs, args.layers, args.n_train, args.n_test = 1, [[10]], 200, 100
        args.estimators = ["nvil:1", "vimco:2"]
    info = start(args)
    archs = [tuple(a) for a in (args.layers or [[200], [200, 200, 200]])]
    records: list[dict[str, Any]] = []
    knobs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.mnist.exists():
            data = str(Path(tmp) / "mnist.npz")
            write_mnist_subset(args.mnist, Path(data), args.n_train, max(args.n_test // 2, 100),
                               args.n_test)
            where = f"binarized MNIST (first {args.n_train} train / {args.n_test} test rows)"
        else:
            data, where = "sprites-binary", "sprites-binary (binarized MNIST file absent)"
        print(f"data: {where}; {args.epochs} epochs, batch {args.batch_size}, Adam {LR:g}")
        for layers in archs:
            for spec in args.estimators:
                est, k = spec.split(":")
                cfg = bench_config(data=data, method="sbn", estimator=est, samples=int(k), layers=layers,
                                   sbn_hidden=None, likelihood="bernoulli", epochs=args.epochs,
                                   batch_size=args.batch_size, lr=LR, seed=0, restarts=1,
                                   hidden=(50, 50, 50), activation="tanh", latent_dim=1,
                                   threads=args.threads, dtype="float32", eval_every=args.epochs,
                                   n_train=args.n_train, n_val=100, n_test=args.n_test)
                knobs = knobs_of(cfg, "epochs", "likelihood")
                r = train(cfg, Path(tmp) / f"{est}-{k}-{'-'.join(map(str, layers))}", progress=False)
                rec = {"estimator": est, "samples": int(k), "layers": list(layers), "epochs": args.epochs,
                       "test_log_lik": r.metrics["test_log_lik"],
                       "train_bound": last_train_bound(r.history, int(r.metrics.get("restart", 0))),
                       "seconds_per_epoch": r.metrics["seconds_per_epoch"], "data": where}
                records.append(rec)
                published = PUBLISHED.get((est, int(k), layers), "no published number for this setting")
                print(f"{est:9s} K={k:<3s} layers={'-'.join(map(str, layers)):12s} "
                      f"test {rec['test_log_lik']:8.2f}  train bound {rec['train_bound']:8.2f}  "
                      f"{rec['seconds_per_epoch']:6.1f} s/epoch | published: {published}", flush=True)
    knobs.update(estimator=None, samples=None, method="sbn")
    write_records(args.json, "sbn", info, knobs, records)


if __name__ == "__main__":
    main()
