"""The referee: ``log p(x)`` by importance sampling with a proposal adapted to the model.

For any proposal ``r(z | x)`` whose support covers the posterior,

    log p̂(x) = log (1/K) Σ_k w_k,    w_k = p(x | f(z_k)) p(z_k) / r(z_k | x),    z_k ~ r,

is a lower bound on ``log p(x)`` in expectation (Jensen), and the better ``r`` matches the
posterior the tighter it is (docs/design.md §7). A fixed proposal is not fair to every model: a
deterministic encoder (MAPA) has no scale of its own, and its codes may spread over 0.1 or over 10
units. The referee therefore proposes, for a batch of points,

    r(z | x) = (1 - a) q_c(z | x) + a p(z),

with the defensive prior ``p`` (weight ``a``, so every weight is at most ``p(x | z) / a``) and a
local part ``q_c`` chosen among candidates ``c``:

- an encoder that returns a distribution ``q(z | x)`` (VAE, IWAE): ``q_c = ½ q + ½ q⁽ᶜ⁾``, with
  ``q⁽ᶜ⁾`` the same Gaussian with its scales multiplied by ``c ∈ {1.5, 2, 3}``, and ``q_1 = q``
  (the old referee's proposal, always a candidate, so these scores do not drop; the only one
  when ``q`` is not a mean-field Gaussian);
- a deterministic encoder ``g`` (MAPA): ``q_c = β N(g(x), diag w²) + (1 - β) Σ_j π_j N(z_j, diag
  w²)`` over the ``m`` training atoms ``z_j = g(x_j)`` that explain ``x`` best, ``π_j ∝
  p(x | f(z_j))`` (the empiricalized posterior of Eq. 7, restricted to its top ``m``), with the
  width ``w = c σ``, ``c ∈ {2⁻⁸, …, 2}``, a multiple of the per-dimension scale ``σ`` (the
  larger of the atoms' and the prior's standard deviations) and ``β ∈ {1, ½}``. Without atoms,
  ``σ`` is the prior's and ``β = 1``.

Each candidate is scored by a pilot estimate (``pilot_samples`` draws on up to ``pilot_points``
of the points being scored), and the highest mean picks the proposal. With more than ``finalists``
candidates (a deterministic encoder's 20) the pilot runs in two rounds: every candidate with a
quarter of the draws, then the ``finalists`` best of them with all ``pilot_samples``, 0.45 of
the draws of one round over all 20 (on two MAPA models of MNIST, 8 seeds each, the two rounds
picked the one round's candidate 12 times and a neighbouring width 4 times, widths between which
the one round itself wavers from seed to seed). The final estimate uses fresh draws, so it is a
proper importance-sampling estimate of a proposal chosen independently of them: a lower bound
in expectation whatever was chosen, and choosing the highest is choosing the tightest. The
proposal density is a mixture evaluated exactly (log-sum-exp over components).

The per-point standard error is the delta method's: ``Var[log p̂] ≈ Var[w] / (K E[w]²)``.
With a target for it (:func:`estimate_log_likelihood`, the final evaluation), ``K`` comes from
the pilot's weight variance at the chosen proposal. A pilot of a few dozen draws underestimates
the variance of heavy-tailed weights (a proposal far narrower than the posterior: measured
0.6 nats realized against a 0.2 target), so the per-point errors of the final draws, which are
reported, are the check.

The cost is the decoder and the prior's log-density at every draw: the prior is evaluated at the
precision it was trained in (a flow fitted in float32 scores a draw in 0.7 of the time and
samples one in 0.6; its rounding, about 1e-6 nats, enters the target and the proposal alike), the
decoder and every sum in float64. Memory is bounded in bytes: a block of draws holds at most
``block_bytes`` of decoder outputs, and the atoms are decoded a block at a time for the table,
so the working memory does not grow with the number of points or atoms.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, Normal
from tqdm.auto import tqdm

from ..models.latent import LatentVariableModel, StandardNormal
from .likelihood import DEFAULT_GRID, Proposal, _device, _float64, quadrature_log_likelihood

__all__ = [
    "BLOCK_BYTES",
    "INFLATIONS",
    "TARGET_STDERR",
    "WIDTHS",
    "Candidate",
    "Estimate",
    "Proposal",
    "Referee",
    "estimate_log_likelihood",
    "referee_log_likelihood",
]


WIDTHS = tuple(2.0**k for k in range(-8, 2))
"""Widths ``c`` of a deterministic encoder's components, in units of the scale ``σ``."""

