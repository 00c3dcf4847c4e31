"""Restarts: ``R`` independently initialized copies trained in one process, the best kept.

``train --restarts R`` trains the copies seeded ``seed, seed + 1, …, seed + R - 1``, each with
its own optimizer state and its own sampling stream, and keeps the copy with the best validation
score (the method's selection score, never the test set); the history records every copy.
Restart ``r`` equals, up to floating-point rounding, the single run ``train --seed (seed + r)``:
it draws its epoch order, reparameterization noise and MAPA tail draws from its own torch
generator, in the order and shapes that run draws them, and takes the same Adam steps (a step
skipped as non-finite in one copy leaves the others moving).

Two engines, chosen per run (the metrics record which as ``restart_engine``):

- **vectorized**: the copies are one batched model (:class:`~mapa_vae.models.ensemble.Ensemble`:
  stacked weights, one ``baddbmm`` per layer), one forward and backward per step for all ``R``,
  and :class:`RestartAdam`. Used when every parameter lives in the MLPs, the batches are random
  (equal sizes at every step) and the objective has a batched form: ELBO (``vae``), IWAE with
  every estimator (``iwae``), and MAPA's bound with forward-pass reuse over a fixed posterior
  (``mapa`` with the kernel, ground-truth or uniform posterior, either tail). MAPA's posterior is
  computed once and shared; the networks run once over the union of the copies' unique atoms.
- **sequential**: every other method (``sbn``, ``vae-dgp``, MAPA with a learned proposal, a
  method registered later, ``--batching local``, torchrun): the ``R`` models take their steps
  in turn in the same loop, each objective drawing from the global generator with that copy's
  state swapped in, so each copy is exactly its single run.

Passes are counted per copy, as the single run counts them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data.dataset import Dataset
from ..errors import MapaError
from ..inference.objectives import ELBO, IWAE, MAPA, Bound, Objective, PassCounter, score_pairs
from ..methods.base import Architecture, Method
from ..models.ensemble import Ensemble, StreamEncoder
from ..models.latent import CodeEncoder, GaussianEncoder, LatentVariableModel
from ..models.likelihoods import Likelihood
from ..registry import BATCHINGS
from .checkpoint import RESUMABLE, Checkpoint, config_json
from .distributed import Parallel
from .restart_state import RestartAdam, RestartStreams

__all__ = ["RestartsFit", "train_restarts", "vectorizable"]


@dataclass
class RestartsFit:
    """What :func:`train_restarts` hands back to the loop: the chosen copy and its progress."""

    model: LatentVariableModel  # the chosen copy (load ``state.best_model`` into it)
    state: Checkpoint  # the chosen copy's counts and best weights; ``history`` holds every copy
    passes: PassCounter  # the chosen copy's
    metrics: dict[str, Any]  # restarts, the chosen one and every copy's scores


@dataclass
class _Copy:
    """One restart's progress."""

    seed: int
    best_val: float = -math.inf
    best_epoch: int = -1
    last_val: float | None = None
    skipped: int = 0
    steps: int = 0
    best_model: dict[str, Tensor] = field(default_factory=dict)


def vectorizable(cfg: TrainConfig, model: LatentVariableModel, objective: Objective,
                 par: Parallel) -> str | None:
    """Why the copies of ``model`` must run one after another, or ``None`` when they can run as
    one batched model."""
    if cfg.batching != "random":
        return f"--batching {cfg.batching} gives the copies batches of unequal sizes"
    if par.world > 1:
        return "torchrun shards each copy's batches"
    if type(objective) in (ELBO, IWAE) and isinstance(model.encoder, GaussianEncoder):
        return None
    if type(objective) is MAPA and objective.reuse and isinstance(model.encoder, CodeEncoder):
        return None
    return f"{type(objective).__name__} has no batched form"


