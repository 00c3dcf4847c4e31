"""Engines: how the training loop's ``R`` copies of a model take their steps (``R = 1``: one).

``train --restarts R`` trains ``R`` independently initialized copies and keeps the best by
validation (:mod:`~mapa_vae.training.loop`). Copy ``r`` is seeded from ``(seed, r)``
(:func:`~mapa_vae.seeds.seed_everything`), then draws its epoch order, reparameterization noise
and MAPA tail draws from its own torch generator, in the order and shapes its single run
draws them, and takes its own Adam steps (a step skipped as non-finite in one copy leaves the
others moving). So copy ``r`` equals, up to floating-point rounding, copy ``r`` trained alone;
copy 0 is the single run ``--restarts 1`` with the same seed, and two seeds never share a copy.

An engine owns the copies, their optimizers and their streams; the loop asks it for each copy's
batches, a step of every copy, and copy ``r`` as a single model (to validate and keep):

- :class:`Vectorized`: the copies are one batched model (:class:`~mapa_vae.models.ensemble.Ensemble`:
  stacked weights, one ``baddbmm`` per layer), one forward and backward per step for all ``R``,
  and :class:`~mapa_vae.training.restart_state.RestartAdam`. Used for ``R > 1`` when every
  parameter lives in the MLPs, the batches are random (equal sizes at every step) and the
  objective has a batched form: ELBO (``vae``), IWAE with every estimator (``iwae``), and MAPA's
  bound with forward-pass reuse over a fixed posterior
  (:meth:`~mapa_vae.inference.objectives.MAPA.for_copies`).
- :class:`Sequential`: every other case (one copy, ``sbn``, ``vae-dgp``, MAPA with a learned
  proposal, ``--batching local``, torchrun): the models step in turn, each objective drawing from
  the global generator with its copy's state swapped in, so each copy is exactly its single run.
  With one copy its checkpoint state is the single model's and torch's Adam's, as runs before
  restarts wrote it.

Passes are counted per copy, as the copy's single run counts them.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..config import TrainConfig
from ..data.dataset import Dataset
from ..errors import MapaError
from ..inference.objectives import MAPA, Objective, PassCounter
from ..methods.base import Architecture, Method
from ..models.ensemble import Ensemble, StreamEncoder
from ..models.latent import CodeEncoder, GaussianEncoder, LatentVariableModel
from ..models.likelihoods import Likelihood
from ..registry import BATCHINGS
from ..seeds import seed_everything
from .distributed import Parallel
from .restart_state import RestartAdam, RestartStreams

__all__ = ["Engine", "Sequential", "Vectorized", "make_engine", "vectorizable"]


class Engine(ABC):
    """``R`` copies of a model, their optimizers and sampling streams."""

    name: str
    module: nn.Module  # every copy's weights, for the checkpoint
    streams: RestartStreams

    def train(self) -> None:
        self.module.train()

    @abstractmethod
    def batches(self, r: int, x: Tensor) -> list[Tensor]:
        """Copy ``r``'s batches of one epoch (row indices of ``x``), from its own stream."""

    @abstractmethod
    def step(self, index: Sequence[Tensor | None], x: Tensor) -> tuple[Tensor, Tensor]:
        """One step of every copy with a batch (``None``: no batch left for that copy). Returns
        which copies stepped ``(R,)`` bool and the bound summed over each one's batch ``(R,)``."""

    @abstractmethod
    def member(self, r: int) -> LatentVariableModel:
        """Copy ``r`` as a single model, with its current weights."""

    @abstractmethod
    def passes(self, r: int) -> PassCounter:
        """Copy ``r``'s network passes so far (a copy)."""

    @abstractmethod
    def set_passes(self, counts: Sequence[dict[str, int]]) -> None:
        """Every copy's pass counts, as :meth:`passes` gave them (a resumed run's)."""

    @abstractmethod
    def optimizer_state(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_optimizer(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Remove the hooks."""


def vectorizable(cfg: TrainConfig, model: LatentVariableModel, objective: Objective,
                 par: Parallel) -> str | None:
    """Why the copies of ``model`` must run one after another, or ``None`` when they can run as
    one batched model."""
    if cfg.restarts == 1:
        return "one copy"
    if cfg.batching != "random":
        return f"--batching {cfg.batching} gives the copies batches of unequal sizes"
    if par.world > 1:
        return "torchrun shards each copy's batches"
    if not objective.batched:  # the objective says whether it broadcasts over the copies' axis
        return f"{type(objective).__name__} has no batched form (Objective.batched)"
    encoder = CodeEncoder if isinstance(objective, MAPA) else GaussianEncoder
    if not isinstance(model.encoder, encoder):
        return f"{type(objective).__name__}'s stacked copies need a {encoder.__name__}"
    return None


def make_engine(method: Method, cfg: TrainConfig, data: Dataset, likelihood: Likelihood,
                train_x: Tensor, par: Parallel) -> tuple[Engine, str | None]:
    """The engine of ``cfg.restarts`` copies of ``method``'s model, copy ``r`` built as its single
    run builds it (seeded from ``(cfg.seed, r)``), and why it is sequential (``None``: vectorized)."""
    device = train_x.device
    arch = Architecture.from_config(cfg, data.dim)

    def build(r: int, with_objective: bool) -> tuple[LatentVariableModel, Objective | None, Tensor,
                                                     Tensor | None]:
        seed_everything(cfg.seed, r)
        model = method.build(arch, likelihood, cfg).to(device, train_x.dtype)
        objective = method.objective(model, train_x, cfg, data) if with_objective else None
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return model, objective, torch.get_rng_state(), cuda  # the copy's stream starts here

    first = build(0, True)
    assert first[1] is not None
    why = vectorizable(cfg, first[0], first[1], par)
    built = [first] + [build(r, why is not None) for r in range(1, cfg.restarts)]
    models = [b[0] for b in built]
    if why is None and (why := Ensemble.reason(models)) is not None:
        built = [first] + [build(r, True) for r in range(1, cfg.restarts)]
        models = [b[0] for b in built]
    streams = RestartStreams([b[2] for b in built], [b[3] for b in built], device)
    if why is None:
        return Vectorized(models, first[1], cfg, streams), None
    objectives = [b[1] for b in built if b[1] is not None]
    return Sequential(models, objectives, cfg, streams, par), why


class Vectorized(Engine):
    name = "vectorized"

    def __init__(self, models: list[LatentVariableModel], objective: Objective, cfg: TrainConfig,
                 streams: RestartStreams) -> None:
        self.ensemble = Ensemble(models)
        self.module = self.ensemble.model
        self.members = models  # single models to validate with (weights copied in)
        self.cfg, self.streams, self.restarts = cfg, streams, len(models)
        self.objective: Objective
        if isinstance(objective, MAPA):  # each copy draws its own tail (Eq. 10 for R copies)
            self.objective = objective.for_copies(streams.device)
            self.counters = self.objective.passes_per_copy
            self.view: LatentVariableModel = self.module
        else:  # q(z | x) draws each copy's noise from its generator
            self.objective = objective  # counts B rows per step, as each copy's single run
            self.counters = [objective.passes] * self.restarts
            m = self.module
            self.view = LatentVariableModel(StreamEncoder(m.encoder, streams.device), m.decoder, m.prior)
        self.opt = RestartAdam([p for _, p in self.module.named_parameters()], cfg.lr)
        self.watch = _Watch(self.module.decoder.net, self.restarts)

    def batches(self, r: int, x: Tensor) -> list[Tensor]:
        return BATCHINGS[self.cfg.batching](x, self.cfg.batch_size, self.streams.cpu[r])

    def step(self, index: Sequence[Tensor | None], x: Tensor) -> tuple[Tensor, Tensor]:
        if any(i is None for i in index) or len({i.numel() for i in index if i is not None}) > 1:
            raise MapaError("vectorized restarts need batches of one size at every step")
        idx = torch.stack([i for i in index if i is not None], 1).to(x.device)  # (B, R)
        self.watch.clear()
        bound = self.objective(self.view, x[idx], idx)  # (B, R) each
        loss = -bound.surrogate.sum(0) / idx.shape[0]  # (R,): each copy's mean
        ok = torch.isfinite(loss) & self.watch.finite()
        self.opt.zero_grad()
        torch.where(ok, loss, torch.zeros_like(loss)).sum().backward()
        ok &= self.opt.grads_finite()
        self.opt.step(ok)
        sums = torch.where(ok, bound.value.detach().sum(0), torch.zeros_like(loss))
        return ok.cpu(), sums.to("cpu", torch.float64)

    def member(self, r: int) -> LatentVariableModel:
        self.members[r].load_state_dict(self.ensemble.member_state(r))
        return self.members[r]

    def passes(self, r: int) -> PassCounter:
        return copy.copy(self.counters[r])

    def set_passes(self, counts: Sequence[dict[str, int]]) -> None:
        for counter, count in zip(self.counters, counts, strict=True):
            _set_counter(counter, count)

    def optimizer_state(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_optimizer(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)

    def close(self) -> None:
        self.watch.remove()


class Sequential(Engine):
    name = "sequential"

    def __init__(self, models: list[LatentVariableModel], objectives: list[Objective],
                 cfg: TrainConfig, streams: RestartStreams, par: Parallel) -> None:
        self.models, self.objectives, self.cfg, self.streams, self.par = models, objectives, cfg, streams, par
        self.module = models[0] if len(models) == 1 else nn.ModuleList(models)
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
            local = par.shard(i).to(x.device)  # this process's share of the global batch
            self.watches[r].clear()
            with self.streams.use(r):
                bound = self.objectives[r](model, x[local], local)
            loss = -bound.surrogate.sum() / i.numel()  # its share of the global mean
            if not par.all_true(bool(self.watches[r].finite().all() & torch.isfinite(loss)), x.device):
                continue  # skip the step and count it; weights stay as they were
            opt.zero_grad()
            loss.backward()
            par.sum_gradients(model)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                opt.zero_grad()  # e.g. 0 · inf where a weight vanished: same policy
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
            _set_counter(o.passes, count)

    def optimizer_state(self) -> dict[str, Any]:
        if len(self.opts) == 1:
            return self.opts[0].state_dict()
        return {str(r): opt.state_dict() for r, opt in enumerate(self.opts)}

    def load_optimizer(self, state: dict[str, Any]) -> None:
        if len(self.opts) == 1:
            self.opts[0].load_state_dict(state)
            return
        for r, opt in enumerate(self.opts):
            opt.load_state_dict(state[str(r)])

    def close(self) -> None:
        for w in self.watches:
            w.remove()


class _Watch:
    """Whether the decoder network's training outputs were finite, per copy ``(R,)``
    (``restarts=None``: one flag for a single model)."""

    def __init__(self, net: nn.Module, restarts: int | None) -> None:
        self.restarts = restarts
        self.flags: list[Tensor] = []
        self.hook = net.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            finite = torch.isfinite(output)  # no device sync here
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


def _set_counter(counter: PassCounter, count: dict[str, int]) -> None:
    counter.reset()
    for name, value in count.items():
        setattr(counter, name, value)
