"""One readable training loop, with best-on-validation selection and resumable checkpoints.

``train(config, out_dir)`` does, in order: load the data; build the method's model and
objective; for each epoch, for each batch, evaluate the bound, step the optimizer on its
negative mean; every ``eval_every`` epochs score the validation set under ``no_grad``, keep the
best weights and write a checkpoint; then finalize (MAPA: the copula prior), evaluate on the
test set (test KL when the ground truth is known) and write the run directory:

- ``config.json``: the full :class:`TrainConfig` plus the data dimension;
- ``model.pt``: the final generative model's weights (safe to load: tensors only);
- ``trained.pt``: the weights as trained, before :meth:`~mapa_vae.methods.Method.finalize`;
- ``checkpoint.pt``: optimizer, RNG states and progress, for ``--resume``;
- ``metrics.json`` and ``history.json``.

A step whose loss, decoder output or gradient is not finite is skipped (the weights and the
optimizer state do not change) and counted in ``metrics.json``; a checkpoint never holds a
non-finite tensor. ``--resume`` refuses a checkpoint written under another configuration (only
``epochs`` and ``cache_dir`` may change), and the result files carry their config, so a model
file left by an earlier or interrupted run is never read as this run's. ``config.json`` is
written last, with the results: an interrupted run leaves the previous complete run readable.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data.dataset import Dataset
from ..data.images import IMAGE_DATASETS
from ..data.loading import load_dataset
from ..errors import MapaError
from ..evaluation.likelihood import test_kl
from ..methods.base import Architecture, Method
from ..models.latent import LatentVariableModel
from ..models.likelihoods import make_likelihood
from ..registry import METHODS
from ..storage import load_tensors, save_tensors, write_json
from .distributed import init_parallel, resolve_device

__all__ = ["TrainResult", "evaluate_final", "train"]


@dataclass
class TrainResult:
    config: TrainConfig
    model: LatentVariableModel  # final generative model
    trained: LatentVariableModel  # as trained
    data: Dataset
    metrics: dict[str, Any]
    history: list[dict[str, float]]



def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (seeds user code that uses the legacy global RNG)
    torch.manual_seed(seed)



def _likelihood_config(cfg: TrainConfig, data: Dataset) -> dict[str, Any]:
    """The observation model: ``cfg.likelihood``, else the data set's own (a built-in image set
    names one; curves and files are Gaussian), with the curve's noise variance by default."""
    name = cfg.likelihood or (IMAGE_DATASETS[cfg.data].likelihood if cfg.data in IMAGE_DATASETS
                              else "gaussian")
    if name == "gaussian":
        noise_var = cfg.noise_var
        if noise_var is None:
            if data.truth is None:
                raise MapaError(f"{cfg.data}: a Gaussian likelihood needs --noise-var on this data "
                                "(or choose --likelihood bernoulli / continuous-bernoulli for data "
                                "in [0, 1])")
            noise_var = data.truth.noise_var
        return {"name": "gaussian", "noise_var": noise_var}
    return {"name": name, "rho": cfg.rho}


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())



