"""R copies of a model as one batched model: stacked weights, one batched product per layer.

Restarts (``train --restarts R``) train ``R`` independently initialized copies of the same
networks. Run one after another, the 3×50 MLPs here are overhead-bound: a step costs the same
at a batch of 100 as at 10. :class:`Ensemble` therefore stacks the copies: every
:class:`~mapa_vae.models.networks.MLP` becomes a :class:`BatchedMLP` whose layer ``j`` holds
``W_j`` ``(R, out, in)`` and ``b_j`` ``(R, out)`` and computes
``h_j = act(baddbmm(b_j, h_{j-1}, W_jᵀ))`` for all ``R`` copies in one call.

**The restart dimension** sits just before the features, ``(…, R, D)``, everywhere: a batch
of inputs is ``(B, R, D)`` (each restart its own rows), IWAE's samples ``(S, B, R, L)``, MAPA's
atoms ``(U, R, D)``. With it there, the package's objectives and distributions broadcast over it
unchanged: ``x.shape[0]`` is still the batch, the sample dimension still comes first.

**Sampling streams.** Restart ``r`` draws its reparameterization noise from its own generator
(:class:`StreamNormal`), in the shapes a single run draws, so the ``R`` copies trained together
draw exactly what ``R`` separate runs with the same seeds draw.

>>> import torch
>>> from mapa_vae.models.networks import MLP
>>> nets = [MLP(2, 3, (4,)) for _ in range(2)]
>>> batched = BatchedMLP.stack(nets)
>>> x = torch.randn(5, 2, 2)  # (B, R, D)
>>> bool(torch.allclose(batched(x)[:, 1], nets[1](x[:, 1]), atol=1e-6))
True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from .latent import LatentVariableModel
from .networks import MLP

__all__ = ["BatchedLinear", "BatchedMLP", "Ensemble", "StreamEncoder", "StreamNormal"]


class BatchedLinear(nn.Module):
    """``R`` linear layers: ``(R, M, in) ↦ (R, M, out)``, ``y_r = x_r W_rᵀ + b_r``."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)  # (R, out, in)
        self.bias = nn.Parameter(bias)  # (R, out)

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias[:, None, :], x, self.weight.transpose(1, 2))


class BatchedMLP(nn.Module):
    """``R`` copies of an :class:`MLP` on inputs ``(…, R, in)``, giving ``(…, R, out)``.

    Its children are numbered as the MLP's (``0`` a linear layer, ``1`` its activation, …), so
    its state dict has the MLP's keys with a leading ``R`` on every weight.
    """

    def __init__(self, layers: Sequence[nn.Module], restarts: int) -> None:
        super().__init__()
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)
        self.restarts = restarts

    @classmethod
    def stack(cls, nets: Sequence[MLP]) -> BatchedMLP:
        """The copies ``nets`` (same widths), their weights stacked."""
        layers: list[nn.Module] = []
        for parts in zip(*nets, strict=True):
            if isinstance(parts[0], nn.Linear):
                layers.append(BatchedLinear(torch.stack([p.weight.detach() for p in parts]).clone(),
                                            torch.stack([p.bias.detach() for p in parts]).clone()))
            else:  # activations hold no weights
                layers.append(copy.deepcopy(parts[0]))
        return cls(layers, len(nets))

    def forward(self, x: Tensor) -> Tensor:
        h = x.movedim(-2, 0)  # (R, …, in)
        lead = h.shape[1:-1]
        h = h.reshape(self.restarts, -1, h.shape[-1])  # (R, M, in)
        for layer in self.children():
            h = layer(h)
        return h.reshape(self.restarts, *lead, h.shape[-1]).movedim(0, -2)  # (…, R, out)


