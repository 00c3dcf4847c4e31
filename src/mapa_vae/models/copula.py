"""A parametric prior for MAPA's learned codes (paper App. C.3, docs/design.md §4).

After training, the codes ``z_n = g_ψ(x_n)`` are the atoms of an empirical prior. For a 1-D
latent the paper maps them to a standard normal through their empirical Gaussian copula, then
re-learns the networks around the new codes:

1. ``u_n = Φ⁻¹(rank(z_n) / N)`` (mid-ranks ``(r + ½) / N``, so no code maps to ±∞);
2. whiten: ``z*_n = (u_n - mean u) / std u``;
3. regress a new encoder ``g†`` onto ``z*`` (Eq. 39, mean-squared error);
4. fit a new decoder ``f†`` so that ``p(x | f†(g†(x_n)))`` matches ``p(x | f(g(x_n)))``
   (Eq. 40, the KL between the two likelihoods: for Gaussian noise, the squared error between
   decoder means over ``2σ²``).

Steps 3–4 are the paper's (``method="refit"``). With a 1-D latent there is an exact
alternative (``method="map"``, the default): the copula transform is a monotone map, so with
``h`` the increasing piecewise-linear map through the sorted pairs ``(z*_n, z_n)``, the new
networks are ``g† = h⁻¹ ∘ g`` and ``f† = f ∘ h``. They reproduce ``f(g(x_n))`` exactly at every
atom and interpolate the empirical prior between neighbouring atoms (linearly beyond the ends).
The refit can miss badly where ``f ∘ h`` is steep: on spiral-dots a 4000-step refit left
``KL[p(x | f(g(x))) ‖ p(x | f†(g†(x)))]`` at 114 nats per point, which the test KL then
measures instead of the bound.

The result is a :class:`~mapa_vae.models.LatentVariableModel` with a standard-normal prior,
which is evaluated and sampled exactly like a VAE.

For ``L > 1`` see :mod:`mapa_vae.models.code_priors`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import (
    kl_divergence,
)

from ..errors import MapaError
from ..registry import PRIOR_FITS
from ..seeds import one_off_seed
from .latent import CodeEncoder, LatentVariableModel, StandardNormal

__all__ = [
    "CopulaFit",
    "MonotoneMap",
    "copula_codes",
    "fit_copula_prior",
    "mapped_model",
]

PRIOR_FITS.register("map", "compose with the exact monotone copula map")
PRIOR_FITS.register("refit", "refit new networks (the paper's App. C.3)")


@dataclass(frozen=True)
class CopulaFit:
    """How well the re-learned networks reproduce the original model on the training data."""

    encoder_mse: float  # mean ‖z*_n - g†(x_n)‖²
    decoder_kl: float  # mean KL[p(x | f(g(x_n))) ‖ p(x | f†(g†(x_n)))], nats per point


def copula_codes(z: Tensor) -> Tensor:
    """Whitened empirical Gaussian copula of 1-D codes ``(N, 1) → (N, 1)`` (Eq. 36–37).

    >>> z = torch.tensor([[3.0], [-1.0], [10.0], [0.5]])
    >>> u = copula_codes(z)
    >>> bool((u.argsort(0) == z.argsort(0)).all()), abs(float(u.mean())) < 1e-6, round(float(u.std()), 6)
    (True, True, 1.0)
    """
    if z.ndim != 2 or z.shape[1] != 1:
        raise MapaError(f"the copula prior needs a 1-D latent, got codes of shape {tuple(z.shape)}")
    n = z.shape[0]
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[z[:, 0].argsort()] = torch.arange(n, dtype=torch.float64)
    u = torch.special.ndtri((ranks + 0.5) / n)
    return ((u - u.mean()) / u.std()).to(z.dtype)[:, None]


class MonotoneMap(torch.nn.Module):
    """The increasing piecewise-linear map through knots ``(a_j, b_j)``, ``(..., 1) → (..., 1)``.

    Linear beyond the first and last knots (continuing the end segments). The knots are
    buffers whose size is taken from the state dict on load, so a saved map reloads into
    ``MonotoneMap()``.

    >>> h = MonotoneMap(torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.0, 10.0, 12.0]))
    >>> h(torch.tensor([[0.5], [2.0], [4.0], [-1.0]])).flatten().tolist()
    [5.0, 11.0, 13.0, -10.0]
    """

    knots_in: Tensor
    knots_out: Tensor

    def __init__(self, knots_in: Tensor | None = None, knots_out: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("knots_in", torch.zeros(2) if knots_in is None else knots_in.clone())
        self.register_buffer("knots_out", torch.zeros(2) if knots_out is None else knots_out.clone())

    def forward(self, t: Tensor) -> Tensor:
        a, b = self.knots_in, self.knots_out
        j = torch.searchsorted(a, t[..., 0].contiguous()).clamp(1, a.numel() - 1)
        a0, a1, b0, b1 = a[j - 1], a[j], b[j - 1], b[j]
        w = (t[..., 0] - a0) / (a1 - a0).clamp_min(torch.finfo(a.dtype).tiny)
        return (b0 + w * (b1 - b0))[..., None]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("knots_in", "knots_out"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _fit(module: torch.nn.Module, loss_fn, steps: int, lr: float) -> None:
    """Full-batch Adam with a cosine schedule (the caller measures the fit afterwards)."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def fit_copula_prior(
    model: LatentVariableModel, x: Tensor, method: str = "map", steps: int = 4000,
    lr: float = 1e-3, seed: int = 0,
) -> tuple[LatentVariableModel, CopulaFit]:
    """Turn a trained MAPA model (deterministic encoder) into one with a ``N(0, 1)`` prior.

    ``x`` ``(N, D)`` are the training points whose codes define the empirical prior.
    ``method="map"`` composes the networks with the exact monotone copula map;
    ``method="refit"`` trains fresh networks of the same architecture (paper Eq. 39–40).
    """
    if not isinstance(model.encoder, CodeEncoder):
        raise MapaError("the copula prior applies to MAPA models (a deterministic encoder)")
    PRIOR_FITS[method]  # an unknown name is a one-line error
    torch.manual_seed(one_off_seed(seed))
    with torch.no_grad():
        codes = model.encoder(x)  # (N, 1)
        target_z = copula_codes(codes)  # (N, 1)
        target = model.decoder(codes)  # p(x | f(g(x_n))), batch (N,)
    if method == "map":
        new = mapped_model(model, codes, target_z)
    else:
        new = _refit(model, x, target_z, target, steps, lr)
    with torch.no_grad():
        enc_mse = float((new.encoder(x) - target_z).pow(2).sum(-1).mean())
        dec_kl = float(kl_divergence(target, new.decoder(new.encoder(x))).mean())
    return new, CopulaFit(encoder_mse=enc_mse, decoder_kl=dec_kl)


