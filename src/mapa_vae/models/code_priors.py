"""Priors fitted to MAPA's codes when the latent has more than one dimension (docs/design.md §4, §8).

For ``L > 1`` no exact map to ``N(0, I)`` exists (the copula of :mod:`mapa_vae.models.copula` is
1-D); instead a density is fitted to the codes ``z_n = g(x_n)`` and becomes the model's prior,
the networks unchanged (:func:`fit_code_prior`): a full-covariance Gaussian mixture
(:class:`MixturePrior`, fitted by EM) or a neural spline flow on standardized codes
(:class:`FlowPrior`, zuko, fitted by maximum likelihood with early stopping on held-out codes).
Both are :class:`CodePrior` modules whose state is tensors only, so :func:`build_code_prior`
rebuilds an empty one from its config for loading a checkpoint.
"""

from __future__ import annotations

import copy
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
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
from .latent import CodeEncoder, LatentVariableModel, Prior

__all__ = ["CodePrior", "FlowPrior", "MixturePrior", "build_code_prior", "fit_code_prior"]


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


class FlowPrior(CodePrior):
    """``p(z) = p_u((z - m) / s) / Π_l s_l``: a neural spline flow ``p_u`` on standardized codes.

    ``m``, ``s`` ``(L,)`` are buffers set to the codes' mean and standard deviation at fit time
    (zuko's splines act on ``[-5, 5]`` and are the identity outside, so the flow needs
    standardized inputs); ``p_u`` is ``zuko.flows.NSF`` with ``transforms`` autoregressive
    rational-quadratic spline layers of ``bins`` bins and hypernetworks of widths ``hidden``.
    Fitted by maximum likelihood (Adam), keeping the parameters with the best held-out
    log-likelihood, checked ``50`` times over ``steps`` and stopping after ``patience``
    checks without improvement.
    """

    kind = "flow"
    loc: Tensor
    scale: Tensor

    def __init__(self, latent_dim: int, transforms: int = 3, hidden: Sequence[int] = (64, 64),
                 bins: int = 8) -> None:
        super().__init__()
        if latent_dim < 1 or transforms < 1 or bins < 1:
            raise MapaError(f"a flow prior needs latent_dim, transforms, bins >= 1, got {latent_dim}, "
                            f"{transforms}, {bins}")
        self.latent_dim, self.transforms, self.hidden, self.bins = (
            latent_dim, transforms, tuple(hidden), bins)
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))
        self.flow = zuko.flows.NSF(latent_dim, transforms=transforms, hidden_features=self.hidden,
                                   bins=bins)

    def forward(self) -> Distribution:
        return TransformedDistribution(self.flow(), AffineTransform(self.loc, self.scale, event_dim=1))

    def config(self) -> dict[str, Any]:
        return {"transforms": self.transforms, "hidden": list(self.hidden), "bins": self.bins}

    @torch.enable_grad()  # callers may hold no_grad (finalizing a trained model)
    def fit(self, train: Tensor, held_out: Tensor, steps: int, lr: float = 1e-3,
            batch_size: int = 2048, patience: int = 10) -> int:
        with torch.no_grad():
            for buffer, value in zip((self.loc, self.scale), _standardization(train), strict=True):
                buffer.copy_(value)
        opt = torch.optim.Adam(self.flow.parameters(), lr=lr)
        every = max(1, steps // 50)
        best, best_state, stale, step = -math.inf, copy.deepcopy(self.state_dict()), 0, 0
        while step < steps and stale < patience:
            rows = train if train.shape[0] <= batch_size else train[
                torch.randint(train.shape[0], (batch_size,), device=train.device)]
            loss = -self().log_prob(rows).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % every == 0 or step == steps:
                with torch.no_grad():
                    score = float(self().log_prob(held_out).mean())
                if score > best:
                    best, best_state, stale = score, copy.deepcopy(self.state_dict()), 0
                else:
                    stale += 1
        self.load_state_dict(best_state)
        return step


CODE_PRIORS.register(MixturePrior.kind, MixturePrior)
CODE_PRIORS.register(FlowPrior.kind, FlowPrior)


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
        torch.manual_seed(seed)
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
