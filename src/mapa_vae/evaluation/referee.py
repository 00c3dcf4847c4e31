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
of the points being scored), and the highest mean picks the proposal. The final estimate uses
fresh draws, so it is a proper importance-sampling estimate of a proposal chosen independently of
them: a lower bound in expectation whatever was chosen, and choosing the highest is choosing the
tightest. The proposal density is a mixture evaluated exactly (log-sum-exp over components).

The per-point standard error is the delta method's: ``Var[log p̂] ≈ Var[w] / (K E[w]²)``.
With a target for it (:func:`estimate_log_likelihood`, the final evaluation), ``K`` comes from
the pilot's weight variance at the chosen proposal. A pilot of a few dozen draws underestimates
the variance of heavy-tailed weights (a proposal far narrower than the posterior: measured
0.6 nats realized against a 0.2 target), so the per-point errors of the final draws, which are
reported, are the check.
"""

from __future__ import annotations

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



class _PriorPool:
    """Fresh draws of the prior, sampled ``size`` at a time: a flow's inverse costs nearly the
    same per call for few draws as for many, and every draw is handed out once."""

    def __init__(self, prior: Distribution, size: int = 4096) -> None:
        self.prior, self.size = prior, size
        self.pool: Tensor | None = None

    def __call__(self, n: int) -> Tensor:
        if self.pool is None or self.pool.shape[0] < n:
            fresh = self.prior.sample((max(n, self.size),))
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
    ``top``: atoms per point ``m``; ``defensive``: the prior's weight ``a``; ``chunk``: draws ×
    points per decoder call; ``candidates``: the local proposals to choose among (default: the
    module docstring's); ``target_stderr``: if given, ``K`` is the fewest draws (from
    ``min_samples`` to ``samples``) that meet this per-point standard error by the pilot's
    variance (draws independent of the final ones, so the estimate stays a proper one). Works in
    float64 on a copy of the model.
    """

    def __init__(self, model: LatentVariableModel, train: Tensor | None = None, samples: int = 1000,
                 top: int = 5, defensive: float = 0.1, pilot_samples: int = 32,
                 pilot_points: int = 32, chunk: int = 2**13,
                 candidates: Sequence[Candidate] | None = None, target_stderr: float | None = None,
                 min_samples: int = 100) -> None:
        if samples < 1 or pilot_samples < 1 or pilot_points < 1 or top < 1:
            raise ValueError("samples, pilot_samples, pilot_points and top must be positive")
        self.model = _float64(model)
        self.device = _device(self.model, train if train is not None else torch.zeros(()))
        self.samples, self.top, self.defensive = samples, top, defensive
        self.pilot_samples, self.pilot_points, self.chunk = pilot_samples, pilot_points, chunk
        self.fixed = None if candidates is None else list(candidates)
        self.target_stderr, self.min_samples = target_stderr, min_samples
        self._pool = _PriorPool(self.model.prior())
        probe = self.model.encoder(torch.zeros(1, self._data_dim(train), dtype=torch.float64,
                                               device=self.device))
        self.deterministic = not isinstance(probe, Distribution)
        # a mean-field Gaussian q can be widened; any other distribution is used as it is
        self.inflatable = isinstance(probe, Independent) and isinstance(probe.base_dist, Normal)
        self.codes: Tensor | None = None  # (N, L) atoms
        self.params: Tensor | None = None  # (N, D') decoder outputs of the atoms
        self.sigma: Tensor | None = None  # (L,) the codes' scale
        if self.deterministic:
            with torch.no_grad():
                if train is not None:
                    atoms = train.to(self.device, torch.float64)
                    self.codes = torch.cat([self.model.encoder(a) for a in atoms.split(4096)])
                    self.params = torch.cat([self.model.decoder.net(z) for z in self.codes.split(4096)])
                # the larger of the codes' and the prior's scale: a posterior can be as wide as
                # the prior where the decoder barely depends on z
                sigma = self.model.prior().sample((1024,)).std(0)
                if self.codes is not None and self.codes.shape[0] > 1:
                    sigma = torch.maximum(sigma, self.codes.std(0))
                self.sigma = sigma.clamp_min(1e-6)

    def _data_dim(self, train: Tensor | None) -> int:
        if train is not None:
            return train.shape[-1]
        return int(self.model.decoder.net(torch.zeros(1, self.model.latent_dim, dtype=torch.float64,
                                                      device=self.device)).shape[-1])

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
        if self.params is None:
            return None
        return self._atoms(x.to(self.device, torch.float64))[0].cpu()

    def _atoms(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Empiricalized ``log p(x)`` ``(B,)``, the top ``m`` atoms' log-likelihoods ``(B, m)``
        and their codes ``(B, m, L)``."""
        assert self.params is not None and self.codes is not None
        lik = self.model.decoder.likelihood
        n = self.params.shape[0]
        rows = max(1, 2**22 // n)
        empirical, top_v, top_z = [], [], []
        for xb in x.split(rows):
            log_k = lik.pairwise_log_prob(self.params, xb)  # (b, N)
            empirical.append(torch.logsumexp(log_k, -1) - math.log(n))
            v, i = log_k.topk(min(self.top, n), -1)  # (b, m)
            top_v.append(v)
            top_z.append(self.codes[i])  # (b, m, L)
        return torch.cat(empirical), torch.cat(top_v), torch.cat(top_z)

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

    def _log_weights(self, x: Tensor, cand: Candidate, atoms: tuple[Tensor, Tensor] | None,
                     n: int) -> Tensor:
        """``log w`` ``(n, B)`` of ``n`` fresh draws per point of ``x`` ``(B, D)``."""
        prior = self.model.prior()
        r = Proposal(self._local(x, cand, atoms), prior, self.defensive, self._pool)
        z = r.sample(n)  # (n, B, L)
        log_p_z = prior.log_prob(z)  # (n, B)
        return self.model.decoder(z).log_prob(x) + log_p_z - r.log_prob(z, log_p_z)

    def _blocks(self, n_points: int, n: int) -> Iterator[tuple[slice, int]]:
        """(rows, draws) blocks of at most ``chunk`` draws × points covering ``n`` draws of each."""
        draws = min(n, self.chunk)
        rows = max(1, self.chunk // draws)
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

    def _choose(self, x: Tensor, atoms: tuple[Tensor, Tensor] | None,
                bar: tqdm | None = None) -> tuple[Candidate, float | None]:
        """The candidate with the highest pilot score, and the pilot's mean per-draw variance of
        its normalized weights (None when no pilot ran)."""
        cands = self.candidates()
        if len(cands) == 1 and self.target_stderr is None:
            return cands[0], None
        rows = self._pilot_rows(x.shape[0])
        sub = None if atoms is None else (atoms[0][rows], atoms[1][rows])
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
        if self.params is None:
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
        """Estimate ``log p(x)`` for ``x`` ``(B, D)``; ``progress``: a tqdm bar (None: on a
        terminal only)."""
        x, empirical, atoms = self._prepare(x)
        n_cands = len(self.candidates())
        piloted = n_cands > 1 or self.target_stderr is not None
        pilot = n_cands * self.pilot_samples * self._pilot_rows(x.shape[0]).numel() if piloted else 0
        with tqdm(total=pilot + self.samples * x.shape[0], desc="log-likelihood", unit="draw",
                  unit_scale=True, leave=False, disable=None if progress is None else not progress) as bar:
            best, spread = self._choose(x, atoms, bar)
            k = self._draws(spread)
            bar.total = pilot + k * x.shape[0]
            values, stderr = self._estimate(x, best, atoms, k, bar)
        how = (f"importance sampling, K={k}, proposal {1 - self.defensive:g} "
               f"[{best.describe(self.sigma, self.top)}] + {self.defensive:g} p(z)")
        if piloted:
            among = f"chosen among {n_cands} " if n_cands > 1 else ""
            how += (f", {among}by a pilot of {self.pilot_samples} draws on "
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