def _grads_finite(model: torch.nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True



# Fields that may differ between a checkpoint and the run that resumes it.
_RESUMABLE = ("epochs", "cache_dir", "device", "threads")



def _config_json(cfg: TrainConfig, drop: tuple[str, ...] = ("cache_dir", "device", "threads")) -> str:
    """The config as canonical JSON, stored in checkpoints and model files to tie them to it."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in drop}
    return json.dumps(d, sort_keys=True, default=str)



def _check_resumable(ck: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    if "config" not in ck:  # a checkpoint from before configs were stored
        return
    try:
        before = json.loads(ck["config"])
    except (TypeError, ValueError):
        raise MapaError(f"{path}: not a mapa-vae checkpoint (unreadable config)") from None
    now = json.loads(_config_json(cfg, drop=_RESUMABLE))
    changed = sorted(k for k in set(before) | set(now)
                     if k not in _RESUMABLE and before.get(k) != now.get(k))
    if changed:
        diffs = ", ".join(f"{k}={before.get(k)!r} there, {now.get(k)!r} now" for k in changed)
        raise MapaError(f"--resume: {path} was written with another configuration ({diffs}); "
                        "only --epochs may change")



def train(cfg: TrainConfig, out_dir: str | Path | None = None, progress: bool = True,
          resume: bool = False) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.data``; write the run to ``out_dir`` if given."""
    out = Path(out_dir) if out_dir is not None else None
    method: Method = METHODS[cfg.method]
    method.check(cfg)
    data = load_dataset(cfg.data, cfg.n_train, cfg.n_val, cfg.n_test, cfg.data_seed)
    lik_config = _likelihood_config(cfg, data)
    likelihood = make_likelihood(lik_config)
    full = data.unsplit()  # a user's file: check it in its own row order, so rows mean its rows
    checks = [(full, cfg.data)] if full is not None else [
        (x, f"{cfg.data} ({split})")
        for split, x in (("train", data.train), ("validation", data.val), ("test", data.test))
    ]
    for x, where in checks:
        likelihood.check_data(x, where)
    del full, checks
    par = init_parallel(cfg.device)
    device = resolve_device(cfg.device, par.local_rank)
    out = out if par.main else None  # only rank 0 writes
    _seed_everything(cfg.seed)
    dtype = torch.float32
    train_x, val_x = data.train.to(device, dtype), data.val.to(device, dtype)
    model = method.build(Architecture.from_config(cfg, data.dim), likelihood, cfg).to(device, dtype)
    objective = method.objective(model, train_x, cfg, data)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    start_epoch, best_val, best_epoch, skipped = 0, -math.inf, -1, 0
    best_state = copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    if resume:
        if out is None or not (out / "checkpoint.pt").exists():
            raise MapaError(f"--resume: no checkpoint in {out}")
        ck = load_tensors(out / "checkpoint.pt")
        _check_resumable(ck, cfg, out / "checkpoint.pt")
        try:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            best_state, best_val, best_epoch = ck["best_model"], ck["best_val"], ck["best_epoch"]
            start_epoch, skipped, history = ck["epoch"], ck["skipped"], ck["history"]
            torch.set_rng_state(ck["torch_rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MapaError(f"{out / 'checkpoint.pt'}: does not fit this run ({first})") from None

    n = train_x.shape[0]
    decoder_finite: list[torch.Tensor] = []  # per training forward: is the decoder output finite?

    def watch_decoder(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            decoder_finite.append(torch.isfinite(output).all())  # no device sync here

    hook = model.decoder.net.register_forward_hook(watch_decoder)
    objective.passes.reset()
    t0 = time.perf_counter()
    bar = tqdm(range(start_epoch, cfg.epochs), desc=f"{cfg.method} {cfg.data}",
               disable=not (progress and par.main), initial=start_epoch, total=cfg.epochs, leave=False)
    for epoch in bar:
        model.train()
        perm = torch.randperm(n)
        bound_sum = 0.0
        for start in range(0, n, cfg.batch_size):
            index = perm[start : start + cfg.batch_size]
            local = par.shard(index).to(device)  # this process's share of the global batch
            decoder_finite.clear()
            bound = objective(model, train_x[local], local)
            loss = -bound.surrogate.sum() / index.numel()  # its share of the global mean
            ok = bool(torch.stack([torch.isfinite(loss), *decoder_finite]).all())
            if not par.all_true(ok, device):
                skipped += 1  # policy: skip the step and count it; weights stay as they were
                continue
            opt.zero_grad()
            loss.backward()
            par.sum_gradients(model)
            if not _grads_finite(model):  # e.g. 0 · inf where a weight vanished: same policy
                opt.zero_grad()
                skipped += 1
                continue
            opt.step()
            bound_sum += float(bound.value.detach().sum())
        record = {"epoch": epoch + 1, "train_bound": par.sum_scalar(bound_sum) / n}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            model.eval()
            with torch.no_grad():
                val = method.validation_log_likelihood(model, val_x, train_x, cfg)
            record["val_log_lik"] = val
            finite = _finite(model.state_dict())
            if val > best_val and finite:
                best_val, best_epoch = val, epoch + 1
                best_state = copy.deepcopy(model.state_dict())
            bar.set_postfix(bound=f"{record['train_bound']:.3f}", val=f"{val:.3f}")
            history.append(record)
            if out is not None and finite:
                save_tensors(out / "checkpoint.pt", {
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "best_model": best_state, "best_val": best_val, "best_epoch": best_epoch,
                    "epoch": epoch + 1, "skipped": skipped, "history": history,
                    "torch_rng": torch.get_rng_state(), "config": _config_json(cfg, _RESUMABLE),
                })
        else:
            history.append(record)
    hook.remove()
    train_seconds = time.perf_counter() - t0
    bar.close()

    if not par.main:  # the other replicas are done: rank 0 finalizes, evaluates and writes
        par.close()
        return TrainResult(cfg, model, model, data, {}, history)
    par.close()
    model.load_state_dict(best_state)
    model = model.cpu().eval()  # finalizing and evaluating are cheap, and exact, on the CPU
    t1 = time.perf_counter()
    final, info = method.finalize(model, train_x.cpu(), cfg)
    prior_seconds = time.perf_counter() - t1
    metrics: dict[str, Any] = {
        "method": cfg.method,
        "data": cfg.data,
        **method.metrics(cfg),
        "epochs": cfg.epochs,
        "best_epoch": best_epoch,
        "best_val_selection_score": best_val,
        "skipped_steps": skipped,
        "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / max(1, cfg.epochs - start_epoch),
        "prior_seconds": prior_seconds,
        "passes_per_point_per_step": objective.passes.per_point(),
        **info,
    }
    metrics.update(evaluate_final(method, final, data, cfg.test_grid))
    trained = model
    if out is not None:  # config.json last: until then an earlier complete run stays readable
        tag = _config_json(cfg)
        save_tensors(out / "model.pt", {"model": final.state_dict(), "config": tag})
        save_tensors(out / "trained.pt", {"model": trained.state_dict(), "config": tag})
        write_json(out / "metrics.json", metrics)
        write_json(out / "history.json", history)
        write_json(out / "config.json", {**dataclasses.asdict(cfg), "data_dim": data.dim,
                                         "likelihood_config": lik_config})
    return TrainResult(cfg, final, trained, data, metrics, history)



def evaluate_final(method: Method, model: LatentVariableModel, data: Dataset, grid: int) -> dict[str, Any]:
    """Validation / test log-likelihood of the final model, and the test KL when known."""
    t = time.perf_counter()
    out: dict[str, Any] = {
        "val_log_lik": float(method.log_likelihood(model, data.val, grid).mean()),
    }
    if data.truth is not None:
        kl = test_kl(data.truth.model, model, data.test, grid,
                     log_lik_model=method.log_likelihood(model, data.test, grid))
        out.update(test_log_lik=kl.log_lik_model, test_log_lik_truth=kl.log_lik_truth,
                   test_kl=kl.kl, test_kl_stderr=kl.stderr)
    else:
        out["test_log_lik"] = float(method.log_likelihood(model, data.test, grid).mean())
    out["eval_seconds"] = time.perf_counter() - t
    return out

