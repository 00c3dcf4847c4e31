"""Evaluation against the ground truth: quadrature, importance sampling, the paper's
mixture-proposal evaluator, and the test KL.
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

__all__ = [
    "DEFAULT_GRID",
    "KLEstimate",
    "MixtureProposal",
    "ReparameterizedMixture",
    "importance_log_likelihood",
    "log_likelihood",
    "mixture_proposal_log_likelihood",
    "quadrature_log_likelihood",
    "test_kl",
]
