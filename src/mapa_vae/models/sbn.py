"""Sigmoid belief networks: layers of Bernoulli latent units (Neal 1992; Mnih & Gregor 2014).

The generative model with ``L`` stochastic layers of widths ``H_1 … H_L`` (top last) is

``p(h_L) = Π_j Bernoulli(h_L^j; σ(b_j))``, ``p(h_l | h_{l+1}) = Π_j Bernoulli(h_l^j; σ(f_l(h_{l+1})^j))``,
``p(x | h_1) = Π_d Bernoulli(x^d; σ(f_0(h_1)^d))``,

and the recognition model samples upwards, each layer given the one below,

``q(h_1 | x) q(h_2 | h_1) … q(h_L | h_{L-1})``, every factor a factorized Bernoulli.

Each ``f`` is linear (the classic SBN) or, with ``hidden`` widths, an MLP (the "nonlinear" SBN
of the NVIL paper). Every conditional is a :class:`BernoulliLayer` returning a
``torch.distributions`` object; the top prior is :class:`BernoulliPrior`. :class:`SBN` fits the
:class:`~mapa_vae.models.latent.LatentVariableModel` interface the training loop uses:
``decoder.net`` is ``f_0`` (``h_1 → x`` logits), ``prior`` is ``p(h_L)``, ``latent_dim`` is
``H_L``, and :meth:`SBN.sample` draws ancestrally through every layer. The optional
``baseline`` is NVIL's input-dependent baseline network ``b(x)``, one output per layer; it
lives on the model so that the optimizer trains it and checkpoints keep it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent

from .latent import Decoder, LatentVariableModel, Prior
from .likelihoods import Likelihood
from .networks import MLP

__all__ = ["SBN", "BernoulliLayer", "BernoulliPrior", "NVILBaseline", "Trace"]


def _bernoulli(logits: Tensor) -> Distribution:
    return Independent(Bernoulli(logits=logits, validate_args=False), 1)


def _net(d_in: int, d_out: int, hidden: Sequence[int], activation: str) -> nn.Module:
    return MLP(d_in, d_out, tuple(hidden), activation) if hidden else nn.Linear(d_in, d_out)


class BernoulliLayer(nn.Module):
    """``u ↦ Π_j Bernoulli(σ(f(u))^j)``: ``(…, d_in)`` to a distribution of event shape ``(d_out,)``."""

    def __init__(self, d_in: int, d_out: int, hidden: Sequence[int] = (), activation: str = "tanh") -> None:
        super().__init__()
        self.net = _net(d_in, d_out, hidden, activation)

    def forward(self, u: Tensor) -> Distribution:
        return _bernoulli(self.net(u))


class BernoulliPrior(Prior):
    """The top layer's prior ``p(h_L) = Π_j Bernoulli(σ(b_j))`` with learned biases ``b``."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.logits = nn.Parameter(torch.zeros(latent_dim))

    def forward(self) -> Distribution:
        return _bernoulli(self.logits)


class NVILBaseline(nn.Module):
    """NVIL's input-dependent baseline ``b(x)`` ``(…, L)``, one output per stochastic layer:
    ``2x − 1 → hidden (tanh) → L`` (the inputs centred, as in the reference implementations).

    The running mean and variance of each layer's centred learning signal ``l_i − b_i(x)`` are
    buffers here, so checkpoints carry them with the network.
    """

    mean: Tensor
    var: Tensor

    def __init__(self, data_dim: int, n_layers: int, hidden: int = 100) -> None:
        super().__init__()
        self.net = MLP(data_dim, n_layers, (hidden,), "tanh")
        self.register_buffer("mean", torch.zeros(n_layers))
        self.register_buffer("var", torch.ones(n_layers))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(2 * x - 1)


@dataclass(frozen=True)
class Trace:
    """Draws from ``q`` with their log-densities: ``h[l]`` ``(*S, B, H_{l+1})`` for l = 0…L-1;
    ``log_q[l] = log q(h_{l+1} | h_l)`` ``(*S, B)`` (``h_0 = x``); ``log_p[0] = log p(x | h_1)``,
    ``log_p[l] = log p(h_l | h_{l+1})`` and ``log_p[L] = log p(h_L)``, each ``(*S, B)``."""

    h: list[Tensor]
    log_q: list[Tensor]
    log_p: list[Tensor]

    def log_w(self) -> Tensor:
        """``log p(x, h) − log q(h | x)`` ``(*S, B)``."""
        return torch.stack(self.log_p).sum(0) - torch.stack(self.log_q).sum(0)

    def local_signals(self) -> Tensor:
        """NVIL's per-layer learning signals ``(L, *S, B)`` (Mnih & Gregor 2014, Sec. 3.3):

        ``l_i = Σ_{j ≥ i−1} log p_j − Σ_{j ≥ i} log q_j`` (layers counted from 1): the terms of
        ``log p(x, h) − log q(h | x)`` that depend only on ``x`` and ``h_{<i}`` are dropped, since
        the score of ``q(h_i | h_{i−1})`` has zero mean given them. ``l_1`` is the full signal.
        """
        log_p, log_q = torch.stack(self.log_p), torch.stack(self.log_q)  # (L+1, …), (L, …)
        tail_p = log_p.flip(0).cumsum(0).flip(0)  # tail_p[j] = Σ_{m ≥ j} log p_m
        tail_q = log_q.flip(0).cumsum(0).flip(0)
        return tail_p[:-1] - tail_q


