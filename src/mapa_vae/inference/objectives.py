"""Bounds on ``log p(x)``, one small class each (paper Eq. 2, 6, 10, 14; docs/design.md §1, §3, §5).

An objective is called as ``objective(model, x, index)`` on a batch ``x`` ``(B, D)`` whose rows
are the training points ``index`` ``(B,)``, and returns a :class:`Bound`: ``value`` is the
per-example bound ``(B,)`` (log-sum-exp minus log of the count, in log space throughout) and
``surrogate`` is what the optimizer differentiates (the same tensor unless an estimator says
otherwise). The training loop maximizes ``surrogate.mean()`` and logs ``value.mean()``.

Every objective counts the network passes it makes (rows pushed through the encoder and the
decoder) in :attr:`Objective.passes`, the cost measure of the paper's Fig. 4–5.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributions import Distribution

from ..errors import MapaError
from ..models.latent import LatentVariableModel
from ..models.likelihoods import Likelihood
from ..registry import ESTIMATORS, Estimator, estimators_of
from .posterior import MapaPosterior
from .tails import PerPointTail, TailProposal

__all__ = [
    "ELBO",
    "IWAE",
    "MAPA",
    "Autoencoder",
    "Bound",
    "EmpiricalLogLikelihood",
    "Objective",
    "PassCounter",
    "score_pairs",
]


class Bound(NamedTuple):
    """``value``: the bound per example ``(B,)``; ``surrogate``: its gradient carrier ``(B,)``."""

    value: Tensor
    surrogate: Tensor


@dataclass
class PassCounter:
    """Running totals of network passes (one pass = one row through one network)."""

    encoder: int = 0
    decoder: int = 0
    points: int = 0
    steps: int = 0

    def add(self, encoder: int, decoder: int, points: int) -> None:
        self.encoder += encoder
        self.decoder += decoder
        self.points += points
        self.steps += 1

    def per_point(self) -> dict[str, float]:
        """Average passes per data point per step, as in the paper's Fig. 4–5."""
        p = max(self.points, 1)
        return {
            "encoder": self.encoder / p,
            "decoder": self.decoder / p,
            "encoder+decoder": (self.encoder + self.decoder) / p,
        }

    def reset(self) -> None:
        self.encoder = self.decoder = self.points = self.steps = 0


class Objective(ABC):
    """A lower bound on ``log p(x)``, evaluated per example.

    ``batched`` says whether the bound has a batched form for ``R`` restarts trained as one
    stacked model (training/engines.py): called on the stacked model's view with ``x``
    ``(B, R, D)`` and ``index`` ``(B, R)``, it returns ``(B, R)`` bounds, copy ``r`` exactly its
    own run's. An objective without one (the default) has its restarts trained one after
    another, and the run says so in one line.
    """

    batched: bool = False

    def __init__(self) -> None:
        self.passes = PassCounter()

    @abstractmethod
    def __call__(self, model: LatentVariableModel, x: Tensor, index: Tensor) -> Bound: ...


def _log_weights(model: LatentVariableModel, x: Tensor, samples: int) -> tuple[Tensor, Tensor]:
    """``log w_s = log p(x|z_s) + log p(z_s) - log q(z_s|x)`` for ``z_s ~ q(·|x)``, ``(S, B)``.

    Also returns the samples ``z`` ``(S, B, L)``.
    """
    q = model.encoder(x)
    z = q.rsample((samples,))  # (S, B, L)
    log_px_z = model.decoder(z).log_prob(x)  # (S, B)
    return log_px_z + model.prior().log_prob(z) - q.log_prob(z), z


class ELBO(Objective):
    """The VAE's evidence lower bound, ``E_q[log p(x, z) - log q(z | x)]``, with ``S`` draws."""

    batched = True  # distributions broadcast over the copies' axis

    def __init__(self, samples: int = 1) -> None:
        super().__init__()
        if samples < 1:
            raise ValueError(f"ELBO needs at least one sample, got {samples}")
        self.samples = samples

    def __call__(self, model: LatentVariableModel, x: Tensor, index: Tensor) -> Bound:
        log_w, _ = _log_weights(model, x, self.samples)  # (S, B)
        self.passes.add(x.shape[0], x.shape[0] * self.samples, x.shape[0])
        value = log_w.mean(0)
        return Bound(value, value)


