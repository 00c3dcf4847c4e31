"""One readable training loop, with best-on-validation selection and resumable checkpoints.

``train(config, out_dir)`` reads top to bottom: load the data; build ``R = cfg.restarts``
copies of the method's model (one by default in tests, three by default on the command line),
their objectives and optimizers, as an engine (:mod:`~mapa_vae.training.engines`: one batched
model or the copies in turn; copy ``r`` seeded from ``(seed, r)``, :mod:`mapa_vae.seeds`); for
each epoch, for each batch, evaluate every copy's bound and step its optimizer on its negative
mean; every ``eval_every`` epochs score each copy on the validation set under ``no_grad``, keep
each copy's best weights and write a :class:`~mapa_vae.training.checkpoint.Checkpoint`; then
keep the copy with the best validation score, finalize it (MAPA: the copula prior), evaluate it
on the test set (test KL when the ground truth is known), judge whether a usable model came
out, and write the run directory:

- ``config.json``: the full :class:`TrainConfig`, the data dimension and the split sizes used;
- ``model.pt``: the final generative model's weights (safe to load: tensors only);
- ``trained.pt``: the weights as trained, before :meth:`~mapa_vae.methods.Method.finalize`;
- ``checkpoint.pt``: every copy's weights, optimizer, RNG state and progress, and the run's
  cumulative cost, for ``--resume``;
- ``metrics.json``: the chosen copy's scores, and every copy's in the ``…_per_copy`` lists;
- ``history.json``: one record per epoch, ``{"epoch", "train_bound", "val_log_lik"
  (validation epochs), "train_bound_per_copy", "val_log_lik_per_copy"}``, the unsuffixed
  values the chosen copy's (strict JSON: a non-finite number is ``null``);
- ``curves.png``: those curves (:func:`~mapa_vae.training.curves.write_curves`); with
  ``cfg.tensorboard`` each record is logged to TensorBoard as it is made.

A step whose loss, decoder output or gradient is not finite is skipped (the weights and the
optimizer state do not change) and counted; a checkpoint never holds a non-finite tensor. A run
with no usable model (see :func:`diagnose`) is still written, then :class:`NoUsableModel` is
raised (the CLI exits 3). The run directory is locked while a run writes it, and a finished or
interrupted run is replaced only with ``overwrite=True``. ``config.json`` is written last, with
the results: an interrupted run leaves the previous complete run readable.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data.dataset import Dataset
from ..data.images import IMAGE_DATASETS
from ..data.loading import load_dataset
from ..data.memory import check_train_memory
from ..errors import MapaError, NoUsableModel
from ..evaluation.likelihood import test_kl
from ..methods.base import Method
from ..models.latent import LatentVariableModel
from ..models.likelihoods import Likelihood, make_likelihood
from ..registry import METHODS
from ..seeds import copy_seeds
from ..storage import save_tensors, write_json
from .checkpoint import RESUMABLE, Checkpoint, CopyProgress, chosen_copy, config_json, resume_copies
from .curves import TensorBoardLog, write_curves
from .distributed import init_parallel, resolve_device
from .engines import make_engine
from .runs import SavedEpoch, run_directory

__all__ = ["MAX_SKIPPED_FRACTION", "TrainResult", "diagnose", "evaluate_final",
           "train"]

MAX_SKIPPED_FRACTION = 0.9  # more of the steps skipped as non-finite: no usable model
FLOOR_FACTOR = 10.0  # a model below null - 10·max(1, |null|) nats is no usable model
COLLAPSE_FACTOR = 10.0  # a last validation below best - 10·max(1, |best|) is a collapse


@dataclass
class TrainResult:
    config: TrainConfig
    model: LatentVariableModel  # final generative model
    trained: LatentVariableModel  # as trained
    data: Dataset
    metrics: dict[str, Any]
    history: list[dict[str, float]]


def train(cfg: TrainConfig, out_dir: str | Path | None = None, progress: bool = True,
          resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.data``; write the run to ``out_dir`` if given.

    ``resume`` continues ``out_dir/checkpoint.pt``; ``overwrite`` replaces a run already there
    (without either, a folder holding a run is refused). Raises :class:`NoUsableModel`, after
    writing the run, when no usable model came out.
    """
    if resume and overwrite:
        raise MapaError("--resume and --overwrite contradict each other: --resume continues the "
                        "run in --out, --overwrite replaces it; give one")
    method: Method = METHODS[cfg.method]
    method.check(cfg)
    say = _announcer(progress, f"{cfg.method} {cfg.data}")
    # --- data
    data = load_dataset(cfg.data, cfg.n_train, cfg.n_val, cfg.n_test, cfg.data_seed)
    lik_config = _likelihood_config(cfg, data)
    likelihood = make_likelihood(lik_config)
    _check_data(likelihood, data, cfg.data)
    check_train_memory(cfg, data.train.shape[0], data.dim)  # refuse what cannot fit, before any work
    par = init_parallel(cfg.device)
    device = resolve_device(cfg.device, par.local_rank)
    out = Path(out_dir) if out_dir is not None and par.main else None  # only rank 0 writes
    saved = SavedEpoch(out)  # what an interrupt tells the user to --resume from
    with _threads(cfg.threads), run_directory(out, resume, overwrite), saved:
        dtype = getattr(torch, cfg.dtype)
        train_x, val_x = data.train.to(device, dtype), data.val.to(device, dtype)
        # --- the copies (one unless --restarts), each seeded from (seed, r), and their optimizers
        engine, sequential_because = make_engine(method, cfg, data, likelihood, train_x, par)
        if cfg.restarts > 1 and sequential_because and par.main:  # slower: say so, in one line
            print(f"mapa-vae: note: the {cfg.restarts} restarts train one after another: "
                  f"{sequential_because}", file=sys.stderr)
        copies = [CopyProgress(copy_seeds(cfg.seed, r).torch,
                               best_model=copy.deepcopy(engine.member(r).state_dict()))
                  for r in range(cfg.restarts)]  # as each run starts: its initial weights
        state = Checkpoint(engine.module.state_dict(), {}, {}, torch.get_rng_state(),
                           config_json(cfg, RESUMABLE))
        if resume:
            state = resume_copies(out, cfg, engine, copies)
        board = TensorBoardLog(cfg.tensorboard) if cfg.tensorboard and par.main else None
        clock = time.perf_counter() - state.train_seconds  # cumulative over the run's parts
        saved.epoch = state.epoch if resume else None
        bar = tqdm(range(state.epoch, cfg.epochs), desc=f"{cfg.method} {cfg.data} ×{cfg.restarts}",
                   disable=not (progress and par.main), initial=state.epoch, total=cfg.epochs,
                   leave=False)
        try:
            for epoch in bar:
                # --- one epoch of steps: every copy its own batches, from its own stream
                engine.train()
                batches = [engine.batches(r, train_x) for r in range(cfg.restarts)]
                bound_sum = torch.zeros(cfg.restarts, dtype=torch.float64)
                for index in itertools.zip_longest(*batches):
                    ok, sums = engine.step(index, train_x)
                    bound_sum += sums
                    for c, taken, drawn in zip(copies, ok.tolist(), index, strict=True):
                        if drawn is not None:
                            c.steps += 1
                            c.skipped += not taken  # a skipped step leaves its weights as they were
                n = train_x.shape[0]
                record: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "train_bound_per_copy": [par.sum_scalar(float(s)) / n for s in bound_sum]}
                validate = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
                # --- validate every copy under no_grad, keep each one's best, checkpoint
                finite = True
                if validate:
                    vals = []
                    for r, c in enumerate(copies):
                        member = engine.member(r).eval()
                        with engine.streams.use(r), torch.no_grad():  # it may draw (IWAE, L > 1)
                            c.last_val = method.validation_log_likelihood(member, val_x, train_x, cfg)
                        vals.append(c.last_val)
                        weights_finite = _finite(member.state_dict())
                        finite &= weights_finite
                        if c.last_val > c.best_val and weights_finite:
                            c.best_val, c.best_epoch = c.last_val, epoch + 1
                            c.best_model = copy.deepcopy(member.state_dict())
                    record["val_log_lik_per_copy"] = vals
                    bar.set_postfix(best_val=f"{max(c.best_val for c in copies):.3f}")
                _choose(record, chosen_copy(copies))  # so far; the final choice rewrites it
                state.history.append(record)
                state.epoch = epoch + 1
                if board is not None:
                    board.log_epoch(record)
                if validate and out is not None and finite:
                    writing = time.perf_counter()
                    state.train_seconds = writing - clock
                    state.fill(engine, copies)
                    state.save(out / "checkpoint.pt")
                    clock += time.perf_counter() - writing  # writing files is not training
                    saved.epoch = state.epoch
        finally:
            engine.close()
            bar.close()
            if board is not None:
                board.close()
        state.train_seconds = time.perf_counter() - clock
        chosen = chosen_copy(copies)
        state.fill(engine, copies)
        for record in state.history:
            _choose(record, chosen)
        model, passes = engine.member(chosen), engine.passes(chosen)
        if not par.main:  # the other replicas are done: rank 0 finalizes, evaluates and writes
            par.close()
            return TrainResult(cfg, model, model, data, {}, state.history)
        par.close()

        # --- finalize and evaluate the best weights, judge them, write the run
        model.load_state_dict(state.best_model)
        model = model.cpu().eval()  # finalizing and evaluating are cheap, and exact, on the CPU
        metrics: dict[str, Any] = {
            "method": cfg.method,
            "data": cfg.data,
            **method.metrics(cfg),
            "n_train": data.train.shape[0], "n_val": data.val.shape[0], "n_test": data.test.shape[0],
            "epochs": cfg.epochs,
            "best_epoch": state.best_epoch,
            "best_val_selection_score": state.best_val,
            "last_val_selection_score": state.last_val,
            "steps": state.steps,
            "skipped_steps": state.skipped,
            "train_seconds": state.train_seconds,
            "seconds_per_epoch": state.train_seconds / max(1, state.epoch),
            "passes_per_point_per_step": passes.per_point(),
            # every copy's, the chosen one's above
            "restarts": cfg.restarts,
            "restart": chosen,
            "restart_engine": engine.name,
            "restart_sequential_because": sequential_because,
            "seed_per_copy": [c.seed for c in copies],
            "best_epoch_per_copy": [c.best_epoch for c in copies],
            "best_val_selection_score_per_copy": [c.best_val for c in copies],
            "last_val_selection_score_per_copy": [c.last_val for c in copies],
            "steps_per_copy": [c.steps for c in copies],
            "skipped_steps_per_copy": [c.skipped for c in copies],
        }
        null = _null_decoder_log_lik(likelihood, data.val)
        problem = diagnose(state, null)
        final, trained = model, model
        if problem is None:  # finalizing and evaluating a model that is not there is wasted time
            if type(method).finalize is not Method.finalize:  # MAPA: fit the prior to the codes
                say("finalizing the model (fitting its prior)")
            t1 = time.perf_counter()
            final, info = method.finalize(model, train_x.cpu(), cfg)
            metrics.update(prior_seconds=time.perf_counter() - t1, **info)
            say(f"evaluating on {data.val.shape[0]} validation and {data.test.shape[0]} test points")
            metrics.update(evaluate_final(method, final, data, cfg.test_grid, progress and par.main))
            problem = diagnose(state, null, final_val=metrics["val_log_lik"])
        metrics["usable"] = problem is None
        metrics["problem"] = problem
        metrics["warnings"] = _warnings(state)
        for warning in metrics["warnings"]:
            print(f"mapa-vae: warning: {warning}", file=sys.stderr, flush=True)
        if out is not None:  # config.json last: until then an earlier complete run stays readable
            tag = config_json(cfg)
            if problem is None:
                save_tensors(out / "model.pt", {"model": final.state_dict(), "config": tag})
                save_tensors(out / "trained.pt", {"model": trained.state_dict(), "config": tag})
            write_json(out / "metrics.json", metrics)
            write_json(out / "history.json", state.history)
            write_curves(state.history, out / "curves.png")
            write_json(out / "config.json", {
                **dataclasses.asdict(cfg), "data_dim": data.dim, "likelihood_config": lik_config,
                "data_sizes": {k: metrics[k] for k in ("n_train", "n_val", "n_test")}})
        result = TrainResult(cfg, final, trained, data, metrics, state.history)
        if problem is not None:
            where = ""
            if out is not None and saved.epoch is not None:
                where = (f"; {out / 'checkpoint.pt'} (epoch {saved.epoch}, best epoch "
                         f"{state.best_epoch}) is kept")
            raise NoUsableModel(f"{cfg.method} on {cfg.data}: no usable model: {problem}{where}",
                                result)
        return result


