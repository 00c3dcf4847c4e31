"""The learned index proposal ``q_φ(i | x_n)`` over MAPA's atoms (the learned-proposal test).

MAPA's ``q(i | n)`` is fixed by a kernel (paper Eq. 8). :class:`IndexProposalNet` holds the
parameters ``φ`` of an amortized alternative, trained alongside the encoder and decoder: a
re-ranking of each point's candidate atoms ``C_n`` (the kernel table's first ``C`` entries),

    s_φ(n, i) = a · log q_ker(i | n) + m_φ(x_n, x_i − x_n),     π_φ(i | n) = softmax_{i∈C_n} s_φ(n, i),

with ``a`` a learned scalar (1 at the start) and ``m_φ`` a small MLP whose last layer starts at
zero, so that training starts from the kernel's own ranking. The proposal itself, with its
uniform floor over all ``N`` atoms, is assembled by
:class:`~mapa_vae.inference.learned_proposal.LearnedMAPA`. The network also carries NVIL's
input-dependent baseline ``b_ψ(x_n)`` and the running mean and variance of the centred
learning signal (buffers, so checkpoints carry them).

It lives on the MAPA model as the submodule ``index_proposal``
(:meth:`~mapa_vae.methods.mapa.MapaMethod.build`), so the training loop's one optimizer over
``model.parameters()`` trains it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .networks import MLP

__all__ = ["IndexProposalNet"]


class IndexProposalNet(nn.Module):
    """``φ``: the candidate scorer ``s_φ`` and NVIL's baseline ``b_ψ`` (see the module doc)."""

    mean: Tensor
    var: Tensor

    def __init__(self, data_dim: int, hidden: Sequence[int] = (32, 32)) -> None:
        super().__init__()
        self.kernel_weight = nn.Parameter(torch.ones(()))
        self.scorer = MLP(2 * data_dim, 1, tuple(hidden), "tanh")
        last = self.scorer[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.baseline = MLP(data_dim, 1, tuple(hidden), "tanh")
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.ones(()))

    def forward(self, x: Tensor, candidates: Tensor, log_kernel: Tensor) -> Tensor:
        """Scores ``s_φ(n, i)`` ``(B, C)`` of candidates ``x_i`` ``(B, C, D)`` for points ``x``
        ``(B, D)`` whose kernel log-probabilities are ``log_kernel`` ``(B, C)``."""
        here = x[:, None, :].expand_as(candidates)
        pair = torch.cat([here, candidates - here], -1)  # (B, C, 2D)
        return self.kernel_weight * log_kernel + self.scorer(pair)[..., 0]

    def baseline_value(self, x: Tensor) -> Tensor:
        """NVIL's baseline ``b_ψ(x_n)`` ``(B,)``."""
        return self.baseline(x)[..., 0]