class IWAE(Objective):
    """The ``S``-sample importance-weighted bound (Burda et al. 2016; paper Eq. 2), docs/design.md §5.

    ``L_S(x) = log (1/S) Σ_s w_s``, ``w_s = p(x, z_s) / q_φ(z_s | x)``, ``z_s ~ q_φ(· | x)`` drawn
    by reparameterization; with ``S = 1`` it is the ELBO under the same draw. ``value`` is this
    bound for every ``estimator``; only the gradient that ``surrogate`` carries to the encoder
    ``φ`` differs. With ``w̃_s = w_s / Σ_t w_t`` the normalized weights:

    - ``"naive"``: plain autodiff of ``L_S``,
      ``∇_φ L_S = Σ_s w̃_s (∂ log w_s/∂z_s · ∂z_s/∂φ - ∂_φ log q_φ(z_s | x))``. The score term
      ``∂_φ log q_φ`` does not vanish as ``q`` approaches the posterior, so the estimator is noisy
      and its signal-to-noise ratio falls as ``S`` grows (Rainforth et al. 2018).
    - ``"stl"``: sticking the landing (Roeder et al. 2017), the score term dropped:
      ``Σ_s w̃_s ∂ log w_s/∂z_s · ∂z_s/∂φ``. It is exactly zero when ``q`` is the true posterior
      (then ``log w_s = log p(x)`` for every ``z``), but biased for ``S > 1``.
    - ``"dreg"``: doubly reparameterized (Tucker et al. 2019, the IWAE case):
      ``Σ_s w̃_s² ∂ log w_s/∂z_s · ∂z_s/∂φ``, unbiased for ``∇_φ L_S`` with lower variance.

    The decoder (and anything else outside ``φ``) gets the IWAE gradient ``Σ_s w̃_s ∇_θ log
    p_θ(x | z_s)`` under every estimator. One decoder pass serves both: ``log q`` is evaluated so
    that its gradient flows through ``z`` only (the path derivative), the surrogate is
    ``logsumexp_s log w_s - log S`` (so ``θ`` sees ``w̃_s``), and for DReG a hook multiplies the
    gradient arriving at ``z_s`` by ``w̃_s``, turning ``w̃_s`` into ``w̃_s²`` on the path to ``φ``
    alone. Passes are therefore ``B`` encoder and ``B·S`` decoder rows for all three. For STL and
    DReG ``value`` is returned detached, since its own gradient would be neither estimator's.
    """

    batched = True  # distributions broadcast over the copies' axis

    def __init__(self, samples: int, estimator: str = "naive") -> None:
        super().__init__()
        if samples < 1:
            raise ValueError(f"IWAE needs at least one sample, got {samples}")
        if estimator not in estimators_of("iwae"):
            raise MapaError(f"unknown IWAE estimator {estimator!r}; choose from "
                            f"{', '.join(estimators_of('iwae'))}")
        self.samples = samples
        self.estimator = estimator

    def __call__(self, model: LatentVariableModel, x: Tensor, index: Tensor) -> Bound:
        self.passes.add(x.shape[0], x.shape[0] * self.samples, x.shape[0])
        if self.estimator == "naive":
            log_w, _ = _log_weights(model, x, self.samples)  # (S, B)
            value = torch.logsumexp(log_w, 0) - math.log(self.samples)
            return Bound(value, value)
        q = model.encoder(x)
        z = q.rsample((self.samples,))  # (S, B, L)
        log_w = (
            model.decoder(z).log_prob(x) + model.prior().log_prob(z) - _path_log_prob(q, z)
        )  # (S, B)
        if self.estimator == "dreg" and z.requires_grad:
            w_tilde = torch.softmax(log_w.detach(), 0)  # (S, B)
            z.register_hook(lambda grad: grad * w_tilde[..., None])
        surrogate = torch.logsumexp(log_w, 0) - math.log(self.samples)
        return Bound(surrogate.detach(), surrogate)


