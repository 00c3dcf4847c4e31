"""The ``mapa-vae`` command line: data, train, sample, evaluate, compare.

Every user error (bad file, bad value, unknown name) is printed as one line,
``mapa-vae: error: …``, and the command exits with status 2; a system error (disk full, I/O
error) is one such line too, with status 1; a ``train`` that produced no usable model (every step
non-finite, say) writes its run, says why in one line and exits with status 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from .config import DEVICES, TrainConfig, field_type, flag_name
from .data.dataset import Dataset
from .data.export import SPLITS, check_npy_outputs, data_points
from .data.files import load_array
from .data.groundtruth import (
    GROUND_TRUTHS,
    SURROGATE_MSE_TARGET,
    fit_surrogate,
    load_surrogate,
    save_surrogate,
    surrogate_mse,
)
from .data.images import IMAGE_DATASETS
from .data.loading import data_shape, load_dataset
from .data.memory import check_memory, check_train_memory, points_bytes
from .data.mnist import load_binarized_mnist
from .errors import MapaError, NoUsableModel
from .experiments.compare import METHOD_ORDER, compare
from .experiments.reproduce import reproduce
from .experiments.sweep import BACKENDS, PROFILES
from .registry import METHODS, choices
from .seeds import check_seed, torch_seed
from .storage import atomic_write, strict_json
from .training.curves import check_tensorboard
from .training.distributed import resolve_device
from .training.loop import train
from .training.runs import load_run

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default, unless its help already does or it has none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.required or action.nargs == 0
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer ``>= low``, else a one-line error naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def jobs_count(text: str) -> int:
    """``--jobs``: a positive number of processes, or joblib's -1 (all cores), -2 (all but one), …"""
    value = int_at_least(-(2**31))(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be a positive number of jobs, or -1 for all cores")
    return value


def _check_out_dir(path: str, flag: str = "--out") -> None:
    """Refuse, before any work, an output directory that is an existing file (or lies under one)."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            if not p.is_dir():
                what = "is an existing file" if p == Path(path) else f"lies under the file {p}"
                raise MapaError(f"{flag} {path}: {what}; give a directory")
            return


def _save_npy(path: str, array: np.ndarray) -> None:
    if not path.lower().endswith(".npy"):
        raise MapaError(f"{path}: output file must end in .npy")
    with atomic_write(path) as f:
        np.save(f, array, allow_pickle=False)


def cmd_data(args: argparse.Namespace) -> None:
    check_seed(args.seed)
    check_npy_outputs(("--out", args.out), ("--codes", args.codes))
    x, z, what = data_points(args.name, args.split, args.n, args.seed)
    if args.codes and z is None:
        raise MapaError(f"--codes {args.codes}: {args.name} has no codes to write")
    _save_npy(args.out, x.numpy())
    if args.codes:
        assert z is not None
        _save_npy(args.codes, z.numpy())
    print(f"wrote {what} to {args.out}" + (f", codes to {args.codes}" if args.codes else ""))


def add_config_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per :class:`~mapa_vae.config.TrainConfig` field, generated from the field: its
    type, default, help and, for a choice, the current names of its registry."""

    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if f.name in exclude or not meta.get("cli", True):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        names = [flag_name(f.name)] + ([meta["short"]] if meta.get("short") else [])
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        help_text = meta["help"].replace("%", "%%")
        base, _ = field_type(f)
        if getattr(base, "__origin__", None) is tuple:
            kwargs.update(type=int, nargs=3 if f.name == "image_shape" else "+")
            shown = " ".join(map(str, default)) if default is not None else "none"
        elif base is bool:  # --flag / --no-flag
            kwargs["action"] = argparse.BooleanOptionalAction
            shown = "on" if default else "off"
        else:
            kwargs["type"] = base
            shown = "none" if default is None else f"{default:g}" if isinstance(default, float) else default
        if meta.get("choices") is not None:
            kwargs["choices"] = choices(meta["choices"])
            kwargs["metavar"] = "{" + ",".join(kwargs["choices"]) + "}"
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        kwargs["help"] = f"{help_text} (default: {shown})"
        parser.add_argument(*names, **kwargs)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The config flags given on the command line (the others keep their defaults)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(args: argparse.Namespace, **fixed: Any) -> TrainConfig:
    """The :class:`TrainConfig` of the flags given (defaults for the rest), checked as a whole."""
    return TrainConfig(**{**_given(args), **fixed})


def cmd_train(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    cfg, note = METHODS[cfg.method].resolve(cfg, set(_given(args)))  # a method's defaults for its data
    if note:
        print(note, file=sys.stderr)
    _check_out_dir(args.out)
    _check_run_flags(args, cfg)
    result = train(cfg, args.out, progress=not args.quiet, resume=args.resume,
                   overwrite=args.overwrite)
    print(json.dumps(strict_json(result.metrics), indent=2))


def _check_run_flags(args: argparse.Namespace, cfg: TrainConfig) -> None:
    """A TensorBoard folder that cannot be used and sizes that cannot fit, refused before any
    work (``train`` itself refuses ``--resume`` with ``--overwrite``)."""
    if cfg.tensorboard is not None:
        check_tensorboard(cfg.tensorboard)
    shape = data_shape(cfg.data, cfg.n_train)
    if shape is not None:
        check_train_memory(cfg, *shape)


def cmd_sample(args: argparse.Namespace) -> None:
    check_seed(args.seed)
    check_npy_outputs(("--out", args.out))
    run = load_run(args.run)
    cfg = run.config
    width = cfg.latent_dim + 2 * run.data_dim + 2 * max(cfg.hidden)
    width += run.data_dim * max(cfg.channels) // 2 if cfg.network == "conv" else 0
    check_memory(points_bytes(args.n, width, copies=2), f"--n {args.n}")
    model = run.model.to(resolve_device(args.device))
    torch.manual_seed(torch_seed(args.seed))
    x = model.sample(args.n, mean=args.mean)
    _save_npy(args.out, x.cpu().numpy())
    print(f"wrote {args.n} {'decoder means' if args.mean else 'samples'} to {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    check_seed(args.seed)
    check_npy_outputs(("--per-point", args.per_point))
    run = load_run(args.run)
    model = run.model.to(resolve_device(args.device))
    own = _run_data(run.config, run.data_dim, run.data_sizes)
    x, what = _evaluation_points(args.data, run.data_dim, run.config)
    model.decoder.likelihood.check_data(x, args.data)
    train = None if own is None else own.train
    if train is not None and (seen := _training_rows(x, train)):
        print(f"mapa-vae: warning: {seen} of the {x.shape[0]} rows of {args.data} are training rows "
              "of this run: their score is not a held-out one", file=sys.stderr)
    torch.manual_seed(torch_seed(args.seed))
    est = METHODS[run.config.method].evaluate(model, x, args.grid, args.samples, train=train,
                                              progress=False if args.quiet else None)
    if args.per_point:
        _save_npy(args.per_point, est.values.numpy())
    print(f"mean test log-likelihood: {est.mean:.4f} nats over {x.shape[0]} points ({what})")
    over = f"±{est.stderr_of_mean:.4f} over points, " if x.shape[0] > 1 else ""
    print(f"  standard error: {over}±{est.mc_stderr_of_mean:.4f} Monte Carlo")
    print(f"  estimator: {est.how}")
    if est.empirical is not None and train is not None:
        print(f"  exact empiricalized log-likelihood (the trained encoder and decoder over the run's "
              f"{train.shape[0]} training atoms, paper Eq. 6): {float(est.empirical.mean()):.4f} nats")


def _run_data(cfg: TrainConfig, dim: int, sizes: dict[str, int] | None = None) -> Dataset | None:
    """The run's data set as training drew it (with the split ``sizes`` it recorded, else its size
    knobs); None, with a note, where it cannot be loaded."""
    n: dict[str, int | None] = {"n_train": cfg.n_train, "n_val": cfg.n_val, "n_test": cfg.n_test}
    n.update(sizes or {})
    try:
        data = load_dataset(cfg.data, n["n_train"], n["n_val"], n["n_test"], cfg.data_seed)
    except MapaError as e:
        print(f"mapa-vae: note: the run's training data cannot be loaded again ({e}); no overlap "
              "check and no training atoms", file=sys.stderr)
        return None
    return data if data.dim == dim else None


def _training_rows(x: torch.Tensor, train: torch.Tensor) -> int:
    """How many rows of ``x`` are (bit for bit, in float64) rows of ``train``."""
    seen = {row.tobytes() for row in train.double().numpy()}
    return sum(row.tobytes() in seen for row in x.double().numpy())


def _evaluation_points(source: str, dim: int, cfg: TrainConfig) -> tuple[torch.Tensor, str]:
    """The points ``evaluate`` scores and what they are: a ``.npy`` / ``.csv`` file (one row or
    more), the test split of a binarized-MNIST ``.npz`` (:mod:`~mapa_vae.data.mnist`), or the
    test split of a built-in data set, drawn with the run's sizes and data seed."""
    if source in GROUND_TRUTHS or source in IMAGE_DATASETS:
        x = load_dataset(source, cfg.n_train, cfg.n_val, cfg.n_test, cfg.data_seed).test
        what = f"the test split of the built-in {source}, data seed {cfg.data_seed}"
    elif Path(source).suffix.lower() == ".npz":
        x, what = load_binarized_mnist(source).test, f"the test split of {source}"
    else:
        return torch.from_numpy(load_array(source, expected_dim=dim, min_rows=1)), f"the rows of {source}"
    if x.shape[1] != dim:
        raise MapaError(f"{source}: its test split has {x.shape[1]} columns but the model was "
                        f"trained on {dim}")
    return x, what


def cmd_compare(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    _check_out_dir(args.out)
    _check_run_flags(args, cfg)
    compare(cfg, args.out, args.methods, progress=not args.quiet, resume=args.resume,
            overwrite=args.overwrite, jobs=args.jobs)


def cmd_reproduce(args: argparse.Namespace) -> None:
    report = reproduce(args.profile, args.out, n_jobs=args.jobs, backend=args.backend,
                       address=args.address, cache_dir=args.cache_dir, progress=not args.quiet)
    print(f"report: {report} (and {report.with_suffix('.html')}); figures in {report.parent / 'figures'}")


def cmd_surrogates(args: argparse.Namespace) -> None:
    for name in args.names or list(GROUND_TRUTHS):
        if args.refit:
            net, mse = fit_surrogate(name)
            save_surrogate(net, name, mse)
        else:
            mse = surrogate_mse(load_surrogate(name), name)
        verdict = "ok" if mse < SURROGATE_MSE_TARGET else f"ABOVE the {SURROGATE_MSE_TARGET:g} target"
        print(f"{name:15s} surrogate MSE {mse:.2e}  {verdict}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join(GROUND_TRUTHS)
    images = ", ".join(IMAGE_DATASETS)
    p = _Parser(
        prog="mapa-vae", formatter_class=_Help,
        description="Train deep latent-variable models with MAPA (model-agnostic posterior "
        f"approximation) or a baseline: {', '.join(METHODS)}. Start with `mapa-vae compare` (the "
        "methods side by side on a built-in curve) or `mapa-vae train --data FILE`.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    add = lambda name, **kw: sub.add_parser(name, formatter_class=_Help, **kw)  # noqa: E731

    d = add("data", help="write points of a built-in data set to a .npy file",
                       description=f"--split fresh (default): new points of a ground-truth curve "
                       f"({names}) that no run trains, validates or tests on: score a model on "
                       "them with `evaluate`. --split train|val|test: that split of a built-in "
                       f"data set (also images: {images}) or a binarized-MNIST .npz, as `train "
                       "--data NAME --data-seed SEED` uses it (at its default sizes).")
    d.add_argument("name", help=f"a curve ({names}), an image set or a binarized-MNIST .npz")
    d.add_argument("--split", choices=SPLITS, default="fresh",
                   help="fresh points, or a split of what `train --data NAME` uses")
    d.add_argument("--n", type=int_at_least(1), default=None,
                   help="number of points (default: 1000 fresh, or the whole split)")
    d.add_argument("--seed", type=int, default=0,
                   help="which draw (--split fresh) or which --data-seed (a split)")
    d.add_argument("--out", required=True, help="output .npy file")
    d.add_argument("--codes", help="also write the true latent codes to this .npy file")
    d.set_defaults(func=cmd_data)

    t = add("train", help="train a model and write it with config and metrics",
                       description="Train a model by one of the registered methods; writes "
                       "config.json, model.pt, metrics.json (val/test log-likelihood, test KL, "
                       f"time, passes) to --out. Built-in data: {names}; images: {images}. Every "
                       "flag below is a field of TrainConfig.")
    add_config_arguments(t)
    t.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a finished or interrupted run in --out (refused without it)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--out", required=True, help="run directory")
    t.set_defaults(func=cmd_train)

    s = add("sample", help="draw new data from a trained model's prior",
                       description="z ~ p(z), x ~ p(x | f(z)); --mean writes f(z) without noise.")
    s.add_argument("run", help="run directory written by `mapa-vae train`")
    s.add_argument("--n", type=int_at_least(1), default=1000, help="number of points")
    s.add_argument("--mean", action="store_true", help="write decoder means, no observation noise")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--device", choices=DEVICES, default="cpu", help="where to sample")
    s.add_argument("--out", required=True, help="output .npy file")
    s.set_defaults(func=cmd_sample)

    e = add("evaluate", help="mean log-likelihood of a data file under a trained model",
                       description="log p(x) by quadrature (1-D latent) or importance sampling with a "
                       "proposal adapted to the model, with its standard errors; MAPA's exact "
                       "empiricalized log-likelihood beside it.")
    e.add_argument("run", help="run directory written by `mapa-vae train`")
    e.add_argument("--data", required=True, help=".npy or .csv file of points (one row or more), "
                   "a binarized-MNIST .npz (its test split), or a built-in data set name (its test "
                   "split, drawn with the run's sizes and data seed)")
    e.add_argument("--per-point", metavar="FILE.npy", help="also write each point's log p(x)")
    e.add_argument("--grid", type=int_at_least(2), default=2**16, help="quadrature points (1-D latent)")
    e.add_argument("--samples", type=int_at_least(1), default=1000,
                   help="importance samples per point at most (latent > 1): the referee takes as "
                   "many as its pilot says give a 0.2-nat standard error per point")
    e.add_argument("--seed", type=int, default=0, help="importance sampling seed")
    e.add_argument("--device", choices=DEVICES, default="cpu", help="where to evaluate")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)

    r = add("reproduce", help="run the paper's protocol and write figures and a report",
                       description="Every (data set, draw, method, S) is a job training its R "
                       "restarts together; finished "
                       "jobs are kept in --out, so an interrupted sweep resumes. Writes report.md, "
                       "report.html and figures/.")
    r.add_argument("--profile", choices=list(PROFILES), default="quick",
                   help="quick: minutes on 2 CPU cores; medium: R = 5, D = 3, 500 epochs, about 2 "
                   "hours on 2 cores; paper: R = D = 10, 500 epochs; tiny: a smoke test")
    r.add_argument("--out", default="runs/reproduce", help="output directory (also the job store)")
    r.add_argument("--jobs", type=jobs_count, default=-1, help="parallel jobs (-1: all cores)")
    r.add_argument("--backend", choices=BACKENDS, default="loky",
                   help="joblib backend: local processes, or a Ray / Dask cluster")
    r.add_argument("--address", default=None, help="Ray or Dask scheduler address (default: local)")
    r.add_argument("--cache-dir", default=None,
                   help="posterior cache (default: $MAPA_VAE_CACHE or ~/.cache/mapa-vae)")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_reproduce)

    g = add("surrogates", help="check (or refit) the ground-truth surrogate MLPs",
                       description="Print each surrogate's MSE against its analytic curve on "
                       "fresh z ~ N(0, 1); --refit fits and stores them again.")
    g.add_argument("names", nargs="*", help=f"data sets (default: all of {names})")
    g.add_argument("--refit", action="store_true", help="fit them again (minutes) and store them")
    g.set_defaults(func=cmd_surrogates)

    c = add("compare", help="the main job: methods side by side on one data set",
                       description="Train several methods with the same settings (every train "
                       "flag but --method applies to all), print a table (test KL, time, passes) "
                       "and plot data vs samples.")
    c.add_argument("--methods", nargs="+", choices=METHODS.names(), default=list(METHOD_ORDER),
                   metavar="METHOD", help=f"registered methods to compare, of: {', '.join(METHODS)} "
                   f"(default: {' '.join(METHOD_ORDER)})")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--out", default="runs/compare", help="output directory")
    c.add_argument("--resume", action="store_true",
                   help="reuse the finished runs in --out, continue interrupted ones")
    c.add_argument("--overwrite", action="store_true",
                   help="replace the results in --out (refused without it)")
    c.add_argument("--jobs", type=jobs_count, default=-1,
                   help="methods trained side by side, one process each (-1: as many as cores)")
    add_config_arguments(c, exclude=("method",))
    c.set_defaults(func=cmd_compare)
    for command in sub.choices.values():
        _add_threads(command)
    return p


def _resume_hint(e: KeyboardInterrupt) -> str:
    """How to go on after an interrupted ``train``: the checkpoint's epoch and ``--resume``."""
    run = getattr(e, "run_dir", None)
    if run is None:
        return ""
    epoch = getattr(e, "saved_epoch", None)
    if epoch is None:
        return f"; no checkpoint was written to {run} yet"
    return (f"; the checkpoint of epoch {epoch} is in {run}/checkpoint.pt: run the same command "
            "with --resume to continue from it")


_THREADS = next(f for f in dataclasses.fields(TrainConfig) if f.name == "threads")
_THREADS_DEFAULT: int = _THREADS.default  # type: ignore[assignment]


def _add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads``, on every command with one meaning and one floor: the config's knob (train
    and compare have it among their config flags)."""
    if any("--threads" in a.option_strings for a in parser._actions):
        return
    low = int(_THREADS.metadata["low"])
    parser.add_argument("--threads", type=int_at_least(low), default=_THREADS_DEFAULT,
                        help=f"{_THREADS.metadata['help']} (default: {_THREADS_DEFAULT})")


def _threads_after_command(argv: Sequence[str] | None) -> list[str]:
    """``mapa-vae --threads N COMMAND …`` (the flag's place before it was a config knob) read
    as ``mapa-vae COMMAND --threads N …``, so older command lines keep working."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--threads"] and len(args) >= 3:
        return [args[2], "--threads", args[1], *args[3:]]
    if args[:1] and args[0].startswith("--threads=") and len(args) >= 2:
        return [args[1], args[0], *args[2:]]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(_threads_after_command(argv))
    except KeyboardInterrupt:
        print("mapa-vae: interrupted", file=sys.stderr)
        return 130
    threads = getattr(args, "threads", _THREADS_DEFAULT)  # train/compare: the config applies it
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        args.func(args)
    except NoUsableModel as e:  # the run is written, but nothing usable came out of it
        print(f"mapa-vae: error: {e}", file=sys.stderr)
        return NoUsableModel.exit_code
    except MapaError as e:  # an incomplete sweep has its own status (3)
        print(f"mapa-vae: error: {e}", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))
    except OSError as e:  # the system's side (disk full, I/O error): one line too, exit status 1
        print(f"mapa-vae: error: {_system_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"mapa-vae: interrupted{_resume_hint(e)}", file=sys.stderr)
        return 130
    return 0


_ADVICE = {
    errno.ENOSPC: "the disk is full; free space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "permission denied; write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free space or write elsewhere",
}


def _system_error(e: OSError) -> str:
    """One line naming the file (where the system said which) and what to do."""
    what = _ADVICE.get(e.errno or -1) or e.strerror or type(e).__name__
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{what} ([Errno {e.errno}] {e.strerror})" if e.errno else f"{where}{what}"


if __name__ == "__main__":
    sys.exit(main())