TARGET_STDERR = 0.2
"""The final evaluation's per-point Monte Carlo standard error (nats): every model gets the
draws its proposal needs for it, so a model whose proposal fits costs fewer, and the estimate's
downward bias, about ``se² / 2``, is near 0.02 nats per point for every model alike."""

INFLATIONS = (1.0, 1.5, 2.0, 3.0)
"""Scale factors ``c`` of a distribution encoder's second component (1: ``q`` alone)."""

BLOCK_BYTES = 2**23
"""Bytes of float64 decoder outputs in one block of draws (or of decoded atoms): 8 MiB, about
1 300 draws of a 784-pixel image; the block's other tensors are a few times this. On MNIST (MAPA
and IWAE, 1000 points) 8 MiB blocks took the CPU time of 32 MiB ones, and the evaluation's peak
memory above its start fell from 0.31 to 0.13 GB for MAPA and from 0.14 to 0.07 GB for IWAE."""



@dataclass(frozen=True)
class Estimate:
    """Per-point ``log p(x)`` estimates ``(B,)`` and their Monte Carlo standard errors ``(B,)``
    (zeros when exact); ``how``: the estimator and the proposal it used; ``empirical``: the exact
    empiricalized ``log (1/N) Σ_i p(x | f(g(x_i)))`` ``(B,)`` when the model's encoder is
    deterministic and the training atoms were given."""

    values: Tensor
    stderr: Tensor
    how: str
    empirical: Tensor | None = None

    @property
    def mean(self) -> float:
        return float(self.values.mean())

    @property
    def stderr_of_mean(self) -> float:
        """The standard error of the mean over the points (points drawn at random), nan for one."""
        n = self.values.numel()
        return float(self.values.std() / math.sqrt(n)) if n > 1 else math.nan

    @property
    def mc_stderr_of_mean(self) -> float:
        """The Monte Carlo standard error of the mean for these points: ``√(Σ se_i²) / n``."""
        return float(self.stderr.square().sum().sqrt() / self.values.numel())

    def split(self, *sizes: int) -> list[Estimate]:
        """The estimates of consecutive groups of ``sizes`` points (summing to ``B``), each with
        this ``how``: one referee call scores several splits with one pilot and atom table.

        >>> est = Estimate(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3), "exact")
        >>> [e.values.tolist() for e in est.split(1, 2)]
        [[1.0], [2.0, 3.0]]
        """
        if sum(sizes) != self.values.numel():
            raise ValueError(f"sizes {sizes} do not add up to {self.values.numel()} points")
        parts = zip(self.values.split(sizes), self.stderr.split(sizes),
                    self.empirical.split(sizes) if self.empirical is not None else [None] * len(sizes),
                    strict=True)
        return [Estimate(v, e, self.how, emp) for v, e, emp in parts]

    def metrics(self, split: str) -> dict[str, float | str]:
        """A run's record of it: ``{split}_log_lik``, its two standard errors, how it was
        computed and, when known, the exact empiricalized ``{split}_empirical_log_lik``."""
        out: dict[str, float | str] = {
            f"{split}_log_lik": self.mean, f"{split}_log_lik_stderr": self.stderr_of_mean,
            f"{split}_log_lik_mc_stderr": self.mc_stderr_of_mean, f"{split}_log_lik_how": self.how}
        if self.empirical is not None:
            out[f"{split}_empirical_log_lik"] = float(self.empirical.mean())
        return out



@dataclass(frozen=True)
class Candidate:
    """One local proposal: ``width`` (deterministic encoder: ``c`` in units of ``σ``; distribution
    encoder: the scale factor of its second component) and ``beta``, the weight of the encoder's
    own component against the top atoms."""

    width: float
    beta: float = 1.0

    def describe(self, sigma: Tensor | None, top: int) -> str:
        if sigma is None:
            return "q(z|x)" if self.width == 1.0 else f"½ q(z|x) + ½ q with scales × {self.width:g}"
        w = ", ".join(f"{v:.3g}" for v in (self.width * sigma).tolist())
        if self.beta == 1.0:
            return f"N(g(x), diag w²), w = {self.width:g} σ = ({w})"
        return (f"{self.beta:g} N(g(x), diag w²) + {1 - self.beta:g} Σ over the top {top} atoms "
                f"π_j N(z_j, diag w²), w = {self.width:g} σ = ({w})")