for _e in (Estimator("naive", "iwae", "plain autodiff of the bound"),
           Estimator("stl", "iwae", "sticking the landing (Roeder et al. 2017): IWAE's score term dropped"),
           Estimator("dreg", "iwae", "doubly reparameterized (Tucker et al. 2019)")):
    ESTIMATORS.register(_e)


def _path_log_prob(q: Distribution, z: Tensor) -> Tensor:
    """``log q_φ(z)`` whose gradient reaches ``φ`` only through ``z`` (the path derivative).

    The score ``∂_φ log q_φ(z)|_z`` enters once with each sign and cancels, so no second encoder
    pass with detached parameters is needed; the value is ``log q_φ(z)`` exactly.
    """
    log_q = q.log_prob(z)
    return log_q - q.log_prob(z.detach()) + log_q.detach()


MATMUL_PAIRS_RATIO = 64
"""Score all ``B × U`` (point, atom) pairs by one matrix product when the batch's unique atoms
``U`` are at most this many times each point's ``k + S``: the product's ``B·U·D`` multiply-adds
run at matmul speed, where gathering ``(B, k+S, D)`` decoder outputs and scoring them
elementwise is memory-bound. Measured (Bernoulli, B = 100, D = 1024, k + S = 220, forward and
backward, one CPU thread): 16 ms against 564 ms at U/(k+S) = 3, 98 against 678 ms at 27, 549
against 731 ms at 91; the break-even is near 90."""


def score_pairs(likelihood: Likelihood, params: Tensor, x: Tensor, inverse: Tensor) -> Tensor:
    """``log p(x_b | params[inverse[b, j]])`` ``(B, m)`` for decoder outputs ``params``
    ``(U, D')`` of a batch's unique atoms, points ``x`` ``(B, D)`` and ``inverse`` ``(B, m)``.

    Where the likelihood's pairwise log-density is a matrix product (Bernoulli) and few atoms are
    shared out (local batches, a shared tail, small ``N``), every pair is scored at once and the
    ``m`` wanted per point gathered; otherwise the ``(B, m, D')`` outputs are gathered and scored
    elementwise. Both give the same numbers up to float rounding.
    """
    if likelihood.matmul_pairs and params.shape[0] <= MATMUL_PAIRS_RATIO * inverse.shape[1]:
        return torch.gather(likelihood.pairwise_log_prob(params, x), 1, inverse)
    return likelihood(params[inverse]).log_prob(x[:, None, :])


