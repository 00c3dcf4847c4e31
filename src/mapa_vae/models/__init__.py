"""Models: networks, likelihoods, encoders, decoders and priors; every stochastic piece
returns a ``torch.distributions.Distribution``.
"""

from __future__ import annotations

from .code_priors import (
    CodePrior,
    FlowPrior,
    MixturePrior,
    build_code_prior,
    fit_code_prior,
)
from .copula import (
    CopulaFit,
    MonotoneMap,
    copula_codes,
    fit_copula_prior,
    mapped_model,
)
from .gp import (
    GPLayer,
    GPNet,
    GPPredictiveLikelihood,
    build_vae_dgp,
)
from .latent import (
    CodeEncoder,
    Decoder,
    GaussianEncoder,
    LatentVariableModel,
    Prior,
    StandardNormal,
)
from .likelihoods import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    GaussianLikelihood,
    Likelihood,
    make_likelihood,
)
from .networks import (
    ConvDecoderNet,
    ConvEncoderNet,
    build_networks,
)
from .sbn import (
    SBN,
    BernoulliLayer,
    BernoulliPrior,
    NVILBaseline,
    Trace,
)

__all__ = [
    "SBN",
    "BernoulliLayer",
    "BernoulliLikelihood",
    "BernoulliPrior",
    "CodeEncoder",
    "CodePrior",
    "ContinuousBernoulliLikelihood",
    "ConvDecoderNet",
    "ConvEncoderNet",
    "CopulaFit",
    "Decoder",
    "FlowPrior",
    "GPLayer",
    "GPNet",
    "GPPredictiveLikelihood",
    "GaussianEncoder",
    "GaussianLikelihood",
    "LatentVariableModel",
    "Likelihood",
    "MixturePrior",
    "MonotoneMap",
    "NVILBaseline",
    "Prior",
    "StandardNormal",
    "Trace",
    "build_code_prior",
    "build_networks",
    "build_vae_dgp",
    "copula_codes",
    "fit_code_prior",
    "fit_copula_prior",
    "make_likelihood",
    "mapped_model",
]