def diagnose(state: Checkpoint, null_log_lik: float, final_val: float | None = None) -> str | None:
    """Why no usable model came out of a run, with the numbers; ``None`` when one did.

    - at least :data:`MAX_SKIPPED_FRACTION` of the steps were skipped as non-finite;
    - no validation score was finite (``best_epoch`` is -1);
    - the best validation score, or the final model's (``final_val``), is not finite or lies more
      than ``FLOOR_FACTOR · max(1, |null|)`` nats below ``null_log_lik``, the score of a decoder
      whose output is all zeros (no model that learned anything does worse).
    """
    if state.steps and state.skipped >= MAX_SKIPPED_FRACTION * state.steps:
        return (f"{state.skipped} of {state.steps} steps were skipped as non-finite "
                "(a loss, decoder output or gradient was NaN or infinite)")
    if state.best_epoch < 0:
        return f"no finite validation score in {len(state.history)} epochs"
    floor = null_log_lik - FLOOR_FACTOR * max(1.0, abs(null_log_lik))
    for what, value in (("best validation", state.best_val), ("final validation", final_val)):
        if value is None:
            continue
        if not math.isfinite(value):
            return f"the {what} log-likelihood is {value}"
        if value < floor:
            return (f"the {what} log-likelihood {value:.4g} nats is far below {null_log_lik:.4g}, "
                    f"the score of a decoder that outputs zeros (floor {floor:.4g})")
    return None


