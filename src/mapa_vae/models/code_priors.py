"""Priors fitted to MAPA's codes when the latent has more than one dimension (docs/design.md §4, §8).

For ``L > 1`` no exact map to ``N(0, I)`` exists (the copula of :mod:`mapa_vae.models.copula` is
1-D); instead a density is fitted to the codes ``z_n = g(x_n)`` and becomes the model's prior,
the networks unchanged (:func:`fit_code_prior`): a full-covariance Gaussian mixture
(:class:`MixturePrior`, fitted by EM), a neural spline flow on standardized codes
(:class:`FlowPrior`, zuko, fitted by maximum likelihood with early stopping on held-out codes),
or a kernel density over the training codes, the Exemplar VAE's prior (:class:`KernelDensityPrior`,
its bandwidth fitted on held-out codes). All are :class:`CodePrior` modules whose state is
tensors only, so :func:`build_code_prior` rebuilds an empty one from its config for loading a
checkpoint.
"""

from __future__ import annotations

import copy
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
import zuko
from torch import Tensor
from torch.distributions import (
    AffineTransform,
    Categorical,
    Distribution,
    MixtureSameFamily,
    MultivariateNormal,
    TransformedDistribution,
)

from ..errors import MapaError
from ..registry import CODE_PRIORS
from ..seeds import one_off_seed
from .latent import CodeEncoder, LatentVariableModel, Prior

__all__ = ["CodePrior", "FlowPrior", "KernelDensityPrior", "MixturePrior", "build_code_prior",
           "fit_code_prior"]


class CodePrior(Prior, ABC):
    """A density ``p(z)`` fitted to MAPA's codes ``z_n = g(x_n)`` ``(N, L)`` (docs/design.md §4, ``L > 1``).

    ``forward()`` returns a distribution with event shape ``(L,)`` that follows the module's
    dtype and device (so ``.double()`` converts it). All state is buffers or parameters, and
    ``type(prior)(latent_dim, **prior.config())`` is an empty prior of the same structure.
    """

    kind: str
    latent_dim: int

    @abstractmethod
    def forward(self) -> Distribution: ...

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor arguments besides ``latent_dim`` (for :func:`build_code_prior`)."""

    @abstractmethod
    def fit(self, train: Tensor, held_out: Tensor, steps: int) -> int:
        """Fit in place to codes ``train`` ``(N, L)``, selecting by ``held_out`` ``(M, L)`` where
        the fit has a choice to make; returns the optimizer steps or EM iterations used."""


def _standardization(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-coordinate mean and standard deviation of codes ``(N, L)``, each ``(L,)``."""
    return z.mean(0), z.std(0).clamp_min(1e-6)


class MixturePrior(CodePrior):
    """``p(z) = Σ_k π_k N(z; μ_k, Σ_k)`` with full covariances ``Σ_k = L_k L_kᵀ``.

    Buffers: ``logits`` ``(K,)``, ``loc`` ``(K, L)`` and the Cholesky factors ``scale_tril``
    ``(K, L, L)``. Full covariances follow curved 2-D code sets with a few components where
    diagonal ones would need many. Fitted by EM (scikit-learn's ``GaussianMixture``, k-means
    initialization, ``1e-6`` added to the diagonal) on standardized codes, then mapped back.
    """

    kind = "mixture"
    logits: Tensor
    loc: Tensor
    scale_tril: Tensor

    def __init__(self, latent_dim: int, components: int = 10) -> None:
        super().__init__()
        if latent_dim < 1 or components < 1:
            raise MapaError(f"a mixture prior needs latent_dim, components >= 1, got {latent_dim}, "
                            f"{components}")
        self.latent_dim, self.components = latent_dim, components
        self.register_buffer("logits", torch.zeros(components))
        self.register_buffer("loc", torch.zeros(components, latent_dim))
        self.register_buffer("scale_tril", torch.eye(latent_dim).expand(components, -1, -1).clone())

    def forward(self) -> Distribution:
        return MixtureSameFamily(Categorical(logits=self.logits),
                                 MultivariateNormal(self.loc, scale_tril=self.scale_tril))

    def config(self) -> dict[str, Any]:
        return {"components": self.components}

    @torch.no_grad()
    def fit(self, train: Tensor, held_out: Tensor, steps: int) -> int:
        from sklearn.exceptions import ConvergenceWarning  # here: importing scikit-learn takes ~1 s
        from sklearn.mixture import GaussianMixture

        if train.shape[0] < self.components:
            raise MapaError(f"{train.shape[0]} codes cannot fit {self.components} mixture components")
        m, s = _standardization(train)
        w = ((train - m) / s).double().cpu().numpy()  # (N, L), whitened per coordinate
        gm = GaussianMixture(self.components, covariance_type="full", reg_covar=1e-6, max_iter=steps,
                             random_state=int(torch.randint(2**31 - 1, ())))
        with warnings.catch_warnings():  # an unconverged EM is still a density; steps says how long
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm.fit(w)
        self.logits.copy_(torch.as_tensor(np.log(gm.weights_)))
        self.loc.copy_(m + s * torch.as_tensor(gm.means_).to(s))  # (K, L)
        chol = torch.as_tensor(np.linalg.cholesky(gm.covariances_)).to(s)  # (K, L, L)
        self.scale_tril.copy_(s[:, None] * chol)  # Cholesky factor of diag(s) Σ diag(s)
        return int(gm.n_iter_)


