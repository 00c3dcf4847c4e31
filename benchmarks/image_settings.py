"""MAPA's settings for binary images: S, k, batch, learning rate and one kernel remedy, each
measured by the quality of the model it delivers after a fixed budget of seconds.

Every variant trains the same networks (784-200-200 tanh MLPs both ways, latent 4) on the same
images for ``--budget`` seconds of its clock (``--clock``: CPU seconds of its one thread by default;
the posterior table included, built afresh), then its
flow code prior is fitted (timed, reported beside the training clock) and the delivered model is
scored off the clock by :func:`time_to_quality.referee` (importance sampling with ``--eval-samples``
draws per test image, the best of four proposal widths). IWAE(50) trained for ``--iwae-epochs``
epochs is the reference, side by side in the same run.

The variants (``--variants``; names are ``S<S>-k<k>``, then ``-b<batch>``, ``-lr<rate>``,
``-ppl<perplexity>``, ``-s<seed>`` where they differ from batch 100, Adam 1e-3, the paper's kernel
and ``--seed``):

- the image defaults ``S20-k2-lr3e-3`` (:data:`~mapa_vae.methods.mapa.IMAGE_DEFAULTS` when this
  grid was run) and one knob moved at a time: fewer tail draws ``S10``, ``S5``, ``S1``; ``k1``;
  batch ``-b50``; Adam ``-lr1e-2``; then the winners combined; ``S0-k1`` is the autoencoder term
  alone (a lower bound that drops the tail, so a reference, not a candidate: does the tail matter
  on images?);
- the older points ``S100-k10`` (the paper's settings) and ``S20-k2`` at Adam 1e-3;
- the remedy for the degenerate kernel (median nearest-other Hamming distance on MNIST 51 pixels,
  perplexity 1.00 for every ρ in 0.55-0.9): ``-ppl5``, a kernel whose ρ is calibrated so that
  ``q(· | n)`` has median perplexity 5 (:func:`mapa_vae.kernels.calibrate_rho`, data only);
- a repeat with another seed (``-s1``) shows the noise: the seed's, and the machine's (on a
  shared machine the steps one CPU second buys vary by a quarter).

``--steps N`` trains every variant for ``N`` steps instead of ``--budget`` seconds (the
equal-steps comparison; ``N`` times the batch must be whole epochs of ``--n-train``).

``--score empirical`` scores MAPA as trained by its exact empiricalized test log-likelihood
(Eq. 6) instead: no prior fit and no importance sampling, seconds per variant instead of minutes
(the delivered model scored within a nat of it on MNIST, docs/results.md).

The grid in docs/benchmarks/image-settings-mnist10k.json is several runs like this one, each
with its own ``--variants`` (each run in the JSON lists its records); ``--steps 2000`` for the
equal-steps rows, ``--data sprites-binary`` for image-settings-sprites10k.json:

    nice -n 10 python benchmarks/image_settings.py --data ../shared/data/binarized_mnist.npz \\
        --n-train 10000 --n-test 500 --budget 60 --score empirical --iwae-epochs 0 \\
        --variants S20-k2-lr3e-3 S1-k1-lr3e-3 S5-k1-lr3e-3 S10-k1-lr3e-3 S20-k2-lr3e-3-s1 --json g.json
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import time_to_quality as ttq
from harness import bench_config, knobs_of, parser, start, write_records
from time_to_quality import curve, warm_up
from torch import Tensor

from mapa_vae.config import TrainConfig
from mapa_vae.data.loading import load_dataset
from mapa_vae.errors import MapaError
from mapa_vae.inference.objectives import EmpiricalLogLikelihood
from mapa_vae.methods.base import Architecture
from mapa_vae.models.latent import LatentVariableModel

VARIANTS = ("S20-k2-lr3e-3", "S10-k2-lr3e-3", "S5-k2-lr3e-3", "S1-k2-lr3e-3", "S20-k1-lr3e-3",
            "S20-k2-b50-lr3e-3", "S20-k2-lr1e-2", "S0-k1-lr3e-3", "S20-k2-lr3e-3-s1")
_NAME = re.compile(r"S(\d+)-k(\d+)(?:-b(\d+))?(?:-lr([0-9.]+e-\d+|[0-9.]+))?(?:-ppl([0-9.]+))?"
                   r"(-loo)?(?:-s(\d+))?$")


def variant_config(name: str, common: dict[str, Any], prior_steps: int) -> TrainConfig:
    """The MAPA config a variant's name spells (see the module docstring)."""
    m = _NAME.match(name)
    if m is None:
        raise SystemExit(f"--variants: cannot read {name!r} (e.g. S20-k2-b50-lr3e-3-ppl5)")
    s, k, b, lr, ppl, loo, seed = m.groups()
    knobs = {**common, "seed": int(seed) if seed else common["seed"]}
    return bench_config(method="mapa", samples=int(s), k=int(k), batch_size=int(b or 100),
                        lr=float(lr or 1e-3), kernel_perplexity=float(ppl) if ppl else None,
                        code_prior="flow", code_prior_steps=prior_steps, rho=0.9,
                        posterior="kernel-loo" if loo else "kernel", **knobs)


