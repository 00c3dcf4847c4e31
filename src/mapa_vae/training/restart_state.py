"""Per-copy state of the copies a run trains together (:mod:`~mapa_vae.training.engines`): the
sampling streams and Adam with a step count per restart."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = ["RestartAdam", "RestartStreams"]


class RestartStreams:
    """Every restart's torch generators: ``cpu[r]`` (its epoch order; everything on the CPU) and
    ``device[r]`` (its draws on the device; the same generator on the CPU)."""

    def __init__(self, cpu: Sequence[Tensor], cuda: Sequence[Tensor | None], device: torch.device) -> None:
        self.cpu = [torch.Generator().set_state(s) for s in cpu]
        self.on_cuda = device.type == "cuda"
        self.device_kind = device
        self.device = ([torch.Generator(device).set_state(s) for s in cuda if s is not None]
                       if self.on_cuda else self.cpu)

    @contextmanager
    def use(self, r: int) -> Iterator[None]:
        """Run with restart ``r``'s states in the global generators, saved back afterwards."""
        torch.set_rng_state(self.cpu[r].get_state())
        if self.on_cuda:
            torch.cuda.set_rng_state(self.device[r].get_state(), self.device_kind)
        try:
            yield
        finally:
            self.cpu[r].set_state(torch.get_rng_state())
            if self.on_cuda:
                self.device[r].set_state(torch.cuda.get_rng_state(self.device_kind))

    def state(self) -> dict[str, Any]:
        return {"rng": torch.stack([g.get_state() for g in self.cpu]),
                "rng_device": torch.stack([g.get_state() for g in self.device]) if self.on_cuda else None}

    def load(self, state: dict[str, Any]) -> None:
        for g, s in zip(self.cpu, state["rng"], strict=True):
            g.set_state(s.clone())
        if self.on_cuda and state.get("rng_device") is not None:
            for g, s in zip(self.device, state["rng_device"], strict=True):
                g.set_state(s.clone())


class RestartAdam:
    """Adam (Kingma & Ba 2015; torch's update, no weight decay) on weights stacked ``(R, …)``,
    with a step count per restart: ``step(active)`` moves restart ``r``'s slice of every tensor,
    and its moments, only where ``active[r]``, so a step skipped in one restart leaves the
    others' bias corrections in step with their single runs."""

    def __init__(self, params: Sequence[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.t = torch.zeros(self.params[0].shape[0], dtype=torch.float64, device=self.params[0].device)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def grads_finite(self) -> Tensor:
        """``(R,)``: whether every gradient of restart ``r`` is finite."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.ones_like(self.t, dtype=torch.bool)
        if bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all()):
            return torch.ones_like(self.t, dtype=torch.bool)  # the usual case, in two calls
        return torch.stack([torch.isfinite(g).flatten(1).all(1) for g in grads]).all(0)

    @torch.no_grad()
    def step(self, active: Tensor) -> None:
        b1, b2 = self.betas
        if bool(active.all()) and bool((self.t == self.t[0]).all()):
            self._step_all(int(self.t[0]) + 1)
            return
        self.t += active.to(self.t)
        t = self.t.clamp_min(1)  # a restart that never stepped is masked out below anyway
        step_size = self.lr / (1 - b1**t)  # (R,)
        bc2_sqrt = (1 - b2**t).sqrt()  # (R,)
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            view = (-1,) + (1,) * (p.dim() - 1)
            on = active.view(view)
            g = torch.where(on, p.grad, torch.zeros_like(p.grad))  # a skipped copy's grad may be NaN
            m_new = m.lerp(g, 1 - b1)
            v_new = (v * b2).addcmul_(g, g, value=1 - b2)
            denom = (v_new.sqrt() / bc2_sqrt.to(p.dtype).view(view)).add_(self.eps)
            p_new = p - step_size.to(p.dtype).view(view) * (m_new / denom)
            p.copy_(torch.where(on, p_new, p))
            m.copy_(torch.where(on, m_new, m))
            v.copy_(torch.where(on, v_new, v))

    def _step_all(self, step: int) -> None:
        """Every restart steps, all at step count ``step``: torch's Adam update as it is (its
        multi-tensor form, a handful of calls whatever the number of tensors)."""
        b1, b2 = self.betas
        self.t.fill_(step)
        has = [p.grad is not None for p in self.params]
        params = [p for p, h in zip(self.params, has, strict=True) if h]
        grads = [g for p in params if (g := p.grad) is not None]
        m = [m for m, h in zip(self.m, has, strict=True) if h]
        v = [v for v, h in zip(self.v, has, strict=True) if h]
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, 1 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, (1 - b2**step) ** 0.5)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, m, denom, -self.lr / (1 - b1**step))

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t.clone(), "m": [m.clone() for m in self.m], "v": [v.clone() for v in self.v]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t.copy_(state["t"])
        for mine, saved in zip(self.m + self.v, list(state["m"]) + list(state["v"]), strict=True):
            mine.copy_(saved)
