"""MAPA: a deterministic encoder trained by the MAPA bound over a fixed index posterior (Eq. 10).

The posterior ``q(i | n)`` is chosen by name from :data:`~mapa_vae.registry.POSTERIORS`: the
kernel posterior of Eq. 8 (cached on disk), or the paper's ablations, the true posterior of the
ground-truth empiricalized model (MAPA-GT, Eq. 7) and the uniform one (MAPA-naive). After
training, a parametric prior is fitted to the codes (App. C.3): the copula prior for ``L = 1``,
a flow or mixture for ``L > 1``.

Two entries are not fixed tables but trained proposals, :class:`LearnedPosterior`
(``learned-nvil``, ``learned-vimco``; the learned-proposal test): the model then carries the
proposal's parameters as its ``index_proposal`` submodule (so the loop's optimizer trains them)
and the objective is :class:`~mapa_vae.inference.learned_proposal.LearnedMAPA`, the same bound
with ``q_φ(i | x_n)`` in place of the kernel's ``q(i | n)``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from ..config import TrainConfig
from ..data.dataset import Dataset
from ..data.images import IMAGE_DATASETS
from ..errors import MapaError
from ..inference.cache import cached_posterior
from ..inference.exact import ground_truth_posterior
from ..inference.learned_proposal import LearnedMAPA
from ..inference.objectives import MAPA, EmpiricalLogLikelihood, Objective
from ..inference.posterior import MapaPosterior, leave_one_out, uniform_posterior
from ..inference.score_function import SIGNALS
from ..inference.tails import make_tail
from ..kernels import BernoulliKernel, calibrate_rho
from ..models.code_priors import build_code_prior, fit_code_prior
from ..models.copula import fit_copula_prior, mapped_model
from ..models.index_proposal import IndexProposalNet
from ..models.latent import CodeEncoder, Decoder, LatentVariableModel, StandardNormal
from ..models.likelihoods import Likelihood
from ..registry import METHODS, POSTERIORS
from .base import Architecture, Method

__all__ = ["IMAGE_DEFAULTS", "LearnedPosterior", "MapaMethod", "PosteriorFactory"]

IMAGE_DEFAULTS: dict[str, Any] = {"samples": 0, "k": 1, "batch_size": 100, "lr": 1e-3}
"""MAPA's settings for binary images (a Bernoulli likelihood), by measurement
(``benchmarks/time_to_quality.py`` and ``benchmarks/image_settings.py``, docs/results.md
"Images: time to quality and MAPA's settings"): ``k = 1, S = 0``, the limit of Eq. 10 that the
paper names the autoencoder loss (Eq. 14), batch 100, Adam 1e-3. On images the kernel posterior
is a point mass on ``n`` itself (``q(n | n) ≥ 1 - 2.4e-7`` on MNIST), so ``B_n(1)`` is the image
and the tail is worth 0.004 nats at the median point; a tail draw (S = 1) costs a second network
pass per point. At 15 CPU minutes on all 50 000 training images, S = 0 with Adam 3e-3 scored
above S = 1, k = 1 at every checkpoint (MNIST by 2.9-4.3 nats, sprites-binary by 1.5-2.6), and
Adam 1e-3 above 3e-3 (MNIST by 2.0-2.9, -121.61 against -123.86 at 900 s; sprites by 1.6-3.8,
-32.88 against -36.21; +3.7 ± 0.3 paired at 180 s on sprites): above the VAE at every
checkpoint on both (-123.67 and -34.33 at 900 s). Its first epoch is far worse (-202 against
-169 on MNIST); by 5 epochs it has caught up. Earlier, S = 1, k = 1 had beaten S = 20, k = 2
(+2.8 nats paired at 60 s on MNIST 10 000), which with Adam 3e-3 had beaten Adam 1e-3 by 9 nats
at 60 s; batch 50 was level. ``train`` keeps the best weights by validation, which guards the
small sets where cheap epochs overfit (1000 digits). ``mapa-vae train`` uses each one that no
flag sets (``--samples 1`` keeps a tail draw); the paper's curves (Gaussian) keep the
:class:`~mapa_vae.config.TrainConfig` defaults."""

PosteriorFactory = Callable[[LatentVariableModel, Tensor, TrainConfig, "Dataset | None"], MapaPosterior]
"""``(model, train, cfg, data) -> q(i | n)``: how a :data:`POSTERIORS` entry builds its table."""


@POSTERIORS.register("kernel")
def kernel_posterior(model: LatentVariableModel, train: Tensor, cfg: TrainConfig,
                     data: Dataset | None) -> MapaPosterior:
    """MAPA's own ``q(i | n)`` (Eq. 8): the kernel matched to the likelihood, cached on disk;
    with ``--kernel-perplexity``, the Bernoulli kernel whose ``ρ`` gives that median perplexity."""
    kernel = model.decoder.likelihood.kernel()
    if cfg.kernel_perplexity is not None:
        if not isinstance(kernel, BernoulliKernel):
            raise MapaError(f"--kernel-perplexity calibrates the Bernoulli kernel; the "
                            f"{model.decoder.likelihood.name} likelihood has the {kernel.name} kernel")
        if cfg.kernel_perplexity >= train.shape[0]:
            raise MapaError(f"--kernel-perplexity {cfg.kernel_perplexity:g} must be below the "
                            f"number of training points, {train.shape[0]}")
        kernel = BernoulliKernel(calibrate_rho(train, cfg.kernel_perplexity, seed=cfg.seed))
    return cached_posterior(train, kernel, cfg.cache_path, cfg.top_k, device=train.device,
                            engine=cfg.posterior_engine)[0]  # computed where training runs


@POSTERIORS.register("kernel-loo")
def kernel_loo_posterior(model: LatentVariableModel, train: Tensor, cfg: TrainConfig,
                         data: Dataset | None) -> MapaPosterior:
    """The kernel posterior with each point's own index removed (:func:`leave_one_out`):
    ``B_n(k)`` is the ``k`` nearest other points and the tail the rest."""
    return leave_one_out(kernel_posterior(model, train, cfg, data))


@POSTERIORS.register("uniform")
def naive_posterior(model: LatentVariableModel, train: Tensor, cfg: TrainConfig,
                    data: Dataset | None) -> MapaPosterior:
    """MAPA-naive: ``q(i | n) = 1 / N``."""
    return uniform_posterior(train.shape[0])


@POSTERIORS.register("ground-truth")
def true_posterior(model: LatentVariableModel, train: Tensor, cfg: TrainConfig,
                   data: Dataset | None) -> MapaPosterior:
    """MAPA-GT (Eq. 7): the posterior of the empiricalized ground-truth model."""
    if data is None or data.truth is None or data.z_train is None:
        raise MapaError("--posterior ground-truth (MAPA-GT) needs a built-in curve (ground-truth "
                        "decoder and codes)")
    return ground_truth_posterior(data.train, data.z_train, data.truth.decoder)


@dataclass(frozen=True)
class LearnedPosterior:
    """A :data:`POSTERIORS` entry whose ``q_φ(i | x_n)`` is trained with the model by ``signal``
    (``nvil`` or ``vimco``, :mod:`~mapa_vae.inference.learned_proposal`). Called like the other
    entries it returns the kernel table, whose top entries are the candidates it re-ranks."""

    signal: str

    def __call__(self, model: LatentVariableModel, train: Tensor, cfg: TrainConfig,
                 data: Dataset | None) -> MapaPosterior:
        return kernel_posterior(model, train, cfg, data)


for _signal in SIGNALS:  # learned-nvil, learned-vimco
    POSTERIORS.register(f"learned-{_signal}", LearnedPosterior(_signal))


class MapaMethod(Method):
    """MAPA: a deterministic encoder and the MAPA bound over the index posterior; after
    training, the copula prior (or a code prior for ``L > 1``) gives the generative model."""

    name = "mapa"
    uses_k = True

    def build(self, arch: Architecture, likelihood: Likelihood, cfg: TrainConfig) -> LatentVariableModel:
        encoder_net, decoder_net = arch.networks()
        enc = CodeEncoder(encoder_net(arch.latent_dim))  # built first
        model = LatentVariableModel(enc, Decoder(decoder_net(), likelihood), StandardNormal(arch.latent_dim))
        if isinstance(POSTERIORS[cfg.posterior], LearnedPosterior):  # φ trains with the model
            model.add_module("index_proposal", IndexProposalNet(arch.data_dim))
        return model

    def objective(self, model: LatentVariableModel, train: Tensor, cfg: TrainConfig,
                  data: Dataset | None = None) -> Objective:
        entry = POSTERIORS[cfg.posterior]
        posterior = entry(model, train, cfg, data)
        posterior.check_budget(cfg.mapa_k, cfg.samples)
        if isinstance(entry, LearnedPosterior):
            if cfg.tail != "per-point":
                raise MapaError(f"--posterior {cfg.posterior} draws each point's own tail; "
                                f"--tail {cfg.tail} is for the fixed tables")
            return LearnedMAPA(posterior.to(train.device), train, cfg.mapa_k, cfg.samples,
                               entry.signal)
        return MAPA(posterior.to(train.device), train, cfg.mapa_k, cfg.samples,
                    tail=make_tail(cfg.tail))

    def resolve(self, cfg: TrainConfig, given: Collection[str]) -> tuple[TrainConfig, str | None]:
        """On binary images, :data:`IMAGE_DEFAULTS` for each knob not in ``given``.

        >>> cfg, note = METHODS["mapa"].resolve(TrainConfig(data="digits-binary", lr=0.01), {"lr"})
        >>> cfg.lr, cfg.samples == IMAGE_DEFAULTS["samples"], note.startswith("MAPA on binary images")
        (0.01, True, True)
        >>> METHODS["mapa"].resolve(TrainConfig(data="circle"), set())[1] is None
        True
        """
        if not _binary_images(cfg):
            return cfg, None
        chosen = {k: v for k, v in IMAGE_DEFAULTS.items() if k not in given}
        if not chosen:
            return cfg, None
        shown = ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in chosen.items())
        return replace(cfg, **chosen), (f"MAPA on binary images: using the measured image settings "
                                        f"{shown} (flags override each)")

    def validation_log_likelihood(self, model: LatentVariableModel, val: Tensor, train: Tensor,
                                  cfg: TrainConfig) -> float:
        # The model being trained is the empiricalized one; score it exactly (Eq. 6).
        return float(EmpiricalLogLikelihood(train)(model, val).value.mean())

    def finalize(self, model: LatentVariableModel, train: Tensor,
                 cfg: TrainConfig) -> tuple[LatentVariableModel, dict[str, Any]]:
        if model.latent_dim > 1:
            return fit_code_prior(model, train, kind=cfg.code_prior, steps=cfg.code_prior_steps,
                                  seed=cfg.seed, **_code_prior_config(cfg))
        final, fit = fit_copula_prior(model, train, method=cfg.prior_fit, steps=cfg.prior_steps,
                                      seed=cfg.seed)
        return final, {"prior_encoder_mse": fit.encoder_mse, "prior_decoder_kl": fit.decoder_kl}

    def build_final(self, arch: Architecture, likelihood: Likelihood,
                    cfg: TrainConfig) -> LatentVariableModel:
        model = self.build(arch, likelihood, cfg)
        if arch.latent_dim > 1:
            model.prior = build_code_prior(cfg.code_prior, arch.latent_dim, **_code_prior_config(cfg))
            return model
        return mapped_model(model) if cfg.prior_fit == "map" else model


METHODS.register(MapaMethod())


def _binary_images(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` trains a Bernoulli likelihood on images: a binarized-MNIST ``.npz`` or a
    built-in image set, with ``--likelihood bernoulli`` or that data set's own Bernoulli."""
    npz = cfg.data.lower().endswith(".npz")
    own = "bernoulli" if npz else getattr(IMAGE_DATASETS.get(cfg.data), "likelihood", None)
    return (npz or cfg.data in IMAGE_DATASETS) and (cfg.likelihood or own) == "bernoulli"


def _code_prior_config(cfg: TrainConfig) -> dict[str, Any]:
    """The chosen code prior's constructor arguments."""
    if cfg.code_prior == "mixture":
        return {"components": cfg.prior_components}
    if cfg.code_prior == "kde":
        return {"bandwidth": cfg.kde_bandwidth}
    return {"transforms": cfg.flow_transforms, "hidden": cfg.flow_hidden}