def mapped_model(model: LatentVariableModel, codes: Tensor | None = None,
                 target_z: Tensor | None = None) -> LatentVariableModel:
    """``g† = h⁻¹ ∘ g``, ``f† = f ∘ h`` with ``h`` through the sorted ``(z*_n, z_n)``.

    Without codes, an empty map of the right structure (for loading a saved model).
    """
    if codes is None or target_z is None:
        h, h_inv = MonotoneMap(), MonotoneMap()
    else:
        order = codes[:, 0].argsort()
        z_sorted, star_sorted = codes[order, 0], target_z[order, 0]
        h, h_inv = MonotoneMap(star_sorted, z_sorted), MonotoneMap(z_sorted, star_sorted)
    new = copy.deepcopy(model)
    assert isinstance(new.encoder, CodeEncoder)
    new.encoder = CodeEncoder(torch.nn.Sequential(new.encoder.net, h_inv))
    new.decoder.net = torch.nn.Sequential(h, new.decoder.net)
    new.prior = StandardNormal(model.latent_dim).to(next(model.parameters()).dtype)
    return new.requires_grad_(False)


def _refit(model: LatentVariableModel, x: Tensor, target_z: Tensor, target, steps: int,
           lr: float) -> LatentVariableModel:
    """Fresh ``g†`` regressed onto ``z*`` (Eq. 39), then ``f†`` by the likelihood KL (Eq. 40)."""
    new = copy.deepcopy(model)
    for m in new.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    new.prior = StandardNormal(model.latent_dim).to(target_z.dtype)
    new.requires_grad_(True)
    _fit(new.encoder, lambda: (new.encoder(x) - target_z).pow(2).sum(-1).mean(), steps, lr)
    with torch.no_grad():
        z_dagger = new.encoder(x)
    new.encoder.requires_grad_(False)
    _fit(new.decoder, lambda: kl_divergence(target, new.decoder(z_dagger)).mean(), steps, lr)
    return new.requires_grad_(False)