class MAPA(Objective):
    """The MAPA bound (paper Eq. 10 / 29, docs/design.md §3) with forward-pass reuse.

    ``L(x_n) = log( Σ_{i∈B_n(k)} p(x_n | f(g(x_i))) + (1/S) Σ_s p(x_n | f(g(x_{i_s}))) / q̃_k(i_s|n) )
    - log N``, ``i_s ~ q̃_k(· | n)``. The proposal is fixed, so plain autodiff gives unbiased
    gradients for both ``f`` and ``g``. ``k = N, S = 0`` is the exact empiricalized likelihood
    and ``k = 1, S = 0`` the autoencoder term.

    With ``reuse=True`` the encoder and decoder run once per *unique* index in the batch's
    ``B_n(k)`` and samples; ``reuse=False`` runs them once per (point, index) pair, as a naive
    implementation would (same value, more passes).

    ``tail`` says where the ``S`` draws come from (:mod:`~mapa_vae.inference.tails`): each
    point's own ``q̃_k`` (:class:`~mapa_vae.inference.tails.PerPointTail`, the default and the
    formula above) or one proposal shared by the batch
    (:class:`~mapa_vae.inference.tails.SharedTail`), whose passes grow with the batch's unique
    atoms instead of ``B·S``.

    **R copies at once.** :meth:`for_copies` gives the bound of ``R`` copies of the model
    stacked in one (:class:`~mapa_vae.models.ensemble.Ensemble`, restart dimension before the
    features), called with ``x`` ``(B, R, D)`` and ``index`` ``(B, R)`` (each copy its own
    batch) and returning ``(B, R)``. Copy ``r`` draws its proposal from its own generator and
    counts the passes its single run makes; the networks run once over the union of the copies'
    atoms, which each copy gathers from.
    """

    def __init__(
        self,
        posterior: MapaPosterior,
        atoms: Tensor,
        k: int,
        samples: int,
        reuse: bool = True,
        generator: torch.Generator | None = None,
        tail: TailProposal | None = None,
    ) -> None:
        super().__init__()
        posterior.check_budget(k, samples)
        if atoms.shape[0] != posterior.n_points:
            raise ValueError(
                f"posterior has {posterior.n_points} points but {atoms.shape[0]} atoms were given"
            )
        self.posterior = posterior
        self.atoms = atoms  # (N, D)
        self.k = k
        self.samples = samples
        self.reuse = reuse
        self.batched = reuse  # stacked copies share the networks' passes (for_copies)
        self.tail = tail if tail is not None else PerPointTail()
        self.generators: list[torch.Generator | None] = [generator]  # one per copy
        self.passes_per_copy = [self.passes]

    def for_copies(self, generators: Sequence[torch.Generator]) -> MAPA:
        """This bound for ``R = len(generators)`` stacked copies (see the class docstring);
        copy ``r`` draws from ``generators[r]`` and counts in ``passes_per_copy[r]``."""
        if not self.reuse:
            raise ValueError("stacked copies share their networks' passes: they need reuse=True")
        stacked = copy.copy(self)
        stacked.generators = list(generators)
        stacked.passes_per_copy = [PassCounter() for _ in generators]
        stacked.passes = stacked.passes_per_copy[0]
        return stacked

    def proposal(self, index: Tensor, r: int = 0) -> tuple[Tensor, Tensor]:
        """The batch's atom indices ``(B, k+S)`` and the log-weights' offsets ``(B, k+S)``,
        the tail drawn from copy ``r``'s generator.

        The offset is 0 for ``B_n(k)``; for the tail draws it is the tail proposal's importance
        weight (``-log q̃_k(i_s|n) - log S`` per point, ``-inf`` where a row skips a draw).
        """
        top = self.posterior.top(index, self.k)  # (B, k)
        offset = torch.zeros(top.shape, dtype=self.atoms.dtype, device=top.device)
        if self.samples == 0:
            return top, offset
        tail, tail_offset = self.tail.draw(self.posterior, index, self.k, self.samples,
                                           self.generators[r])  # (B, S) each
        return torch.cat([top, tail], 1), torch.cat([offset, tail_offset.to(offset.dtype)], 1)

    def __call__(self, model: LatentVariableModel, x: Tensor, index: Tensor) -> Bound:
        one = index.dim() == 1  # a single model; else R stacked copies
        if one:
            x, index = x[:, None, :], index[:, None]  # (B, 1, D), (B, 1)
        b, r_all = index.shape
        if r_all != len(self.generators):
            raise ValueError(f"{r_all} copies' indices for a bound of {len(self.generators)}")
        parts = [self.proposal(index[:, r], r) for r in range(r_all)]
        atom_idx = torch.stack([p[0] for p in parts], 1)  # (B, R, k+S)
        offset = torch.stack([p[1] for p in parts], 1)  # (B, R, k+S)
        lik = model.decoder.likelihood
        if self.reuse:
            unique, inverse, used = _unique_atoms(atom_idx, self.posterior.n_points)
            atoms = self.atoms[unique]  # (U, D)
            if not one:
                atoms = atoms[:, None, :].expand(-1, r_all, -1)  # (U, R, D)
            params = model.decoder.net(model.encoder(atoms)).reshape(unique.numel(), r_all, -1)
            if lik.matmul_pairs:  # each copy's pairs scored as its single run scores them
                log_p = torch.stack([score_pairs(lik, params[:, r], x[:, r], inverse[:, r])
                                     for r in range(r_all)], 1)  # (B, R, k+S)
            else:
                copy_of = torch.arange(r_all, device=x.device)[:, None]  # (R, 1)
                log_p = lik(params[inverse, copy_of]).log_prob(x[:, :, None, :])  # (B, R, k+S)
            for counter, n_passes in zip(self.passes_per_copy, used, strict=True):
                counter.add(n_passes, n_passes, b)  # what the copy's single run passes
        else:
            if not one:
                raise ValueError("stacked copies need reuse=True")
            flat = atom_idx.reshape(-1)
            params = model.decoder.net(model.encoder(self.atoms[flat]))
            params = params.reshape(*atom_idx.shape, -1)  # (B, 1, k+S, D')
            log_p = lik(params).log_prob(x[:, :, None, :])  # (B, 1, k+S)
            self.passes.add(flat.numel(), flat.numel(), b)
        value = torch.logsumexp(log_p + offset, -1) - math.log(self.posterior.n_points)  # (B, R)
        if one:
            value = value[:, 0]
        return Bound(value, value)