def _warnings(state: Checkpoint) -> list[str]:
    """Problems of a run that still gave a usable model: a validation collapse after the best."""
    best, last = state.best_val, state.last_val
    if last is None or not math.isfinite(best):
        return []
    if not math.isfinite(last) or last < best - COLLAPSE_FACTOR * max(1.0, abs(best)):
        return [f"validation collapsed to {last:.4g} after its best {best:.4g} at epoch "
                f"{state.best_epoch}; the best epoch's weights are the model"]
    return []


def evaluate_final(method: Method, model: LatentVariableModel, data: Dataset, grid: int,
                   progress: bool | None = None) -> dict[str, Any]:
    """Validation / test log-likelihood of the final model, and the test KL when known.
    ``progress``: the referee's progress bar (None: on a terminal only)."""
    t = time.perf_counter()
    # one call for both splits: one pilot and one atom table (methods/base.py)
    both = method.evaluate(model, torch.cat([data.test, data.val]), grid, train=data.train,
                           progress=progress)
    test, val = both.split(data.test.shape[0], data.val.shape[0])
    out: dict[str, Any] = {"val_log_lik": val.mean, **test.metrics("test")}
    if data.truth is not None:
        kl = test_kl(data.truth.model, model, data.test, grid, log_lik_model=test.values)
        out.update(test_log_lik_truth=kl.log_lik_truth, test_kl=kl.kl, test_kl_stderr=kl.stderr)
    out["eval_seconds"] = time.perf_counter() - t
    return out