class SBN(LatentVariableModel):
    """A sigmoid belief network with ``layers = (H_1, …, H_L)`` Bernoulli units (top last), its
    recognition network, and optionally NVIL's baseline (``baseline=True``).

    ``hidden`` gives the widths of the deterministic MLP inside every conditional (empty: linear).
    """

    encoder: nn.ModuleList  # the recognition layers q(h_1 | x), q(h_2 | h_1), …

    def __init__(self, data_dim: int, layers: Sequence[int], likelihood: Likelihood,
                 hidden: Sequence[int] = (), activation: str = "tanh", baseline: bool = False) -> None:
        layers = tuple(layers)
        if not layers:
            raise ValueError("an SBN needs at least one stochastic layer")
        below = (data_dim, *layers[:-1])
        recognition = nn.ModuleList(
            BernoulliLayer(d, h, hidden, activation) for d, h in zip(below, layers, strict=True))
        decoder = Decoder(_net(layers[0], data_dim, hidden, activation), likelihood)
        super().__init__(recognition, decoder, BernoulliPrior(layers[-1]))
        # generative[l] is p(h_{l+1} | h_{l+2}) (0-based: layers[l] given layers[l+1])
        self.generative = nn.ModuleList(
            BernoulliLayer(layers[i + 1], layers[i], hidden, activation) for i in range(len(layers) - 1))
        self.layers = layers
        self.baseline = NVILBaseline(data_dim, len(layers)) if baseline else None

    @property
    def n_units(self) -> int:
        """All latent units ``Σ_l H_l`` (enumeration visits ``2^{n_units}`` states)."""
        return sum(self.layers)

    def recognize(self, x: Tensor, samples: int) -> list[tuple[Tensor, Tensor]]:
        """Draw ``h ~ q(h | x)`` layer by layer: ``[(h_l, log q(h_l | h_{l−1}))]``, each
        ``(S, B, H_l)`` and ``(S, B)``. No gradient flows through the discrete ``h``."""
        out = []
        u = x.expand(samples, *x.shape)  # (S, B, D)
        for layer in self.encoder:
            q = layer(u)
            h = q.sample()
            out.append((h, q.log_prob(h)))
            u = h
        return out

    def log_joint(self, x: Tensor, h: Sequence[Tensor]) -> list[Tensor]:
        """``[log p(x | h_1), log p(h_1 | h_2), …, log p(h_L)]``, each ``(*S, B)``, for
        ``h[l]`` ``(*S, B, H_{l+1})`` (any leading shape broadcasting against ``x`` ``(B, D)``)."""
        terms = [self.decoder(h[0]).log_prob(x)]
        terms += [layer(h[i + 1]).log_prob(h[i]) for i, layer in enumerate(self.generative)]
        terms.append(self.prior().log_prob(h[-1]))
        return terms

    def trace(self, x: Tensor, samples: int) -> Trace:
        """``samples`` draws from ``q(h | x)`` with every log-density term (see :class:`Trace`)."""
        drawn = self.recognize(x, samples)
        h = [d[0] for d in drawn]
        return Trace(h, [d[1] for d in drawn], self.log_joint(x, h))

    def log_q(self, x: Tensor, h: Sequence[Tensor]) -> Tensor:
        """``log q(h | x)`` ``(*S, B)`` of given states."""
        terms, u = [], x
        for layer, hl in zip(self.encoder, h, strict=True):
            terms.append(layer(u).log_prob(hl))
            u = hl
        return torch.stack(torch.broadcast_tensors(*terms)).sum(0)

    @torch.no_grad()
    def sample(self, n: int, mean: bool = False) -> Tensor:
        """Ancestral samples ``(n, D)``: ``h_L ~ p(h_L)``, each layer given the one above, then
        ``x``; ``mean`` returns ``E[x | h_1]`` instead of a binary ``x``."""
        h = self.prior().sample((n,))
        for layer in reversed(list(self.generative)):
            h = layer(h).sample()
        return self.decoder.mean(h) if mean else self.decoder(h).sample()