def train_restarts(method: Method, cfg: TrainConfig, data: Dataset, likelihood: Likelihood,
                   train_x: Tensor, val_x: Tensor, par: Parallel, out: Path | None, resume: bool,
                   progress: bool, saved: Any) -> RestartsFit:
    """Train ``cfg.restarts`` copies of ``method``'s model; keep the best by validation.

    ``train_x`` / ``val_x`` are on the device, in the training dtype; ``saved.epoch`` is set to
    every epoch checkpointed (for the interrupt message). Writes ``out/checkpoint.pt`` every
    validation and resumes from it with ``resume``.
    """
    device = train_x.device
    arch = Architecture.from_config(cfg, data.dim)
    seeds = [cfg.seed + r for r in range(cfg.restarts)]

    def build(seed: int, with_objective: bool) -> tuple[LatentVariableModel, Objective | None, Tensor,
                                                         Tensor | None]:
        _seed_everything(seed)  # as the single run of this seed does, in the same order
        model = method.build(arch, likelihood, cfg).to(device, train_x.dtype)
        objective = method.objective(model, train_x, cfg, data) if with_objective else None
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return model, objective, torch.get_rng_state(), cuda

    first = build(seeds[0], True)
    assert first[1] is not None
    why = vectorizable(cfg, first[0], first[1], par)
    built = [first] + [build(s, why is not None) for s in seeds[1:]]
    models = [b[0] for b in built]
    if why is None and (why := Ensemble.reason(models)) is not None:
        built = [first] + [build(s, True) for s in seeds[1:]]
        models = [b[0] for b in built]
    streams = RestartStreams([b[2] for b in built], [b[3] for b in built], device)
    engine: _Engine
    if why is None:
        engine = _Vectorized(models, first[1], cfg, streams)
    else:
        engine = _Sequential(models, [b[1] for b in built], cfg, streams, par)  # type: ignore[misc]
    copies = [_Copy(s, best_model=copy.deepcopy(engine.member(r).state_dict()))
              for r, s in enumerate(seeds)]  # as a single run starts: its initial weights
    state = Checkpoint(engine.module.state_dict(), {}, {}, torch.get_rng_state(),
                       config_json(cfg, RESUMABLE))
    if resume:
        state = _resume(out, cfg, engine, streams, copies)
    clock = time.perf_counter() - state.train_seconds
    saved.epoch = state.epoch if resume else None
    n = train_x.shape[0]
    bar = tqdm(range(state.epoch, cfg.epochs), desc=f"{cfg.method} {cfg.data} ×{cfg.restarts}",
               disable=not (progress and par.main), initial=state.epoch, total=cfg.epochs,
               leave=False)
    try:
        for epoch in bar:
            # --- one epoch of steps: every copy its own batches, drawn from its own stream
            engine.train()
            batches = [engine.batches(r, train_x) for r in range(cfg.restarts)]
            bound_sum = torch.zeros(cfg.restarts, dtype=torch.float64)
            for j in range(max(len(b) for b in batches)):
                index = [b[j] if j < len(b) else None for b in batches]
                ok, sums = engine.step(index, train_x)
                bound_sum += sums
                for c, taken, drawn in zip(copies, ok.tolist(), index, strict=True):
                    if drawn is not None:
                        c.steps += 1
                        c.skipped += not taken
            record: dict[str, Any] = {"epoch": epoch + 1,
                                      "train_bound": [par.sum_scalar(float(s)) / n for s in bound_sum]}
            validate = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
            # --- validate every copy under no_grad, keep each one's best, checkpoint
            finite = [False] * cfg.restarts
            if validate:
                vals = []
                for r, c in enumerate(copies):
                    member = engine.member(r)
                    member.eval()
                    with streams.use(r), torch.no_grad():  # validation may draw (IWAE, L > 1)
                        val = method.validation_log_likelihood(member, val_x, train_x, cfg)
                    c.last_val = val
                    vals.append(val)
                    finite[r] = _finite(member.state_dict())
                    if val > c.best_val and finite[r]:
                        c.best_val, c.best_epoch = val, epoch + 1
                        c.best_model = copy.deepcopy(member.state_dict())
                record["val_log_lik"] = vals
                best = max(c.best_val for c in copies)
                bar.set_postfix(best_val=f"{best:.3f}")
            state.history.append(record)
            state.epoch = epoch + 1
            if validate and out is not None and all(finite):
                writing = time.perf_counter()
                state.train_seconds = writing - clock
                _fill(state, engine, streams, copies)
                state.save(out / "checkpoint.pt")
                clock += time.perf_counter() - writing  # writing files is not training
                saved.epoch = state.epoch
    finally:
        engine.close()
        bar.close()
    state.train_seconds = time.perf_counter() - clock
    chosen = _chosen(copies)
    _fill(state, engine, streams, copies)
    model = engine.member(chosen)
    metrics = {
        "restarts": cfg.restarts,
        "restart": chosen,
        "restart_seed": seeds[chosen],
        "restart_engine": engine.name,
        "restart_runs": [{"seed": c.seed, "best_epoch": c.best_epoch,
                          "best_val_selection_score": c.best_val,
                          "last_val_selection_score": c.last_val, "steps": c.steps,
                          "skipped_steps": c.skipped} for c in copies],
    }
    if why is not None:
        metrics["restart_sequential_because"] = why
    return RestartsFit(model, state, engine.passes(chosen), metrics)