class _SplineTransform(zuko.transforms.MonotonicRQSTransform):
    """zuko's monotonic rational-quadratic spline (the NSF's), its bins' softmax taken as
    ``exp / Σ exp``.

    torch's CPU softmax over a last dimension of 8 bins is an order of magnitude slower than the
    two elementwise operations it amounts to (2.9 against 0.3 ms for 5200 × 4 × 8 floats, one
    thread), and the spline's two softmaxes were 37 % of the flow's log-density. zuko bounds the
    unconstrained widths and heights by ``|w| < |log slope| / 2`` (3.45 at its slope 1e-3) before
    the softmax, so ``exp`` cannot overflow and no maximum need be subtracted. The same
    parameters give the same spline up to rounding (a test compares it with zuko's).
    """

    def __init__(self, widths: Tensor, heights: Tensor, derivatives: Tensor, bound: float = 5.0,
                 slope: float = 1e-3, **kwargs: Any) -> None:
        super(zuko.transforms.MonotonicRQSTransform, self).__init__(**kwargs)
        log_slope = math.log(slope)
        widths = _normalize_exp(widths / (1 + abs(2 * widths / log_slope)))
        heights = _normalize_exp(heights / (1 + abs(2 * heights / log_slope)))
        derivatives = derivatives / (1 + abs(derivatives / log_slope))
        self.horizontal = bound * (2 * torch.cumsum(F.pad(widths, (1, 0)), dim=-1) - 1)
        self.vertical = bound * (2 * torch.cumsum(F.pad(heights, (1, 0)), dim=-1) - 1)
        self.derivatives = torch.exp(F.pad(derivatives, (1, 1)))


def _normalize_exp(w: Tensor) -> Tensor:
    """``softmax(w, -1)`` for bounded ``w``, computed as ``exp(w) / Σ exp(w)``."""
    e = w.exp()
    return e / e.sum(-1, keepdim=True)


def _spline_flow(features: int, transforms: int, hidden: Sequence[int], bins: int,
                 slope: float = 1e-3) -> zuko.flows.Flow:
    """``zuko.flows.NSF(features, transforms=…, hidden_features=…, bins=…)`` built on
    :class:`_SplineTransform`: the same modules and parameters (a state dict of either loads
    into the other), a faster density."""
    return zuko.flows.MAF(features, transforms=transforms, hidden_features=tuple(hidden),
                          univariate=partial(_SplineTransform, slope=slope),
                          shapes=[(bins,), (bins,), (bins - 1,)])


