"""Sigmoid belief networks on binarized MNIST: NVIL, VIMCO (K = 5, 50) and REINFORCE.

Each record trains ``mapa-vae``'s ``--method sbn`` through :func:`mapa_vae.train` for a fixed
budget of epochs and reports the test log-likelihood (importance sampling with the recognition
network, 1000 samples), the last epoch's training bound and seconds per epoch. The data is
``../shared/data/binarized_mnist.npz`` (beside the checkout) (or ``--mnist PATH``) when it exists, else
``sprites-binary``; ``--n-train`` / ``--n-test`` take the first rows of the file's own splits
(written to a temporary ``.npz``) so that a small budget stays small. Published numbers for
the same architectures are printed beside ours, with their budgets.

    python benchmarks/sbn.py --json sbn.json --epochs 5 --n-train 5000 --layers 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mapa_vae.config import TrainConfig
from mapa_vae.training.loop import train

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist.npz"  # beside the checkout

# (estimator, K, layers) -> (number, what it is, budget); see ../shared/ANCHORS.md
PUBLISHED: dict[tuple[str, int, tuple[int, ...]], str] = {
    ("nvil", 1, (200,)): "-112.5 highest training ELBO, linear 1 layer (RELAX paper table)",
    ("nvil", 1, (200, 200)): "-99.6 highest training ELBO, linear 2 layers (RELAX paper table)",
    ("vimco", 5, (200, 200, 200)): "-91.33 bound (y0ast/VIMCO: Adam 1e-3, batch 24, 2000 epochs); "
                                   "VIMCO paper about -93.6",
}

ESTIMATORS = (("nvil", 1), ("vimco", 5), ("vimco", 50), ("reinforce", 1))


def _subset(src: Path, n_train: int, n_test: int, out: Path) -> Path:
    with np.load(src, allow_pickle=False) as d:
        np.savez(out, train=d["train"][:n_train], valid=d["valid"][: max(n_test // 2, 100)],
                 test=d["test"][:n_test])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="output file of records")
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
    archs = [tuple(a) for a in (args.layers or [[200], [200, 200, 200]])]
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.mnist.exists():
            data = str(_subset(args.mnist, args.n_train, args.n_test, Path(tmp) / "mnist.npz"))
            where = f"binarized MNIST (first {args.n_train} train / {args.n_test} test rows)"
        else:
            data, where = "sprites-binary", "sprites-binary (binarized MNIST file absent)"
        print(f"data: {where}; {args.epochs} epochs, batch {args.batch_size}, Adam 1e-3")
        for layers in archs:
            for spec in args.estimators:
                est, k = spec.split(":")
                cfg = TrainConfig(data=data, method="sbn", estimator=est, samples=int(k), layers=layers,
                                  likelihood="bernoulli", epochs=args.epochs, batch_size=args.batch_size,
                                  eval_every=args.epochs, n_train=args.n_train, n_val=100,
                                  n_test=args.n_test)
                r = train(cfg, Path(tmp) / f"{est}-{k}-{'-'.join(map(str, layers))}", progress=False)
                rec = {"estimator": est, "samples": int(k), "layers": list(layers), "epochs": args.epochs,
                       "test_log_lik": r.metrics["test_log_lik"],
                       "train_bound": r.history[-1]["train_bound"],
                       "seconds_per_epoch": r.metrics["seconds_per_epoch"], "data": where}
                records.append(rec)
                published = PUBLISHED.get((est, int(k), layers), "no published number for this setting")
                print(f"{est:9s} K={k:<3s} layers={'-'.join(map(str, layers)):12s} "
                      f"test {rec['test_log_lik']:8.2f}  train bound {rec['train_bound']:8.2f}  "
                      f"{rec['seconds_per_epoch']:6.1f} s/epoch | published: {published}", flush=True)
    Path(args.json).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