class _Prior:
    """``p(z)`` at the precision its module holds (a flow fitted in float32 scores and samples in
    float32), taking and giving float64: ``log_prob`` ``(...,)`` of ``z`` ``(..., L)`` and fresh
    draws ``n ↦ (n, L)``, sampled ``size`` at a time from a pool (a flow's inverse costs nearly the
    same per call for few draws as for many; every draw is handed out once)."""

    def __init__(self, prior: torch.nn.Module, device: torch.device, size: int = 4096) -> None:
        dtypes = [t.dtype for t in (*prior.parameters(), *prior.buffers()) if t.is_floating_point()]
        self.dtype = dtypes[0] if dtypes else torch.float64  # no parameters: as the decoder
        self.dist: Distribution = copy.deepcopy(prior).to(device, self.dtype).eval()()
        self.size = size
        self.pool: Tensor | None = None

    def log_prob(self, z: Tensor) -> Tensor:
        return self.dist.log_prob(z.to(self.dtype)).to(torch.float64)

    def __call__(self, n: int) -> Tensor:
        if self.pool is None or self.pool.shape[0] < n:
            fresh = self.dist.sample((max(n, self.size),)).to(torch.float64)
            self.pool = fresh if self.pool is None else torch.cat([self.pool, fresh])
        out, self.pool = self.pool[:n], self.pool[n:]
        return out



def _gaussian_mixture(logits: Tensor, loc: Tensor, scale: Tensor) -> Distribution:
    """``Σ_c softmax(logits)_c N(loc_c, diag scale_c²)``: logits ``(B, C)``, loc/scale ``(B, C, L)``."""
    components = Independent(Normal(loc, scale, validate_args=False), 1)
    return MixtureSameFamily(Categorical(logits=logits, validate_args=False), components,
                             validate_args=False)