class FlowPrior(CodePrior):
    """``p(z) = p_u((z - m) / s) / Π_l s_l``: a neural spline flow ``p_u`` on standardized codes.

    ``m``, ``s`` ``(L,)`` are buffers set to the codes' mean and standard deviation at fit time
    (zuko's splines act on ``[-5, 5]`` and are the identity outside, so the flow needs
    standardized inputs); ``p_u`` is ``zuko.flows.NSF`` with ``transforms`` autoregressive
    rational-quadratic spline layers of ``bins`` bins and hypernetworks of widths ``hidden``.
    Fitted by maximum likelihood (Adam, minibatches of 256 codes, an average of the iterates),
    keeping the average with the best held-out log-likelihood and stopping early (:meth:`fit`).
    Two transforms by default, for time: on MAPA's codes of MNIST (L = 4) a third cost 1.5x the
    CPU time per step, 1.2x per fit, and gained 0.02 nats per held-out code and 0.08 per test
    code (``benchmarks/prior_fit.py``).
    """

    kind = "flow"
    loc: Tensor
    scale: Tensor

    def __init__(self, latent_dim: int, transforms: int = 2, hidden: Sequence[int] = (64, 64),
                 bins: int = 8) -> None:
        super().__init__()
        if latent_dim < 1 or transforms < 1 or bins < 1:
            raise MapaError(f"a flow prior needs latent_dim, transforms, bins >= 1, got {latent_dim}, "
                            f"{transforms}, {bins}")
        self.latent_dim, self.transforms, self.hidden, self.bins = (
            latent_dim, transforms, tuple(hidden), bins)
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))
        self.flow = _spline_flow(latent_dim, transforms, self.hidden, bins)

    def config(self) -> dict[str, Any]:
        return {"transforms": self.transforms, "hidden": list(self.hidden), "bins": self.bins}

    def forward(self) -> Distribution:
        return self._density(self.flow)

    def _density(self, flow: zuko.flows.Flow) -> Distribution:
        """``flow``'s density mapped back from standardized codes (``self.flow`` or a copy of it)."""
        return TransformedDistribution(flow(), AffineTransform(self.loc, self.scale, event_dim=1))

    @torch.enable_grad()  # callers may hold no_grad (finalizing a trained model)
    def fit(self, train: Tensor, held_out: Tensor, steps: int, lr: float = 1e-2, batch_size: int = 256,
            every: int = 20, patience: int = 3, min_delta: float = 0.05, average: float = 0.98) -> int:
        """Adam on minibatches of ``train`` for at most ``steps`` steps; the prior keeps an average
        of the iterates (their running mean for the first ``1 / (1 - average)`` steps, then an
        exponential moving average with decay ``average``). Every ``every`` steps the average's mean
        held-out log-density is scored; the best average so far is kept, and the fit stops once
        ``patience`` scores in a row have not beaten the last real improvement by ``min_delta``
        nats per code (the average's score rises smoothly, so this stops where it gains less than
        about ``min_delta`` per ``patience · every`` steps, not at ``steps``).

        The average removes the iterate's noise (the iterate's own held-out score jumps by 0.1-0.2
        nats from check to check at these step sizes), so a larger step size and smaller batches
        reach the same density in fewer, cheaper steps, and the stop rule sees a smooth curve.
        ``average=0`` keeps the iterate itself (the previous rule). Chosen on the codes of MAPA on
        10 000 binarized MNIST images (L = 4, 20 epochs; ``benchmarks/prior_fit.py``, three seeds
        side by side): 500-575 steps and 0.50 of the CPU time of the previous fit (512-code
        batches at Adam 3e-3, no average, 0.01 nats over 4 checks, three transforms), 0.015 nats
        per held-out code above it and 0.04 (± 0.07 over the seeds) per test code below it;
        128-code batches lost 0.1 nats per held-out code, Adam 2e-2 0.13. The stop rule then
        moved from 4 checks of 25 steps to 3 of 20 (MAPA's image default, 20 epochs, three seeds,
        the spline of :class:`_SplineTransform`): 367 against 525 steps, 0.68 of the CPU time,
        0.07 nats per held-out code and 0.04 per test code below it; a larger batch cost more per
        step (1024 codes: 1.6x the time), a narrower hypernetwork (32, 32) lost 0.1.
        """
        with torch.no_grad():
            for buffer, value in zip((self.loc, self.scale), _standardization(train), strict=True):
                buffer.copy_(value)
        fast = copy.deepcopy(self.flow)  # the iterate Adam moves; self.flow holds the average
        opt = torch.optim.Adam(fast.parameters(), lr=lr)
        best, best_state = -math.inf, copy.deepcopy(self.state_dict())
        mark, stale, step = -math.inf, 0, 0
        while step < steps and stale < patience:
            rows = train if train.shape[0] <= batch_size else train[
                torch.randint(train.shape[0], (batch_size,), device=train.device)]
            loss = -self._density(fast).log_prob(rows).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            with torch.no_grad():
                weight = max(1.0 - average, 1.0 / step)  # 1 / step: the running mean
                for mean, value in zip(self.flow.parameters(), fast.parameters(), strict=True):
                    mean.lerp_(value, weight)
            if step % every == 0 or step == steps:
                with torch.no_grad():
                    score = float(self().log_prob(held_out).mean())
                if score > best:
                    best, best_state = score, copy.deepcopy(self.state_dict())
                if score > mark + min_delta:
                    mark, stale = score, 0
                else:
                    stale += 1
        self.load_state_dict(best_state)
        return step


