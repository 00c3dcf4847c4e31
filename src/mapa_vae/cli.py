"""The ``mapa-vae`` command line: data, train, sample, evaluate, compare.

Every user error (bad file, bad value, unknown name) is printed as one line,
``mapa-vae: error: …``, and the command exits with status 2; a system error (disk full, I/O
error) is one such line too, with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np
import torch

from .distributed import DEVICES, resolve_device
from .storage import MapaError, atomic_write

__all__ = ["build_parser", "main"]


def _save_npy(path: str, array: np.ndarray) -> None:
    if not path.endswith(".npy"):
        raise MapaError(f"{path}: output file must end in .npy")
    with atomic_write(path) as f:
        np.save(f, array, allow_pickle=False)


def cmd_data(args: argparse.Namespace) -> None:
    from .data import make_ground_truth_data

    ds = make_ground_truth_data(args.name, n_train=args.n, n_val=0, n_test=0, seed=args.seed)
    _save_npy(args.out, ds.train.numpy())
    if args.codes:
        assert ds.z_train is not None
        _save_npy(args.codes, ds.z_train.numpy())
    print(f"wrote {args.n} points of {args.name} to {args.out}")


def _config_from_args(args: argparse.Namespace):
    from .training import TrainConfig

    return TrainConfig(
        data=args.data, method=args.method, samples=args.samples, k=args.k, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, data_seed=args.data_seed,
        noise_var=args.noise_var, latent_dim=args.latent_dim, likelihood=args.likelihood,
        rho=args.rho, hidden=tuple(args.hidden), activation=args.activation, top_k=args.top_k,
        eval_every=args.eval_every,
        n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, cache_dir=args.cache_dir,
        prior_steps=args.prior_steps, posterior=args.posterior, estimator=args.estimator,
        prior_fit=args.prior_fit, device=args.device, network=args.network,
        posterior_engine=args.posterior_engine,
        code_prior=args.code_prior, code_prior_steps=args.code_prior_steps,
        prior_components=args.prior_components, flow_transforms=args.flow_transforms,
        flow_hidden=tuple(args.flow_hidden),
        channels=tuple(args.channels), image_shape=tuple(args.image_shape) if args.image_shape else None,
    )


def cmd_train(args: argparse.Namespace) -> None:
    from .training import train

    result = train(_config_from_args(args), args.out, progress=not args.quiet, resume=args.resume)
    print(json.dumps(result.metrics, indent=2))


def cmd_sample(args: argparse.Namespace) -> None:
    from .training import load_run

    model = load_run(args.run).model.to(resolve_device(args.device))
    torch.manual_seed(args.seed)
    x = model.sample(args.n, mean=args.mean)
    _save_npy(args.out, x.cpu().numpy())
    print(f"wrote {args.n} {'decoder means' if args.mean else 'samples'} to {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .data import load_array
    from .evaluation import log_likelihood
    from .training import load_run

    run = load_run(args.run)
    model = run.model.to(resolve_device(args.device))
    x = torch.from_numpy(load_array(args.data, expected_dim=run.data_dim))
    model.decoder.likelihood.check_data(x, args.data)
    torch.manual_seed(args.seed)
    lp = log_likelihood(model, x, args.grid, args.samples)
    if args.per_point:
        _save_npy(args.per_point, lp.numpy())
    how = "quadrature" if model.latent_dim == 1 else f"importance sampling, S={args.samples}"
    print(f"mean test log-likelihood: {float(lp.mean()):.4f} nats over {x.shape[0]} points ({how})")


def cmd_compare(args: argparse.Namespace) -> None:
    from .experiments import compare

    compare(args.data, args.out, epochs=args.epochs, samples=args.samples, seed=args.seed,
            progress=not args.quiet)


def cmd_reproduce(args: argparse.Namespace) -> None:
    from .reproduce import reproduce

    report = reproduce(args.profile, args.out, n_jobs=args.jobs, backend=args.backend,
                       address=args.address, cache_dir=args.cache_dir, progress=not args.quiet)
    print(f"report: {report} (and {report.with_suffix('.html')}); figures in {report.parent / 'figures'}")


def cmd_surrogates(args: argparse.Namespace) -> None:
    from .groundtruth import (
        GROUND_TRUTHS,
        SURROGATE_MSE_TARGET,
        fit_surrogate,
        load_surrogate,
        save_surrogate,
        surrogate_mse,
    )

    for name in args.names or list(GROUND_TRUTHS):
        if args.refit:
            net, mse = fit_surrogate(name)
            save_surrogate(net, name, mse)
        else:
            mse = surrogate_mse(load_surrogate(name), name)
        verdict = "ok" if mse < SURROGATE_MSE_TARGET else f"ABOVE the {SURROGATE_MSE_TARGET:g} target"
        print(f"{name:15s} surrogate MSE {mse:.2e}  {verdict}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    from .groundtruth import GROUND_TRUTHS
    from .images import IMAGE_DATASETS

    names = ", ".join(GROUND_TRUTHS)
    images = ", ".join(IMAGE_DATASETS)
    p = argparse.ArgumentParser(
        prog="mapa-vae",
        description="Train VAEs with MAPA (model-agnostic posterior approximation), VAE or IWAE.",
    )
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the small MLPs here run fastest on one "
                   "thread and threads contend badly on a busy machine; raise for large models)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="write a sample of a built-in ground-truth data set",
                       description=f"Draw points from a ground-truth data set ({names}).")
    d.add_argument("name", help=f"one of: {names}")
    d.add_argument("--n", type=int, default=1000, help="number of points (default 1000)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True, help="output .npy file")
    d.add_argument("--codes", help="also write the true latent codes to this .npy file")
    d.set_defaults(func=cmd_data)

    t = sub.add_parser("train", help="train a model and write it with config and metrics",
                       description="Train MAPA, VAE or IWAE; writes config.json, model.pt, "
                       "metrics.json (val/test log-likelihood, test KL, time, passes) to --out.")
    t.add_argument("--data", required=True,
                   help=f"built-in data set ({names}; images: {images}) or a .npy/.csv file")
    t.add_argument("--method", choices=["mapa", "vae", "iwae"], default="mapa")
    t.add_argument("--samples", "-S", type=int, default=100, help="S: importance samples / tail draws")
    t.add_argument("--k", type=int, default=None, help="MAPA's top-k (default: 10%% of S)")
    t.add_argument("--epochs", type=int, default=500)
    t.add_argument("--batch-size", type=int, default=100)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0, help="initialization and sampling seed")
    t.add_argument("--data-seed", type=int, default=0, help="which draw of a built-in data set")
    t.add_argument("--noise-var", type=float, default=None,
                   help="Gaussian noise variance σ² (default: the data set's own)")
    t.add_argument("--latent-dim", type=int, default=1)
    t.add_argument("--likelihood", choices=["gaussian", "bernoulli", "continuous-bernoulli"],
                   default="gaussian")
    t.add_argument("--rho", type=float, default=0.9, help="Bernoulli kernel softening in (0.5, 1)")
    t.add_argument("--hidden", type=int, nargs="+", default=[50, 50, 50],
                   help="MLP widths (conv: widths of the fully connected head)")
    t.add_argument("--activation", choices=["tanh", "relu", "leaky_relu", "silu"], default="tanh")
    t.add_argument("--network", choices=["mlp", "conv"], default="mlp",
                   help="conv: a small conv encoder/decoder for images")
    t.add_argument("--channels", type=int, nargs="+", default=[32, 64],
                   help="conv: channels of the stride-2 layers")
    t.add_argument("--image-shape", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                   help="conv on your own file: the image shape of each (flattened) row")
    t.add_argument("--top-k", type=int, default=None,
                   help="neighbours stored per point in the MAPA posterior (default: all up to 2048)")
    t.add_argument("--eval-every", type=int, default=10, help="epochs between validation checks")
    t.add_argument("--n-train", type=int, default=1000, help="built-in data: training points")
    t.add_argument("--n-val", type=int, default=500)
    t.add_argument("--n-test", type=int, default=2000)
    t.add_argument("--posterior-engine", choices=["auto", "exact", "faiss"], default="auto",
                   help="MAPA's top-K neighbours: exact blocked matmul, a faiss index (approximate; "
                   "the uniform tail keeps the bound valid), or auto by N and D")
    t.add_argument("--posterior", choices=["kernel", "ground-truth", "uniform"], default="kernel",
                   help="MAPA's q(i|n): the kernel (MAPA), the ground truth's (MAPA-GT, built-in "
                   "data only) or uniform (MAPA-naive)")
    t.add_argument("--estimator", choices=["naive", "stl", "dreg"], default="naive",
                   help="IWAE's encoder gradient: naive, STL (Roeder et al. 2017) or DReG "
                   "(Tucker et al. 2019); the decoder always gets the IWAE gradient")
    t.add_argument("--prior-fit", choices=["map", "refit"], default="map",
                   help="MAPA's N(0,1) prior: compose with the exact monotone copula map (default) "
                   "or refit new networks as in the paper's App. C.3")
    t.add_argument("--code-prior", choices=["flow", "mixture"], default="flow",
                   help="MAPA with --latent-dim > 1: a neural spline flow (zuko) or a Gaussian "
                   "mixture fitted to the learned codes becomes the prior")
    t.add_argument("--code-prior-steps", type=int, default=2000,
                   help="flow: Adam steps (early stopping on held-out codes); mixture: EM iterations")
    t.add_argument("--prior-components", type=int, default=10, help="mixture prior components")
    t.add_argument("--flow-transforms", type=int, default=3, help="flow prior: spline layers")
    t.add_argument("--flow-hidden", type=int, nargs="+", default=[64, 64],
                   help="flow prior: hypernetwork widths")
    t.add_argument("--prior-steps", type=int, default=4000,
                   help="with --prior-fit refit: full-batch steps per new network (default 4000)")
    t.add_argument("--cache-dir", default=None, help="posterior cache (default ~/.cache/mapa-vae)")
    t.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where to train (auto: cuda if available); under torchrun each process "
                   "uses its local GPU and gradients are summed across processes")
    t.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--out", required=True, help="run directory")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw new data from a trained model's prior",
                       description="z ~ p(z), x ~ p(x | f(z)); --mean writes f(z) without noise.")
    s.add_argument("run", help="run directory written by `mapa-vae train`")
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--mean", action="store_true", help="write decoder means, no observation noise")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", choices=DEVICES, default="cpu")
    s.add_argument("--out", required=True, help="output .npy file")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="mean log-likelihood of a data file under a trained model",
                       description="log p(x) by quadrature (1-D latent) or importance sampling.")
    e.add_argument("run", help="run directory written by `mapa-vae train`")
    e.add_argument("--data", required=True, help=".npy or .csv file of points")
    e.add_argument("--per-point", metavar="FILE.npy", help="also write each point's log p(x)")
    e.add_argument("--grid", type=int, default=2**16, help="quadrature points (1-D latent)")
    e.add_argument("--samples", type=int, default=1000, help="importance samples (latent > 1)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", choices=DEVICES, default="cpu")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("reproduce", help="run the paper's protocol and write figures and a report",
                       description="Every (data set, draw, method, S, restart) is a job; finished "
                       "jobs are kept in --out, so an interrupted sweep resumes. Writes report.md, "
                       "report.html and figures/.")
    r.add_argument("--profile", choices=["tiny", "quick", "paper"], default="quick",
                   help="quick: minutes on 2 CPU cores; paper: R = D = 10, 500 epochs; tiny: a smoke test")
    r.add_argument("--out", default="runs/reproduce", help="output directory (also the job store)")
    r.add_argument("--jobs", type=int, default=1, help="parallel jobs (-1: all cores)")
    r.add_argument("--backend", choices=["loky", "ray", "dask"], default="loky",
                   help="joblib backend: local processes, or a Ray / Dask cluster")
    r.add_argument("--address", default=None, help="Ray or Dask scheduler address (default: local)")
    r.add_argument("--cache-dir", default=None, help="posterior cache (default ~/.cache/mapa-vae)")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_reproduce)

    g = sub.add_parser("surrogates", help="check (or refit) the ground-truth surrogate MLPs",
                       description="Print each surrogate's MSE against its analytic curve on "
                       "fresh z ~ N(0, 1); --refit fits and stores them again.")
    g.add_argument("names", nargs="*", help=f"data sets (default: all of {names})")
    g.add_argument("--refit", action="store_true")
    g.set_defaults(func=cmd_surrogates)

    c = sub.add_parser("compare", help="the main job: MAPA vs VAE vs IWAE on one data set",
                       description="Train MAPA, VAE and IWAE on a built-in data set, print a "
                       "table (test KL, time, passes) and plot data vs samples.")
    c.add_argument("--data", default="figure-8", help=f"one of: {names}")
    c.add_argument("--epochs", type=int, default=500)
    c.add_argument("--samples", "-S", type=int, default=100)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true")
    c.add_argument("--out", default="runs/compare", help="output directory")
    c.set_defaults(func=cmd_compare)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except MapaError as e:
        print(f"mapa-vae: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the system's side (disk full, I/O error): one line too, exit status 1
        print(f"mapa-vae: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mapa-vae: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
