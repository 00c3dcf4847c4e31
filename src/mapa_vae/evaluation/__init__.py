"""Evaluation against the ground truth: quadrature, importance sampling, the referee (a
proposal adapted to each model), the paper's mixture-proposal evaluator, and the test KL.
"""

from __future__ import annotations

from .likelihood import (
    DEFAULT_GRID,
    KLEstimate,
    importance_log_likelihood,
    log_likelihood,
    quadrature_log_likelihood,
    test_kl,
)
from .mixture import (
    MixtureProposal,
    ReparameterizedMixture,
    mixture_proposal_log_likelihood,
)
from .referee import (
    INFLATIONS,
    WIDTHS,
    Candidate,
    Estimate,
    Proposal,
    Referee,
    estimate_log_likelihood,
    referee_log_likelihood,
)
from .sbn import (
    MAX_EXACT_UNITS,
    SBNLogLikelihood,
    all_states,
    exact_bound,
    exact_log_likelihood,
    sbn_log_likelihood,
)

__all__ = [
    "DEFAULT_GRID",
    "INFLATIONS",
    "MAX_EXACT_UNITS",
    "WIDTHS",
    "Candidate",
    "Estimate",
    "KLEstimate",
    "MixtureProposal",
    "Proposal",
    "Referee",
    "ReparameterizedMixture",
    "SBNLogLikelihood",
    "all_states",
    "estimate_log_likelihood",
    "exact_bound",
    "exact_log_likelihood",
    "importance_log_likelihood",
    "log_likelihood",
    "mixture_proposal_log_likelihood",
    "quadrature_log_likelihood",
    "referee_log_likelihood",
    "sbn_log_likelihood",
    "test_kl",
]
