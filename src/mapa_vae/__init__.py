"""mapa-vae: train deep latent-variable models with MAPA, beside VAE and IWAE baselines.

The sub-packages follow the paper: :mod:`~mapa_vae.data` (the ground-truth curves, images, a
user's files), :mod:`~mapa_vae.kernels` and :mod:`~mapa_vae.inference` (the posterior over
indices of Eq. 8 — exact, approximate, cached — and the bounds, one class each),
:mod:`~mapa_vae.models` (networks, likelihoods, priors), :mod:`~mapa_vae.methods` (what each
method trains and how it ends), :mod:`~mapa_vae.training` (the loop, runs, torchrun),
:mod:`~mapa_vae.evaluation` (quadrature, importance sampling, test KL) and
:mod:`~mapa_vae.experiments` (compare, reproduce, figures, report); :mod:`~mapa_vae.config` holds
the one training config and :mod:`~mapa_vae.registry` the registry of every named choice.
"""

from . import _startup
from .config import TrainConfig
from .data.dataset import Dataset, make_ground_truth_data
from .data.files import check_array, load_array
from .data.groundtruth import GROUND_TRUTHS, GroundTruth, ground_truth
from .data.images import IMAGE_DATASETS, digits, image_shape, load_image_dataset, mnist1d, sprites
from .data.loading import load_dataset
from .errors import MapaError
from .evaluation.likelihood import (
    KLEstimate,
    importance_log_likelihood,
    log_likelihood,
    quadrature_log_likelihood,
    test_kl,
)
from .evaluation.mixture import mixture_proposal_log_likelihood
from .evaluation.sbn import exact_log_likelihood, sbn_log_likelihood
from .experiments.compare import compare
from .experiments.reproduce import reproduce
from .inference.cache import cached_posterior
from .inference.engines import build_posterior, concat_rows
from .inference.exact import compute_posterior, ground_truth_posterior
from .inference.gp_bound import DoublyStochasticGPBound
from .inference.neighbours import IndexParams, NeighbourIndex
from .inference.objectives import ELBO, IWAE, MAPA, Autoencoder, Bound, EmpiricalLogLikelihood, Objective
from .inference.posterior import MapaPosterior, uniform_posterior
from .inference.score_function import NVIL, VIMCO, Reinforce
from .kernels import BernoulliKernel, GaussianKernel, Kernel
from .methods.base import Method
from .models.code_priors import CodePrior, FlowPrior, MixturePrior, build_code_prior, fit_code_prior
from .models.copula import copula_codes, fit_copula_prior
from .models.gp import GPNet, GPPredictiveLikelihood, build_vae_dgp
from .models.latent import CodeEncoder, Decoder, GaussianEncoder, LatentVariableModel, Prior, StandardNormal
from .models.likelihoods import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    GaussianLikelihood,
    Likelihood,
)
from .models.networks import MLP, ConvDecoderNet, ConvEncoderNet, build_networks
from .models.sbn import SBN
from .registry import METHODS
from .training.loop import TrainResult, train
from .training.runs import Run, load_run

_startup.imported()  # Ctrl-C from here on: the command line's own handling

__version__ = "0.1.0"

__all__ = [
    "ELBO",
    "GROUND_TRUTHS",
    "IMAGE_DATASETS",
    "IWAE",
    "MAPA",
    "METHODS",
    "MLP",
    "NVIL",
    "SBN",
    "VIMCO",
    "Autoencoder",
    "BernoulliKernel",
    "BernoulliLikelihood",
    "Bound",
    "CodeEncoder",
    "CodePrior",
    "ContinuousBernoulliLikelihood",
    "ConvDecoderNet",
    "ConvEncoderNet",
    "Dataset",
    "Decoder",
    "DoublyStochasticGPBound",
    "EmpiricalLogLikelihood",
    "FlowPrior",
    "GPNet",
    "GPPredictiveLikelihood",
    "GaussianEncoder",
    "GaussianKernel",
    "GaussianLikelihood",
    "GroundTruth",
    "IndexParams",
    "KLEstimate",
    "Kernel",
    "LatentVariableModel",
    "Likelihood",
    "MapaError",
    "MapaPosterior",
    "Method",
    "MixturePrior",
    "NeighbourIndex",
    "Objective",
    "Prior",
    "Reinforce",
    "Run",
    "StandardNormal",
    "TrainConfig",
    "TrainResult",
    "build_code_prior",
    "build_networks",
    "build_posterior",
    "build_vae_dgp",
    "cached_posterior",
    "check_array",
    "compare",
    "compute_posterior",
    "concat_rows",
    "copula_codes",
    "digits",
    "exact_log_likelihood",
    "fit_code_prior",
    "fit_copula_prior",
    "ground_truth",
    "ground_truth_posterior",
    "image_shape",
    "importance_log_likelihood",
    "load_array",
    "load_dataset",
    "load_image_dataset",
    "load_run",
    "log_likelihood",
    "make_ground_truth_data",
    "mixture_proposal_log_likelihood",
    "mnist1d",
    "quadrature_log_likelihood",
    "reproduce",
    "sbn_log_likelihood",
    "sprites",
    "test_kl",
    "train",
    "uniform_posterior",
]