# ----------------------------------------------------------------------------- the loop's helpers


def _choose(record: dict[str, Any], r: int) -> None:
    """A history record's scores of copy ``r``, beside every copy's."""
    record["train_bound"] = record["train_bound_per_copy"][r]
    if "val_log_lik_per_copy" in record:
        record["val_log_lik"] = record["val_log_lik_per_copy"][r]


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (0: leave torch's setting), restored afterwards."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n > 0 and torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _announcer(progress: bool, prefix: str):
    """A function printing one line per phase (to stderr) when ``progress`` is on."""
    def say(text: str) -> None:
        if progress:
            print(f"{prefix}: {text}…", file=sys.stderr, flush=True)
    return say


def _likelihood_config(cfg: TrainConfig, data: Dataset) -> dict[str, Any]:
    """The observation model: ``cfg.likelihood``, else the data set's own (a built-in image set
    names one; curves and files are Gaussian), with the settings that likelihood reads from the
    config (:meth:`~mapa_vae.models.likelihoods.Likelihood.settings`)."""
    default = IMAGE_DATASETS[cfg.data].likelihood if cfg.data in IMAGE_DATASETS else "gaussian"
    return Likelihood.for_run(cfg, data, default)


def _check_data(likelihood: Likelihood, data: Dataset, name: str) -> None:
    """The likelihood's checks on the data: a user's file in its own row order (so errors name
    its rows), a built-in set split by split."""
    full = data.unsplit()
    if full is not None:
        likelihood.check_data(full, name)
        return
    for split, x in (("train", data.train), ("validation", data.val), ("test", data.test)):
        likelihood.check_data(x, f"{name} ({split})")


@torch.no_grad()
def _null_decoder_log_lik(likelihood: Likelihood, x: torch.Tensor) -> float:
    """Mean ``log p(x | params = 0)``: a decoder that outputs zeros, which any model should beat."""
    log_p = likelihood(torch.zeros_like(x)).log_prob(x)
    return float(log_p.reshape(x.shape[0], -1).sum(-1).mean())


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
