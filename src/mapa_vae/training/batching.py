"""An epoch's batches: random, or local (points near each other under the kernel in one batch).

A batching is a function ``(x, batch_size, generator) -> list of index tensors`` registered in
:data:`~mapa_vae.registry.BATCHINGS`; ``x`` is the training data ``(N, D)`` and the result is
a **partition** of ``0..N-1`` into batches of ``batch_size`` (the last one may be smaller),
visited in random order and drawn afresh every epoch from ``generator`` (the global torch RNG
when ``None``, so that a resumed run draws the same batches).

Why locality: MAPA's forward-pass reuse runs the networks once per *unique* atom that the
batch's top-``k`` sets ``B_n(k)`` and tail draws touch (Eq. 10, docs/design.md §3). Random batches of a
large data set share few atoms, so the passes grow with ``B·(k + S)``; points near each other
share their neighbours, and with a shared tail proposal
(:class:`~mapa_vae.inference.tails.SharedTail`) their proposals overlap too.

:func:`local_batches` cuts the data with a **random projection tree** (Dasgupta & Freund
2008): split a node at the median-ish rank of its points' projections on the line through two
of its points drawn at random, recurse until a node holds at most one batch, then visit the
leaves in random order. The distance is Euclidean, the kernel's own for the Gaussian likelihood
and, for binary data, the one the Bernoulli kernel ranks by (its log-kernel is linear in
``x_i``, so it orders neighbours like ``‖x - x_i‖²`` up to a per-dimension weight). Cost per
epoch: ``O(N·D·log(N/B))`` flops, no neighbour table needed.

Unbiasedness: each epoch visits every point exactly once, so the sum of an epoch's step
gradients (at fixed weights) is the full-data gradient, as with random batches; and a step
taken at a uniformly random position of the epoch holds each point with probability ``B/N``, so
its gradient is still an unbiased estimate of the mean gradient. What changes is the variance:
a batch of neighbours is a cluster sample, whose points' gradients are positively correlated,
so a single step's gradient is noisier than a random batch's (by the design effect
``1 + (B-1)ρ``, ``ρ`` the within-batch gradient correlation); the epoch's total is unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..registry import BATCHINGS

__all__ = ["local_batches", "random_batches"]


@BATCHINGS.register("random")
def random_batches(x: Tensor, batch_size: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """A uniformly random permutation cut into consecutive batches.

    Draws ``torch.randperm(N)`` once, exactly as the training loop always has (so the batches of
    a seeded run, and a resumed one, are unchanged).

    >>> _ = torch.manual_seed(0)
    >>> [b.tolist() for b in random_batches(torch.zeros(5, 2), 2)]
    [[4, 0], [1, 3], [2]]
    """
    return list(torch.randperm(x.shape[0], generator=generator).split(batch_size))


@BATCHINGS.register("local")
def local_batches(x: Tensor, batch_size: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """Batches of nearby points from a random projection tree, re-drawn every call.

    Every node of ``m > batch_size`` points is split into a left part of
    ``batch_size · ⌈⌈m / batch_size⌉ / 2⌉`` points (those with the smallest projections) and the
    rest, so every leaf but at most one is a full batch. Returns CPU ``int64`` index tensors.

    >>> x = torch.cat([torch.zeros(4, 1), torch.ones(4, 1)])  # two clumps of 4
    >>> _ = torch.manual_seed(0)
    >>> sorted(sorted(b.tolist()) for b in local_batches(x, 4))
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    n = x.shape[0]
    stack = [torch.randperm(n, generator=generator)]  # random order breaks ties randomly
    leaves: list[Tensor] = []
    while stack:
        idx = stack.pop()
        m = idx.numel()
        if m <= batch_size:
            leaves.append(idx)
            continue
        a = int(torch.randint(0, m, (1,), generator=generator))
        b = (a + 1 + int(torch.randint(0, m - 1, (1,), generator=generator))) % m
        pts = x[idx.to(x.device)]  # (m, D)
        proj = (pts @ (pts[a] - pts[b])).cpu()  # (m,) position along the line through a and b
        order = torch.argsort(proj, stable=True)
        left = batch_size * math.ceil(math.ceil(m / batch_size) / 2)
        stack += [idx[order[:left]], idx[order[left:]]]
    visit = torch.randperm(len(leaves), generator=generator)
    return [leaves[int(j)] for j in visit]