# ----------------------------------------------------------------------------- the engines


class _Engine:
    """How the copies step: :class:`_Vectorized` or :class:`_Sequential`."""

    name: str
    module: nn.Module  # every copy's weights, for the checkpoint

    def train(self) -> None:
        self.module.train()

    def batches(self, r: int, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def step(self, index: Sequence[Tensor | None], x: Tensor) -> tuple[Tensor, Tensor]:
        """One step of every copy with a batch (``None``: no batch left for that copy). Returns
        which copies stepped ``(R,)`` bool and the bound summed over each one's batch ``(R,)``."""
        raise NotImplementedError

    def member(self, r: int) -> LatentVariableModel:
        """Copy ``r`` as a single model, with its current weights."""
        raise NotImplementedError

    def passes(self, r: int) -> PassCounter:
        raise NotImplementedError

    def set_passes(self, counts: Sequence[dict[str, int]]) -> None:
        raise NotImplementedError

    def optimizer_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_optimizer(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Remove the hooks."""


class _Vectorized(_Engine):
    name = "vectorized"

    def __init__(self, models: list[LatentVariableModel], objective: Objective, cfg: TrainConfig,
                 streams: RestartStreams) -> None:
        self.ensemble = Ensemble(models)
        self.module = self.ensemble.model
        self.members = models  # single models to validate with (weights copied in)
        self.cfg, self.streams, self.restarts = cfg, streams, len(models)
        self.objective = objective
        self.mapa: list[MAPA] = []
        if isinstance(objective, MAPA):  # one per copy: its generator, its pass counts
            for g in streams.device:
                o = copy.copy(objective)
                o.generator, o.passes = g, PassCounter()
                self.mapa.append(o)
        else:  # q(z | x) draws each copy's noise from its generator
            m = self.module
            self.view = LatentVariableModel(StreamEncoder(m.encoder, streams.device), m.decoder, m.prior)
        params = [p for _, p in self.module.named_parameters()]
        self.opt = RestartAdam(params, cfg.lr)
        self.watch = _Watch(self.module.decoder.net, self.restarts)

    def batches(self, r: int, x: Tensor) -> list[Tensor]:
        return BATCHINGS[self.cfg.batching](x, self.cfg.batch_size, self.streams.cpu[r])

    def step(self, index: Sequence[Tensor | None], x: Tensor) -> tuple[Tensor, Tensor]:
        if any(i is None for i in index) or len({i.numel() for i in index if i is not None}) > 1:
            raise MapaError("vectorized restarts need batches of one size at every step")
        idx = torch.stack([i for i in index if i is not None], 1).to(x.device)  # (B, R)
        self.watch.clear()
        bound = self._bound(x[idx], idx)  # (B, R) each
        loss = -bound.surrogate.sum(0) / idx.shape[0]  # (R,): each copy's mean
        ok = torch.isfinite(loss) & self.watch.finite()
        self.opt.zero_grad()
        torch.where(ok, loss, torch.zeros_like(loss)).sum().backward()
        ok &= self.opt.grads_finite()
        self.opt.step(ok)
        sums = torch.where(ok, bound.value.detach().sum(0), torch.zeros_like(loss))
        return ok.cpu(), sums.to("cpu", torch.float64)

    def _bound(self, x: Tensor, index: Tensor) -> Bound:
        """The bound of every copy on its own batch: x ``(B, R, D)``, index ``(B, R)``."""
        if not self.mapa:
            return self.objective(self.view, x, index)
        # MAPA (Eq. 10) for R copies: each draws its own proposal; the networks run once over the
        # union of the copies' atoms and each copy gathers its own (a single run's reuse, per copy).
        parts = [o.proposal(index[:, r]) for r, o in enumerate(self.mapa)]
        atom_idx = torch.stack([p[0] for p in parts], 1)  # (B, R, k+S)
        offset = torch.stack([p[1] for p in parts], 1)  # (B, R, k+S)
        unique, inverse = torch.unique(atom_idx, return_inverse=True)  # (U,), (B, R, k+S)
        atoms = self.mapa[0].atoms[unique]  # (U, D)
        model = self.ensemble.model
        params = model.decoder.net(model.encoder(atoms[:, None, :].expand(-1, self.restarts, -1)))
        for r, o in enumerate(self.mapa):
            used = torch.unique(atom_idx[:, r]).numel()  # what the single run passes
            o.passes.add(used, used, x.shape[0])
        lik = model.decoder.likelihood
        if lik.matmul_pairs:  # each copy's pairs as one product, as its single run scores them
            log_p = torch.stack([score_pairs(lik, params[:, r], x[:, r], inverse[:, r])
                                 for r in range(self.restarts)], 1)  # (B, R, k+S)
        else:
            copy_of = torch.arange(self.restarts, device=x.device)[:, None]  # (R, 1)
            log_p = lik(params[inverse, copy_of]).log_prob(x[:, :, None, :])  # (B, R, k+S)
        value = torch.logsumexp(log_p + offset, -1) - math.log(self.mapa[0].posterior.n_points)
        return Bound(value, value)

    def member(self, r: int) -> LatentVariableModel:
        self.members[r].load_state_dict(self.ensemble.member_state(r))
        return self.members[r]

    def passes(self, r: int) -> PassCounter:
        return copy.copy(self.mapa[r].passes if self.mapa else self.objective.passes)

    def set_passes(self, counts: Sequence[dict[str, int]]) -> None:
        for counter, count in zip([o.passes for o in self.mapa] or [self.objective.passes], counts,
                                  strict=False):
            counter.reset()
            for name, value in count.items():
                setattr(counter, name, value)

    def optimizer_state(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_optimizer(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)

    def close(self) -> None:
        self.watch.remove()


class _Sequential(_Engine):
    name = "sequential"

    def __init__(self, models: list[LatentVariableModel], objectives: list[Objective],
                 cfg: TrainConfig, streams: RestartStreams, par: Parallel) -> None:
        self.models, self.objectives, self.cfg, self.streams, self.par = models, objectives, cfg, streams, par
        self.module = nn.ModuleList(models)
        self.opts = [torch.optim.Adam(m.parameters(), lr=cfg.lr) for m in models]
        self.watches = [_Watch(m.decoder.net, None) for m in models]

    def batches(self, r: int, x: Tensor) -> list[Tensor]:
        with self.streams.use(r):
            return BATCHINGS[self.cfg.batching](x, self.cfg.batch_size)

    def step(self, index: Sequence[Tensor | None], x: Tensor) -> tuple[Tensor, Tensor]:
        ok = torch.zeros(len(index), dtype=torch.bool)
        sums = torch.zeros(len(index), dtype=torch.float64)
        for r, i in enumerate(index):  # the single run's step, copy by copy
            if i is None:
                continue
            model, opt, par = self.models[r], self.opts[r], self.par
            local = par.shard(i).to(x.device)
            self.watches[r].clear()
            with self.streams.use(r):
                bound = self.objectives[r](model, x[local], local)
            loss = -bound.surrogate.sum() / i.numel()
            if not par.all_true(bool(self.watches[r].finite().all() & torch.isfinite(loss)), x.device):
                continue
            opt.zero_grad()
            loss.backward()
            par.sum_gradients(model)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                opt.zero_grad()
                continue
            opt.step()
            ok[r] = True
            sums[r] = float(bound.value.detach().sum())
        return ok, sums

    def member(self, r: int) -> LatentVariableModel:
        return self.models[r]

    def passes(self, r: int) -> PassCounter:
        return copy.copy(self.objectives[r].passes)

    def set_passes(self, counts: Sequence[dict[str, int]]) -> None:
        for o, count in zip(self.objectives, counts, strict=True):
            o.passes.reset()
            for name, value in count.items():
                setattr(o.passes, name, value)

    def optimizer_state(self) -> dict[str, Any]:
        return {str(r): opt.state_dict() for r, opt in enumerate(self.opts)}

    def load_optimizer(self, state: dict[str, Any]) -> None:
        for r, opt in enumerate(self.opts):
            opt.load_state_dict(state[str(r)])

    def close(self) -> None:
        for w in self.watches:
            w.remove()


# ----------------------------------------------------------------------------- helpers


class _Watch:
    """Whether the decoder network's training outputs were finite, per restart ``(R,)``
    (``restarts=None``: one flag for a single model)."""

    def __init__(self, net: nn.Module, restarts: int | None) -> None:
        self.restarts = restarts
        self.flags: list[Tensor] = []
        self.hook = net.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            finite = torch.isfinite(output)
            if self.restarts is None:
                self.flags.append(finite.all().reshape(1))
            else:
                self.flags.append(finite.movedim(-2, 0).reshape(self.restarts, -1).all(1))

    def clear(self) -> None:
        self.flags.clear()

    def finite(self) -> Tensor:
        if not self.flags:
            return torch.ones(self.restarts or 1, dtype=torch.bool)
        return torch.stack(self.flags).all(0)

    def remove(self) -> None:
        self.hook.remove()


def _chosen(copies: Sequence[_Copy]) -> int:
    """The restart with the best validation score (the first on a tie; 0 if none is finite)."""
    scores = [c.best_val for c in copies]
    best = max(range(len(copies)), key=lambda r: (scores[r], -r))
    return best if math.isfinite(scores[best]) else 0


def _fill(state: Checkpoint, engine: _Engine, streams: RestartStreams, copies: Sequence[_Copy]) -> None:
    """Write every copy's progress into ``state``; its scalar fields are the chosen copy's (what
    the loop's diagnosis and metrics read)."""
    chosen = copies[_chosen(copies)]
    state.model = engine.module.state_dict()
    state.optimizer = engine.optimizer_state()
    state.best_model = chosen.best_model
    state.best_val, state.best_epoch, state.last_val = chosen.best_val, chosen.best_epoch, chosen.last_val
    state.skipped, state.steps = chosen.skipped, chosen.steps
    state.passes = dataclasses.asdict(engine.passes(_chosen(copies)))
    state.torch_rng = torch.get_rng_state()
    state.restarts = {
        "engine": engine.name, **streams.state(),
        "copies": [dataclasses.asdict(c) for c in copies],
        "passes": [dataclasses.asdict(engine.passes(r)) for r in range(len(copies))],
    }


def _resume(out: Path | None, cfg: TrainConfig, engine: _Engine, streams: RestartStreams,
            copies: list[_Copy]) -> Checkpoint:
    """Load ``out/checkpoint.pt`` of a restarts run into the engine, streams and copies."""
    if out is None or not (out / "checkpoint.pt").exists():
        raise MapaError(f"--resume: no checkpoint in {out}")
    path = out / "checkpoint.pt"
    state = Checkpoint.load(path, cfg)
    saved = state.restarts
    try:
        if saved.get("engine") != engine.name:
            raise ValueError(f"written by the {saved.get('engine')} engine, this run is {engine.name}")
        engine.module.load_state_dict(state.model)
        engine.load_optimizer(state.optimizer)
        streams.load(saved)
        copies[:] = [_Copy(**c) for c in saved["copies"]]
        engine.set_passes(saved["passes"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MapaError(f"{path}: does not fit this run ({first})") from None
    return state


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (as the training loop seeds a single run)
    torch.manual_seed(seed)


def _finite(state: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
