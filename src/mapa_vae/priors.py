"""A parametric prior for MAPA's learned codes (paper App. C.3, SPEC §4).

After training, the codes ``z_n = g_ψ(x_n)`` are the atoms of an empirical prior. For a 1-D
latent the paper maps them to a standard normal through their empirical Gaussian copula, then
re-learns the networks around the new codes:

1. ``u_n = Φ⁻¹(rank(z_n) / N)`` (mid-ranks ``(r + ½) / N``, so no code maps to ±∞);
2. whiten: ``z*_n = (u_n - mean u) / std u``;
3. regress a new encoder ``g†`` onto ``z*`` (Eq. 39, mean-squared error);
4. fit a new decoder ``f†`` so that ``p(x | f†(g†(x_n)))`` matches ``p(x | f(g(x_n)))``
   (Eq. 40, the KL between the two likelihoods: for Gaussian noise, the squared error between
   decoder means over ``2σ²``).

The result is a :class:`~mapa_vae.models.LatentVariableModel` with a standard-normal prior,
which is evaluated and sampled exactly like a VAE.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import kl_divergence

from .models import CodeEncoder, LatentVariableModel, StandardNormal
from .storage import MapaError

__all__ = ["CopulaFit", "copula_codes", "fit_copula_prior"]


@dataclass(frozen=True)
class CopulaFit:
    """How well the re-learned networks reproduce the original model on the training data."""

    encoder_mse: float  # mean ‖z*_n - g†(x_n)‖²
    decoder_kl: float  # mean KL[p(x | f(g(x_n))) ‖ p(x | f†(g†(x_n)))], nats per point


def copula_codes(z: Tensor) -> Tensor:
    """Whitened empirical Gaussian copula of 1-D codes ``(N, 1) → (N, 1)`` (Eq. 36–37).

    >>> z = torch.tensor([[3.0], [-1.0], [10.0], [0.5]])
    >>> u = copula_codes(z)
    >>> bool((u.argsort(0) == z.argsort(0)).all()), round(float(u.mean()), 6), round(float(u.std()), 6)
    (True, 0.0, 1.0)
    """
    if z.ndim != 2 or z.shape[1] != 1:
        raise MapaError(f"the copula prior needs a 1-D latent, got codes of shape {tuple(z.shape)}")
    n = z.shape[0]
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[z[:, 0].argsort()] = torch.arange(n, dtype=torch.float64)
    u = torch.special.ndtri((ranks + 0.5) / n)
    return ((u - u.mean()) / u.std()).to(z.dtype)[:, None]


def _fit(module: torch.nn.Module, loss_fn, steps: int, lr: float) -> float:
    """Full-batch Adam with a cosine schedule; returns the final loss."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return float(loss_fn())


def fit_copula_prior(
    model: LatentVariableModel, x: Tensor, steps: int = 4000, lr: float = 1e-3, seed: int = 0
) -> tuple[LatentVariableModel, CopulaFit]:
    """Turn a trained MAPA model (deterministic encoder) into one with a ``N(0, 1)`` prior.

    ``x`` ``(N, D)`` are the training points whose codes define the empirical prior. The new
    networks have the same architecture as the old ones and are trained from a fresh start.
    """
    if not isinstance(model.encoder, CodeEncoder):
        raise MapaError("the copula prior applies to MAPA models (a deterministic encoder)")
    torch.manual_seed(seed)
    with torch.no_grad():
        target_z = copula_codes(model.encoder(x))  # (N, 1)
        target = model.decoder(model.encoder(x))  # p(x | f(g(x_n))), batch (N,)
    new = copy.deepcopy(model)
    for m in new.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    new.prior = StandardNormal(model.latent_dim).to(target_z.dtype)
    new.requires_grad_(True)
    enc_mse = _fit(new.encoder, lambda: (new.encoder(x) - target_z).pow(2).sum(-1).mean(), steps, lr)
    with torch.no_grad():
        z_dagger = new.encoder(x)
    new.encoder.requires_grad_(False)
    dec_kl = _fit(
        new.decoder, lambda: kl_divergence(target, new.decoder(z_dagger)).mean(), steps, lr
    )
    new.requires_grad_(False)
    return new, CopulaFit(encoder_mse=enc_mse, decoder_kl=dec_kl)