def _unique_atoms(atom_idx: Tensor, n: int) -> tuple[Tensor, Tensor, list[int]]:
    """``torch.unique(atom_idx, return_inverse=True)`` for indices in ``[0, n)`` ``(B, R, m)``,
    by a mask over the ``n`` atoms (``O(n + B·R·m)``, no sort), and the number of unique atoms
    of each copy ``r`` (``atom_idx[:, r]``), what its single run passes through the networks."""
    r_all = atom_idx.shape[1]
    seen = torch.zeros(r_all, n, dtype=torch.bool, device=atom_idx.device)  # (R, N)
    copy_of = torch.arange(r_all, device=atom_idx.device)[None, :, None]  # (1, R, 1)
    seen[copy_of.expand_as(atom_idx), atom_idx] = True
    union = seen.any(0)  # (N,)
    unique = union.nonzero()[:, 0]  # (U,), ascending as torch.unique's
    rank = torch.cumsum(union, 0) - 1  # (N,): an atom's place in ``unique``
    return unique, rank[atom_idx], seen.sum(1).tolist()


class EmpiricalLogLikelihood(Objective):
    """The exact empiricalized log-likelihood (paper Eq. 6), ``O(N)`` passes per call:

    ``log p(x) = log (1/N) Σ_i p(x | f(g(x_i)))`` over the ``N`` atoms ``x_i``.
    It scores any ``x`` (training or held-out) against the training atoms.
    """

    def __init__(self, atoms: Tensor, chunk: int = 4096) -> None:
        super().__init__()
        self.atoms = atoms  # (N, D)
        self.chunk = chunk

    def __call__(self, model: LatentVariableModel, x: Tensor, index: Tensor | None = None) -> Bound:
        n = self.atoms.shape[0]
        params = model.decoder.net(model.encoder(self.atoms))  # (N, D')
        self.passes.add(n, n, x.shape[0])
        lik = model.decoder.likelihood
        parts = [
            torch.logsumexp(lik.pairwise_log_prob(params[i : i + self.chunk], x), -1)
            for i in range(0, n, self.chunk)
        ]  # each (B,)
        value = torch.logsumexp(torch.stack(parts, -1), -1) - math.log(n)
        return Bound(value, value)


class Autoencoder(Objective):
    """The autoencoder term ``log p(x_n | f(g(x_n))) - log N`` (paper Eq. 14), a lower bound
    on the empiricalized log-likelihood; MAPA with ``k = 1, S = 0``."""

    def __init__(self, n_atoms: int) -> None:
        super().__init__()
        self.n_atoms = n_atoms

    def __call__(self, model: LatentVariableModel, x: Tensor, index: Tensor) -> Bound:
        self.passes.add(x.shape[0], x.shape[0], x.shape[0])
        value = model.decoder(model.encoder(x)).log_prob(x) - math.log(self.n_atoms)
        return Bound(value, value)