class _KernelDensity(Distribution):
    """``p(z) = (1/N) Σ_n N(z; a_n, h² I)`` over atoms ``a`` ``(N, L)``, event shape ``(L,)``.

    ``log_prob`` is a log-sum-exp over the atoms in chunks of queries, so memory is
    ``O(chunk · N)`` whatever the number of queries.
    """

    arg_constraints: ClassVar[dict[str, Any]] = {}
    has_rsample = False
    _CHUNK_ENTRIES = 1 << 22  # (chunk, N) squared distances at a time

    def __init__(self, atoms: Tensor, bandwidth: Tensor) -> None:
        self.atoms, self.bandwidth = atoms, bandwidth
        super().__init__(event_shape=atoms.shape[1:], validate_args=False)

    @property
    def mean(self) -> Tensor:
        return self.atoms.mean(0)

    def log_prob(self, value: Tensor) -> Tensor:
        n, dim = self.atoms.shape
        z = value.reshape(-1, dim)  # (M, L)
        sq_a = self.atoms.pow(2).sum(-1)  # (N,)
        const = -math.log(n) - 0.5 * dim * (math.log(2 * math.pi) + 2 * self.bandwidth.log())
        out = []
        for chunk in z.split(max(1, self._CHUNK_ENTRIES // n)):
            sq = (chunk.pow(2).sum(-1, keepdim=True) - 2 * chunk @ self.atoms.T + sq_a).clamp_min(0)
            out.append(torch.logsumexp(sq / (-2 * self.bandwidth**2), -1))  # (chunk,)
        log_p = torch.cat(out) if out else z.new_empty(0)
        return (log_p + const).reshape(value.shape[:-1])

    def sample(self, sample_shape: torch.Size | Sequence[int] = ()) -> Tensor:
        shape = torch.Size(sample_shape)
        with torch.no_grad():
            pick = torch.randint(self.atoms.shape[0], shape, device=self.atoms.device)
            return self.atoms[pick] + self.bandwidth * torch.randn(
                *shape, self.atoms.shape[1], dtype=self.atoms.dtype, device=self.atoms.device)


class KernelDensityPrior(CodePrior):
    """``p(z) = (1/N) Σ_n N(z; z_n, h² I)`` over the training codes: the Exemplar VAE's prior.

    Buffers: ``atoms`` ``(N, L)``, the codes the fit was given, and ``bandwidth`` ``()``. An
    unfitted prior holds one atom at the origin; loading a state dict takes the stored number
    of atoms. ``bandwidth=None`` (the default) fits ``h`` by maximizing the mean held-out
    log-density over ``log h``: a grid of factors ``e^-3 … e^3`` of Scott's rule
    ``h₀ = σ̄ N^(-1/(L+4))`` (``σ̄`` the mean per-coordinate standard deviation), refined by
    golden-section search between the best grid point's neighbours; a given ``bandwidth`` is
    kept as it is. Deterministic: no random draws.
    """

    kind = "kde"
    atoms: Tensor
    bandwidth: Tensor

    def __init__(self, latent_dim: int, bandwidth: float | None = None) -> None:
        super().__init__()
        if latent_dim < 1:
            raise MapaError(f"a kde prior needs latent_dim >= 1, got {latent_dim}")
        if bandwidth is not None and not (math.isfinite(bandwidth) and bandwidth > 0):
            raise MapaError(f"--kde-bandwidth must be a positive number, got {bandwidth}")
        self.latent_dim, self.fixed_bandwidth = latent_dim, bandwidth
        self.register_buffer("atoms", torch.zeros(1, latent_dim))
        self.register_buffer("bandwidth", torch.tensor(1.0 if bandwidth is None else float(bandwidth)))

    def forward(self) -> Distribution:
        return _KernelDensity(self.atoms, self.bandwidth)

    def config(self) -> dict[str, Any]:
        return {"bandwidth": self.fixed_bandwidth}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        stored = state_dict.get(prefix + "atoms")
        if stored is not None:  # the number of atoms is the fitted codes', not the config's
            self.atoms = self.atoms.new_empty(stored.shape)
        super()._load_from_state_dict(state_dict, prefix, *args)

    @torch.no_grad()
    def fit(self, train: Tensor, held_out: Tensor, steps: int) -> int:
        """Keep ``train`` as the atoms and choose ``h`` on ``held_out`` with at most ``steps``
        evaluations of the held-out log-density; returns the evaluations used."""
        self.atoms = train.detach().clone()
        if self.fixed_bandwidth is not None:
            return 0
        n, dim = train.shape
        scott = float(train.std(0).mean().clamp_min(1e-6)) * n ** (-1.0 / (dim + 4))

        def score(log_h: float) -> float:
            value = float(_KernelDensity(self.atoms, train.new_tensor(math.exp(log_h))).log_prob(
                held_out).mean())
            return value if math.isfinite(value) else -math.inf

        grid = [math.log(scott) + 0.5 * i for i in range(-6, 7)]  # e^-3 … e^3 around Scott's rule
        scores = [score(g) for g in grid[: max(1, steps)]]
        used = len(scores)
        best = max(range(used), key=scores.__getitem__)
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, used - 1)]
        best_h, best_score = grid[best], scores[best]
        golden = (math.sqrt(5) - 1) / 2
        while used + 2 <= steps and hi - lo > 1e-3:  # golden-section search on the bracket
            a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
            sa, sb = score(a), score(b)
            used += 2
            for h, sh in ((a, sa), (b, sb)):
                if sh > best_score:
                    best_h, best_score = h, sh
            lo, hi = (lo, b) if sa >= sb else (a, hi)
        self.bandwidth.fill_(math.exp(best_h))
        return used