class StreamNormal(Normal):
    """A Normal whose batch shape ends in the restart dimension ``(…, R, L)`` and whose
    reparameterized draws for restart ``r`` come from ``generators[r]``.

    ``rsample(sample_shape)`` draws ``ε_r`` of shape ``sample_shape + (…, L)`` from each
    generator, exactly the standard normals a single run draws for ``q.rsample(sample_shape)``
    (``torch.empty(shape).normal_()``), and returns ``loc + ε·scale``.
    """

    def __init__(self, loc: Tensor, scale: Tensor, generators: Sequence[torch.Generator]) -> None:
        super().__init__(loc, scale, validate_args=False)
        self.generators = generators

    def rsample(self, sample_shape: torch.Size | Sequence[int] = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))  # (*sample, …, R, L)
        one = shape[:-2] + shape[-1:]  # what one restart draws
        eps = torch.stack([torch.empty(one, dtype=self.loc.dtype, device=self.loc.device)
                           .normal_(generator=g) for g in self.generators], -2)
        return self.loc + eps * self.scale


class StreamEncoder(nn.Module):
    """Wraps a Gaussian encoder (``x ↦ Independent(Normal)``) of an ensemble so that its
    ``q(z | x)`` draws each restart's noise from that restart's generator."""

    def __init__(self, encoder: nn.Module, generators: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.encoder = encoder
        self.generators = generators

    def forward(self, x: Tensor) -> Distribution:
        q = self.encoder(x)
        if not (isinstance(q, Independent) and type(q.base_dist) is Normal):
            raise TypeError(f"a stream encoder needs an Independent(Normal) q, got {type(q).__name__}")
        base = q.base_dist
        return Independent(StreamNormal(base.loc, base.scale, self.generators),
                           q.reinterpreted_batch_ndims)


class Ensemble:
    """``R`` models of one architecture as one: ``model`` is a copy of the first with every
    :class:`MLP` replaced by a :class:`BatchedMLP` of the ``R`` copies.

    Stackable only when every parameter lives in an MLP and every other tensor (buffers) is the
    same in all copies; :meth:`reason` says why not otherwise.
    """

    def __init__(self, models: Sequence[LatentVariableModel]) -> None:
        why = self.reason(models)
        if why is not None:
            raise ValueError(f"these models cannot be stacked: {why}")
        self.restarts = len(models)
        self.model = copy.deepcopy(models[0])
        self.stacked: set[str] = set()  # state-dict keys with a leading R
        for name, _ in _mlps(models[0]):
            batched = BatchedMLP.stack([cast(MLP, m.get_submodule(name)) for m in models])
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, batched)
            self.stacked |= {f"{name}.{k}" for k in batched.state_dict()}

    @staticmethod
    def reason(models: Sequence[LatentVariableModel]) -> str | None:
        """Why ``models`` cannot be stacked, or ``None`` when they can."""
        mlps = [name for name, _ in _mlps(models[0])]
        if not mlps:
            return "no MLP networks"
        inside = tuple(f"{name}." for name in mlps)
        loose = [k for k, _ in models[0].named_parameters() if not k.startswith(inside)]
        if loose:
            return f"parameters outside the MLPs ({loose[0]})"
        first = models[0].state_dict()
        for m in models[1:]:
            other = m.state_dict()
            if other.keys() != first.keys():
                return "different architectures"
            for k, v in first.items():
                if not k.startswith(inside) and not torch.equal(v, other[k]):
                    return f"buffer {k} differs between copies"
        return None

    def member_state(self, r: int, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Copy ``r``'s state dict, as a single model holds it (from ``state``, else the model)."""
        state = self.model.state_dict() if state is None else state
        return {k: (v[r] if k in self.stacked else v).detach().clone() for k, v in state.items()}


def _mlps(model: nn.Module) -> list[tuple[str, MLP]]:
    """The outermost MLPs of ``model``, by name."""
    found: list[tuple[str, MLP]] = []
    for name, module in model.named_modules():
        if isinstance(module, MLP) and not any(name.startswith(f"{n}.") for n, _ in found):
            found.append((name, module))
    return found
