"""Inference: MAPA's kernels and index posterior (exact, approximate, cached) and the
objectives, one class per bound or estimator.
"""

from __future__ import annotations

from .cache import (
    cached_posterior,
)
from .engines import (
    AUTO_EXACT_FLOPS,
    AUTO_EXACT_POINTS,
    build_posterior,
    cache_params,
    concat_rows,
    resolve_engine,
)
from .exact import (
    blocked_top_k,
    compute_posterior,
    ground_truth_posterior,
)
from .gp_bound import (
    DoublyStochasticGPBound,
    gp_data_bound,
)
from .neighbours import (
    IndexParams,
    NeighbourIndex,
)
from .objectives import (
    ELBO,
    IWAE,
    MAPA,
    Autoencoder,
    Bound,
    EmpiricalLogLikelihood,
    Objective,
    PassCounter,
)
from .posterior import (
    MapaPosterior,
    default_top_k,
    resolve_top_k,
    uniform_posterior,
)
from .score_function import (
    NVIL,
    VIMCO,
    Reinforce,
    leave_one_out_bounds,
    score_function_objective,
)
from .tails import (
    PerPointTail,
    SharedTail,
    TailProposal,
    make_tail,
)

__all__ = [
    "AUTO_EXACT_FLOPS",
    "AUTO_EXACT_POINTS",
    "ELBO",
    "IWAE",
    "MAPA",
    "NVIL",
    "VIMCO",
    "Autoencoder",
    "Bound",
    "DoublyStochasticGPBound",
    "EmpiricalLogLikelihood",
    "IndexParams",
    "MapaPosterior",
    "NeighbourIndex",
    "Objective",
    "PassCounter",
    "PerPointTail",
    "Reinforce",
    "SharedTail",
    "TailProposal",
    "blocked_top_k",
    "build_posterior",
    "cache_params",
    "cached_posterior",
    "compute_posterior",
    "concat_rows",
    "default_top_k",
    "gp_data_bound",
    "ground_truth_posterior",
    "leave_one_out_bounds",
    "make_tail",
    "resolve_engine",
    "resolve_top_k",
    "score_function_objective",
    "uniform_posterior",
]