CODE_PRIORS.register(MixturePrior.kind, MixturePrior)
CODE_PRIORS.register(FlowPrior.kind, FlowPrior)
CODE_PRIORS.register(KernelDensityPrior.kind, KernelDensityPrior)


def build_code_prior(kind: str, latent_dim: int, **config: Any) -> CodePrior:
    """An unfitted prior of the given structure (``config``: the class's own arguments).

    >>> prior = build_code_prior("mixture", 2, components=3)
    >>> prior().event_shape, prior().log_prob(torch.zeros(5, 2)).shape
    (torch.Size([2]), torch.Size([5]))
    """
    prior_class = CODE_PRIORS[kind]
    try:
        return prior_class(latent_dim, **config)
    except TypeError as e:
        raise MapaError(f"bad {kind} prior config {config}: {e}") from None


def fit_code_prior(
    model: LatentVariableModel, x: Tensor, kind: str = "flow", steps: int = 2000, seed: int = 0,
    held_out: float = 0.1, **config: Any,
) -> tuple[LatentVariableModel, dict[str, Any]]:
    """A copy of a trained MAPA model whose prior is a density fitted to its codes ``g(x)``.

    ``x`` ``(N, D)`` are the training points whose codes define the empirical prior; a random
    ``held_out`` fraction of the codes is kept out of the fit (the flow's early stopping) and
    scores it. ``steps``: Adam steps (flow) or at most this many EM iterations (mixture);
    ``config``: the prior's structure (:func:`build_code_prior`). Encoder and decoder are
    unchanged. The caller's random state is left untouched.

    Diagnostics (mean log-densities of the codes, nats per code): ``prior_train_log_lik``,
    ``prior_held_out_log_lik``, and ``prior_held_out_log_lik_gaussian`` of one full-covariance
    Gaussian fitted to the same codes, the baseline the prior should beat.
    """
    if not isinstance(model.encoder, CodeEncoder):
        raise MapaError("a code prior applies to MAPA models (a deterministic encoder)")
    with torch.no_grad():
        codes = model.encoder(x)  # (N, L)
    if not bool(torch.isfinite(codes).all()):
        raise MapaError("the trained encoder gives non-finite codes; no prior can be fitted to them")
    devices = [codes.device] if codes.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(one_off_seed(seed))
        prior = build_code_prior(kind, codes.shape[1], **config).to(codes)
        order = torch.randperm(codes.shape[0], device=codes.device)
        n_held = round(held_out * codes.shape[0])
        train, held = codes[order[n_held:]], codes[order[:n_held]]
        if n_held == 0:
            held = train
        used = prior.fit(train, held, steps)
    new = copy.deepcopy(model)
    new.prior = prior.eval()
    new.requires_grad_(False)
    with torch.no_grad():
        p = new.prior()
        gauss = MultivariateNormal(train.mean(0), torch.atleast_2d(train.T.cov()))
        info = {
            "prior_kind": kind,
            "prior_fit_steps": used,
            "prior_train_log_lik": float(p.log_prob(train).mean()),
            "prior_held_out_log_lik": float(p.log_prob(held).mean()),
            "prior_held_out_log_lik_gaussian": float(gauss.log_prob(held).mean()),
        }
    return new, info