def whole_epochs(steps: int, batch_size: int, n: int) -> int:
    """The epochs ``steps`` steps of ``batch_size`` make over ``n`` points; they must be whole.

    >>> whole_epochs(2000, 100, 10_000), whole_epochs(2000, 50, 10_000)
    (20, 10)
    """
    if steps < 1 or steps * batch_size % n:
        raise SystemExit(f"--steps {steps}: {steps} steps of batch {batch_size} are not whole "
                         f"epochs of {n} points")
    return steps * batch_size // n


def paired(lp: Tensor, first: Tensor, name: str) -> dict[str, Any]:
    """A variant's test log-liks ``lp`` minus those of the first variant, ``name``, on the same
    images ``(n_test,)``: the mean difference and its standard error (the images' own spread,
    ±1.3 nats on MNIST, cancels; training noise does not: see the ``-s<seed>`` repeats)."""
    d = lp - first  # (n_test,)
    return {"minus": name, "paired_diff": float(d.mean()),
            "paired_stderr": float(d.std() / math.sqrt(d.numel()))}


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--data", default="../shared/data/binarized_mnist.npz",
                   help="a binarized-MNIST .npz (the first --n-train training images)")
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--budget", type=float, default=60.0, help="MAPA's seconds of clock per variant")
    p.add_argument("--steps", type=int, default=None,
                   help="train each MAPA variant this many steps instead of --budget seconds")
    p.add_argument("--iwae-epochs", type=int, default=10, help="the IWAE(50) reference's epochs (0: none)")
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--width-pick", type=int, default=100)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--code-prior-steps", type=int, default=2000, help="the flow fit's step limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score", choices=["referee", "empirical"], default="referee",
                   help="referee: the delivered model (code prior fitted, timed) by the referee; "
                        "empirical: MAPA as trained by its exact empiricalized test log-likelihood "
                        "(Eq. 6; no prior fit, seconds per variant instead of minutes)")
    p.add_argument("--clock", choices=list(ttq.CLOCKS), default="cpu", help="see time_to_quality.py")
    args = p.parse_args(argv)
    ttq.now = ttq.CLOCKS[args.clock]
    if args.tiny:
        args.data, args.n_train, args.n_test, args.budget, args.iwae_epochs = "digits-binary", 300, 30, 1.0, 1
        args.eval_samples, args.width_pick, args.code_prior_steps = 30, 10, 20
        args.variants = ["S10-k1", "S10-k1-ppl5"]
    info = start(args)
    npz = args.data.lower().endswith(".npz")
    try:
        data = load_dataset(args.data) if npz else load_dataset(
            args.data, n_train=args.n_train, n_val=10, n_test=args.n_test, seed=0)
    except MapaError as e:  # a size the data set lacks, a missing file: one line
        raise SystemExit(f"image_settings: {e}") from None
    train, test = data.train[: args.n_train].float(), data.test[: args.n_test].float()
    hidden = (32,) if args.tiny else (200, 200)
    arch = Architecture(data.dim, 4, hidden, "tanh")
    common = {"data": args.data, "latent_dim": 4, "hidden": hidden, "activation": "tanh",
              "seed": args.seed, "restarts": 1, "threads": args.threads, "dtype": "float32",
              "likelihood": "bernoulli"}
    runs = {name: variant_config(name, common, args.code_prior_steps) for name in args.variants}
    if args.iwae_epochs > 0:
        runs["iwae50"] = bench_config(method="iwae", samples=50, batch_size=100, lr=1e-3, **common)
    each = f"{args.steps} steps" if args.steps else f"{args.budget:.0f} s"
    print(f"{Path(args.data).stem}: N = {train.shape[0]}, {test.shape[0]} test images; MAPA "
          f"{each} each, IWAE(50) {args.iwae_epochs} epochs", flush=True)
    knobs = {"budget": args.budget, "steps": args.steps, "clock": args.clock, "score": args.score,
             "n_train": train.shape[0], "n_test": test.shape[0], "eval_samples": args.eval_samples,
             "width_pick": args.width_pick, "iwae_epochs": args.iwae_epochs, "data": args.data}
    records: list[dict[str, Any]] = []
    per_image: list[Tensor] = []  # each scored variant's (n_test,) log-liks, in order

    def empirical(model: LatentVariableModel) -> ttq.Score:
        lp = EmpiricalLogLikelihood(train)(model, test).value  # (n_test,), exact
        per_image.append(lp)
        return ttq.Score(float(lp.mean()), float(lp.std() / math.sqrt(lp.numel())),
                         f"exact empiricalized log-lik over the {train.shape[0]} atoms (Eq. 6)")

    scorer = empirical if args.score == "empirical" else None
    for name, cfg in runs.items():
        try:
            warm_up(cfg, train, arch)
            with tempfile.TemporaryDirectory() as cache:
                stop = (args.iwae_epochs if cfg.method == "iwae" else None if args.steps is None
                        else whole_epochs(args.steps, cfg.batch_size, train.shape[0]))
                points, setup = curve(name, replace(cfg, cache_dir=cache), train, test, arch,
                                      args.budget, args.budget, [], args.eval_samples, args.width_pick,
                                      stop_epochs=stop, score=scorer if cfg.method == "mapa" else None)
        except (MapaError, ValueError) as e:  # a variant the package refuses: say so, go on
            print(f"  {name}: refused: {e}", flush=True)
            records.append({"variant": name, "error": str(e)})
            continue
        diff = (paired(per_image[-1], per_image[0], args.variants[0])
                if cfg.method == "mapa" and scorer is not None else {})
        records.append({"variant": name, **knobs_of(cfg, "k", "kernel_perplexity", "posterior"),
                        "setup_seconds": setup, **points[-1], **diff})
        write_records(args.json, "image_settings", info, knobs, records)  # so far: a stop keeps it
    print("| variant | steps | epochs | training s | steps per s | prior fit s | test log-lik | "
          f"minus {args.variants[0]} (paired) |")
    for r in records:
        if "error" in r:
            continue
        print(f"| {r['variant']} | {r['steps']} | {r['epochs']:.1f} | {r['train_seconds']:.1f} | "
              f"{r['steps'] / r['train_seconds']:.1f} | {r['fit_seconds']:.1f} | "
              f"{r['test_log_lik']:.2f} ± {r['stderr']:.2f} | "
              + (f"{r['paired_diff']:+.2f} ± {r['paired_stderr']:.2f} |" if "minus" in r else " |"))
    write_records(args.json, "image_settings", info, knobs, records)


if __name__ == "__main__":
    main()