class Referee:
    """Scores points under ``model`` with the adapted proposal (module docstring).

    ``train``: the training data, whose codes are the atoms of a deterministic encoder (and give
    ``σ`` and the exact empiricalized log-likelihood); ``samples``: ``K`` final draws per point;
    ``top``: atoms per point ``m``; ``defensive``: the prior's weight ``a``; ``block_bytes``: the
    float64 decoder outputs one block of draws may hold (:data:`BLOCK_BYTES`); ``candidates``: the
    local proposals to choose among (default: the module docstring's); ``finalists``: how many of
    them the pilot's second round keeps; ``target_stderr``: if given, ``K`` is the fewest draws
    (from ``min_samples`` to ``samples``) that meet this per-point standard error by the pilot's
    variance (draws independent of the final ones, so the estimate stays a proper one). Works in
    float64 on a copy of the model (the prior at its own precision).
    """

    def __init__(self, model: LatentVariableModel, train: Tensor | None = None, samples: int = 1000,
                 top: int = 5, defensive: float = 0.1, pilot_samples: int = 32,
                 pilot_points: int = 32, block_bytes: int = BLOCK_BYTES,
                 candidates: Sequence[Candidate] | None = None, finalists: int = 4,
                 target_stderr: float | None = None, min_samples: int = 100) -> None:
        if samples < 1 or pilot_samples < 1 or pilot_points < 1 or top < 1 or finalists < 1:
            raise ValueError("samples, pilot_samples, pilot_points, top and finalists must be positive")
        self.model = _float64(model)
        self.device = _device(self.model, train if train is not None else torch.zeros(()))
        self.samples, self.top, self.defensive = samples, top, defensive
        self.pilot_samples, self.pilot_points, self.finalists = pilot_samples, pilot_points, finalists
        self.fixed = None if candidates is None else list(candidates)
        self.target_stderr, self.min_samples = target_stderr, min_samples
        self.prior = _Prior(model.prior, self.device)
        out_dim = int(self.model.decoder.net(torch.zeros(1, self.model.latent_dim, dtype=torch.float64,
                                                         device=self.device)).shape[-1])
        self.elements = max(out_dim, block_bytes // 8)  # float64 values in a block
        self.block = self.elements // out_dim  # draws × points (or atoms) per block
        data_dim = train.shape[-1] if train is not None else out_dim
        probe = self.model.encoder(torch.zeros(1, data_dim, dtype=torch.float64, device=self.device))
        self.deterministic = not isinstance(probe, Distribution)
        # a mean-field Gaussian q can be widened; any other distribution is used as it is
        self.inflatable = isinstance(probe, Independent) and isinstance(probe.base_dist, Normal)
        self.codes: Tensor | None = None  # (N, L) atoms
        self.sigma: Tensor | None = None  # (L,) the codes' scale
        if self.deterministic:
            with torch.no_grad():
                if train is not None:  # converted a block at a time: no float64 copy of all of it
                    self.codes = torch.cat([self.model.encoder(a.to(self.device, torch.float64))
                                            for a in train.split(self.block)])
                # the larger of the codes' and the prior's scale: a posterior can be as wide as
                # the prior where the decoder barely depends on z
                sigma = self.prior.dist.sample((1024,)).to(torch.float64).std(0)
                if self.codes is not None and self.codes.shape[0] > 1:
                    sigma = torch.maximum(sigma, self.codes.std(0))
                self.sigma = sigma.clamp_min(1e-6)

    def candidates(self) -> list[Candidate]:
        """The local proposals the pilot chooses among."""
        if self.fixed is not None:
            return self.fixed
        if not self.deterministic:
            return [Candidate(c) for c in (INFLATIONS if self.inflatable else (1.0,))]
        betas = (1.0, 0.5) if self.codes is not None else (1.0,)
        return [Candidate(c, b) for c in WIDTHS for b in betas]

    @torch.no_grad()
    def empirical(self, x: Tensor) -> Tensor | None:
        """The exact empiricalized ``log (1/N) Σ_i p(x | f(z_i))`` ``(B,)``, None without atoms."""
        if self.codes is None:
            return None
        return self._atoms(x.to(self.device, torch.float64))[0].cpu()

    def _atoms(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Empiricalized ``log p(x)`` ``(B,)``, the top ``m`` atoms' log-likelihoods ``(B, m)``
        and their codes ``(B, m, L)``: the atoms decoded a block at a time, a running
        log-sum-exp and a running top ``m``."""
        assert self.codes is not None
        lik = self.model.decoder.likelihood
        n = self.codes.shape[0]
        lse = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        top_v = torch.empty(x.shape[0], 0, dtype=torch.float64, device=x.device)
        top_i = torch.empty(x.shape[0], 0, dtype=torch.long, device=x.device)
        for start in range(0, n, self.block):
            params = self.model.decoder.net(self.codes[start : start + self.block])  # (c, D')
            rows = max(1, self.elements // params.shape[0])  # log_k no larger than params
            new_v, new_i = [], []
            for r in range(0, x.shape[0], rows):
                log_k = lik.pairwise_log_prob(params, x[r : r + rows])  # (b, c)
                lse[r : r + rows] = torch.logaddexp(lse[r : r + rows], torch.logsumexp(log_k, -1))
                # the best m of this block's atoms and of the earlier blocks' best m
                v, i = log_k.topk(min(self.top, log_k.shape[1]), -1)
                v = torch.cat([top_v[r : r + rows], v], 1)  # (b, m' + m)
                i = torch.cat([top_i[r : r + rows], i + start], 1)
                v, j = v.topk(min(self.top, v.shape[1]), -1)
                new_v.append(v)
                new_i.append(i.gather(1, j))
            top_v, top_i = torch.cat(new_v), torch.cat(new_i)  # (B, m)
        return lse - math.log(n), top_v, self.codes[top_i]  # (B,), (B, m), (B, m, L)

    def _local(self, x: Tensor, cand: Candidate, atoms: tuple[Tensor, Tensor] | None) -> Distribution:
        """``q_c(z | x)`` for the points ``x`` ``(B, D)``; ``atoms``: their top atoms (log-lik,
        codes)."""
        enc = self.model.encoder(x)
        if not self.deterministic:
            if cand.width == 1.0:
                return enc
            base = enc.base_dist if isinstance(enc, Independent) else None
            if not isinstance(base, Normal):
                raise ValueError("only a Gaussian encoder's scales can be inflated")
            loc = torch.stack([base.loc, base.loc], 1)  # (B, 2, L)
            scale = torch.stack([base.scale, cand.width * base.scale], 1)
            return _gaussian_mixture(torch.zeros(loc.shape[:2], dtype=loc.dtype, device=loc.device),
                                     loc, scale)
        assert self.sigma is not None
        w = cand.width * self.sigma  # (L,)
        if cand.beta == 1.0 or atoms is None:
            return Independent(Normal(enc, w.expand_as(enc), validate_args=False), 1)
        top_v, top_z = atoms
        loc = torch.cat([enc[:, None], top_z], 1)  # (B, 1+m, L)
        logits = torch.cat([torch.full_like(top_v[:, :1], math.log(cand.beta)),
                            math.log1p(-cand.beta) + torch.log_softmax(top_v, -1)], 1)  # (B, 1+m)
        return _gaussian_mixture(logits, loc, w.expand_as(loc))

    def proposal(self, x: Tensor, cand: Candidate, atoms: tuple[Tensor, Tensor] | None) -> Proposal:
        """``r(z | x) = (1 - a) q_c(z | x) + a p(z)`` for the points ``x`` ``(B, D)``."""
        return Proposal(self._local(x, cand, atoms), self.prior.dist, self.defensive, self.prior)

    def _log_weights(self, x: Tensor, cand: Candidate, atoms: tuple[Tensor, Tensor] | None,
                     n: int) -> Tensor:
        """``log w`` ``(n, B)`` of ``n`` fresh draws per point of ``x`` ``(B, D)``."""
        r = self.proposal(x, cand, atoms)
        z = r.sample(n)  # (n, B, L)
        log_p_z = self.prior.log_prob(z)  # (n, B), computed once for the target and r
        log_p_x = self.model.decoder.likelihood.log_prob(self.model.decoder.net(z), x)  # (n, B)
        return log_p_x + log_p_z - r.log_prob(z, log_p_z)

    def _blocks(self, n_points: int, n: int) -> Iterator[tuple[slice, int]]:
        """(rows, draws) blocks of at most ``block`` draws × points covering ``n`` draws of each."""
        draws = min(n, self.block)
        rows = max(1, self.block // draws)
        for i in range(0, n_points, rows):
            for j in range(0, n, draws):
                yield slice(i, min(i + rows, n_points)), min(draws, n - j)

    def _estimate(self, x: Tensor, cand: Candidate, atoms: tuple[Tensor, Tensor] | None, n: int,
                  bar: tqdm | None = None) -> tuple[Tensor, Tensor]:
        """Per-point ``log (1/n) Σ w`` ``(B,)`` and its delta-method standard error ``(B,)``."""
        lse1 = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        lse2 = lse1.clone()  # log Σ w and log Σ w²
        for rows, draws in self._blocks(x.shape[0], n):
            sub = None if atoms is None else (atoms[0][rows], atoms[1][rows])
            log_w = self._log_weights(x[rows], cand, sub, draws)  # (draws, b)
            lse1[rows] = torch.logaddexp(lse1[rows], torch.logsumexp(log_w, 0))
            lse2[rows] = torch.logaddexp(lse2[rows], torch.logsumexp(2 * log_w, 0))
            if bar is not None:
                bar.update(draws * log_w.shape[1])
        # Σ ŵ² with ŵ = w / mean(w): n² e^{lse2 - 2 lse1}; Var ŵ = (Σ ŵ² - n) / (n - 1)
        second = (lse2 - 2 * lse1).exp() * n * n
        var = ((second - n) / max(1, n - 1)).clamp_min(0.0)
        return lse1 - math.log(n), (var / n).sqrt()

    def _pilot_rows(self, n: int) -> Tensor:
        """The rows of a batch of ``n`` points the pilot scores: up to ``pilot_points``, evenly spread."""
        return torch.linspace(0, n - 1, min(self.pilot_points, n)).round().long()

    def _screen_samples(self) -> int:
        """Draws per candidate in the pilot's first round (0: one round)."""
        many = len(self.candidates()) > self.finalists
        return max(1, self.pilot_samples // 4) if many and self.pilot_samples >= 8 else 0

    def _pilot_draws(self, n_points: int) -> int:
        """Draws the pilot takes over a batch of ``n_points`` points."""
        n_cands = len(self.candidates())
        if n_cands == 1 and self.target_stderr is None:
            return 0
        screen = self._screen_samples()
        rounds = n_cands * screen + min(n_cands, self.finalists) * self.pilot_samples if screen else (
            n_cands * self.pilot_samples)
        return rounds * self._pilot_rows(n_points).numel()

    def _choose(self, x: Tensor, atoms: tuple[Tensor, Tensor] | None,
                bar: tqdm | None = None) -> tuple[Candidate, float | None]:
        """The candidate with the highest pilot score, and the pilot's mean per-draw variance of
        its normalized weights (None when no pilot ran). With more than ``finalists`` candidates,
        a first round of a quarter of the draws keeps the ``finalists`` best for the second."""
        cands = self.candidates()
        if len(cands) == 1 and self.target_stderr is None:
            return cands[0], None
        rows = self._pilot_rows(x.shape[0])
        sub = None if atoms is None else (atoms[0][rows], atoms[1][rows])
        screen = self._screen_samples()
        if screen:
            first = [float(self._estimate(x[rows], c, sub, screen, bar)[0].mean()) for c in cands]
            keep = sorted(sorted(range(len(cands)), key=lambda i: -first[i])[: self.finalists])
            cands = [cands[i] for i in keep]
        pilots = [self._estimate(x[rows], c, sub, self.pilot_samples, bar) for c in cands]
        best = max(range(len(cands)), key=lambda i: float(pilots[i][0].mean()))
        return cands[best], float(pilots[best][1].square().mean()) * self.pilot_samples

    def _draws(self, spread: float | None) -> int:
        """``K``: ``samples``, or with ``target_stderr`` τ the fewest draws (at least
        ``min_samples``) whose per-point standard error ``√(v / K)`` meets τ for the pilot's
        per-draw variance ``v``."""
        if self.target_stderr is None or spread is None:
            return self.samples
        need = math.ceil(spread / self.target_stderr**2)
        return min(self.samples, max(self.min_samples, need))

    def _prepare(self, x: Tensor) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
        """``x`` in float64 where the model is, its empiricalized log-likelihood and top atoms."""
        x = x.to(self.device, torch.float64)
        if self.codes is None:
            return x, None, None
        empirical, top_v, top_z = self._atoms(x)
        return x, empirical, (top_v, top_z)

    @torch.no_grad()
    def choose(self, x: Tensor) -> Candidate:
        """The candidate the pilot picks for the points ``x`` ``(B, D)``."""
        x, _, atoms = self._prepare(x)
        return self._choose(x, atoms)[0]

    @torch.no_grad()
    def __call__(self, x: Tensor, progress: bool | None = None) -> Estimate:
        """Estimate ``log p(x)`` for ``x`` ``(B, D)``; ``progress``: False hides the tqdm bar over
        the draws, which otherwise shows on a terminal only (a log file gets no bar lines)."""
        x, empirical, atoms = self._prepare(x)
        n_cands = len(self.candidates())
        pilot = self._pilot_draws(x.shape[0])
        with tqdm(total=pilot + self.samples * x.shape[0], desc="log-likelihood", unit="draw",
                  unit_scale=True, leave=False, disable=None if progress is not False else True) as bar:
            best, spread = self._choose(x, atoms, bar)
            k = self._draws(spread)
            bar.total = pilot + k * x.shape[0]
            values, stderr = self._estimate(x, best, atoms, k, bar)
        how = (f"importance sampling, K={k}, proposal {1 - self.defensive:g} "
               f"[{best.describe(self.sigma, self.top)}] + {self.defensive:g} p(z)")
        if pilot:
            among = f"chosen among {n_cands} " if n_cands > 1 else ""
            rounds = (f"{self._screen_samples()} draws, then the best {self.finalists} by "
                      if self._screen_samples() else "")
            how += (f", {among}by a pilot of {rounds}{self.pilot_samples} draws on "
                    f"{self._pilot_rows(x.shape[0]).numel()} points")
        return Estimate(values.cpu(), stderr.cpu(), how,
                        None if empirical is None else empirical.cpu())



def referee_log_likelihood(model: LatentVariableModel, x: Tensor, train: Tensor | None = None,
                           samples: int = 1000, progress: bool | None = None) -> Estimate:
    """:class:`Referee`'s estimate of ``log p(x)`` with its defaults (``train``: the atoms)."""
    return Referee(model, train, samples)(x, progress)



def estimate_log_likelihood(model: LatentVariableModel, x: Tensor, grid: int = DEFAULT_GRID,
                            samples: int = 1000, train: Tensor | None = None,
                            progress: bool | None = None,
                            target_stderr: float | None = TARGET_STDERR) -> Estimate:
    """``log p(x)`` ``(B,)`` of a final model with its standard errors: quadrature for a 1-D
    latent under N(0, 1) (exact up to the grid), else the :class:`Referee` with at most
    ``samples`` draws per point, as many as its pilot says meet ``target_stderr`` per point
    (None: ``samples`` always). ``train``: the training data (the atoms of a deterministic
    encoder), which also gives the exact empiricalized log-likelihood beside either."""
    if model.latent_dim == 1 and isinstance(model.prior, StandardNormal):
        values = quadrature_log_likelihood(model.decoder, x, grid)
        empirical = Referee(model, train).empirical(x) if train is not None else None
        return Estimate(values, torch.zeros_like(values), f"quadrature, {grid} points", empirical)
    return Referee(model, train, samples, target_stderr=target_stderr)(x, progress)
