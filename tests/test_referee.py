"""The referee (evaluation/referee.py): close to exact log-likelihoods, below them in expectation,
a normalized proposal, a width that follows the codes' scale, and the ``evaluate`` command."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from mapa_vae.cli import main
from mapa_vae.evaluation.likelihood import importance_log_likelihood, quadrature_log_likelihood
from mapa_vae.evaluation.referee import INFLATIONS, Candidate, Estimate, Proposal, Referee
from mapa_vae.models.code_priors import MixturePrior
from mapa_vae.models.latent import (
    CodeEncoder,
    Decoder,
    LatentVariableModel,
    Prior,
    StandardNormal,
)
from mapa_vae.models.likelihoods import GaussianLikelihood

L, D, NOISE = 2, 5, 0.05


class Linear(torch.nn.Module):
    """``f(z) = W z / s + b``."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, s: float = 1.0) -> None:
        super().__init__()
        self.w, self.b, self.s = w, b, s

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.w.T / self.s + self.b


class LeastSquares(torch.nn.Module):
    """A deterministic encoder: ``g(x) = s W⁺ (x - b)``, the code that explains ``x`` best."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, s: float = 1.0) -> None:
        super().__init__()
        self.pinv, self.b, self.s = torch.linalg.pinv(w), b, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.s * (x - self.b) @ self.pinv.T


class ExactPosterior(torch.nn.Module):
    """A Gaussian encoder whose ``q(z | x)`` has the posterior's mean and a diagonal scale."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        precision = w.T @ w / NOISE + torch.eye(w.shape[1], dtype=w.dtype)
        self.cov = torch.linalg.inv(precision)
        self.gain, self.b = self.cov @ w.T / NOISE, b

    def forward(self, x: torch.Tensor) -> Distribution:
        loc = (x - self.b) @ self.gain.T
        return Independent(Normal(loc, self.cov.diagonal().sqrt().expand_as(loc)), 1)


class ScaledNormal(Prior):
    """``p(z) = N(0, s² I)``: codes on the scale ``s``."""

    def __init__(self, latent_dim: int, s: float) -> None:
        super().__init__()
        self.latent_dim, self.s = latent_dim, s

    def forward(self) -> Distribution:
        loc = torch.zeros(self.latent_dim, dtype=torch.float64)
        return Independent(Normal(loc, torch.full_like(loc, self.s)), 1)


def _linear(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(D, L, dtype=torch.float64, generator=g),
            torch.randn(D, dtype=torch.float64, generator=g))


def _model(w: torch.Tensor, b: torch.Tensor, prior: Prior, encoder: torch.nn.Module | None = None,
           s: float = 1.0) -> LatentVariableModel:
    """The linear-Gaussian model ``x = W z / s + b + ε``, ``ε ~ N(0, σ² I)``, by default with the
    least-squares deterministic encoder."""
    enc = CodeEncoder(LeastSquares(w, b, s)) if encoder is None else encoder
    return LatentVariableModel(enc, Decoder(Linear(w, b, s), GaussianLikelihood(NOISE)), prior)


def _marginal(w: torch.Tensor, b: torch.Tensor) -> MultivariateNormal:
    """``x ~ N(b, W Wᵀ + σ² I)``: the exact marginal of the linear-Gaussian model under N(0, I)."""
    return MultivariateNormal(b, w @ w.T + NOISE * torch.eye(D, dtype=torch.float64))


def _check_close_and_below(est: Estimate, exact: torch.Tensor, tolerance: float) -> None:
    """Within ``tolerance`` nats on average, and not above the truth by more than 4 standard
    errors, neither on average nor at any point."""
    gap = est.values - exact
    se_mean = max(est.mc_stderr_of_mean, 1e-12)
    assert abs(float(gap.mean())) < tolerance, (float(gap.mean()), se_mean)
    assert float(gap.mean()) < 4 * se_mean, (float(gap.mean()), se_mean)
    assert bool((gap < 4 * est.stderr + 1e-9).all()), float((gap / est.stderr).max())


@pytest.mark.parametrize("encoder", ["deterministic", "gaussian"])
def test_linear_gaussian_matches_its_closed_form_marginal(encoder):
    w, b = _linear()
    enc = CodeEncoder(LeastSquares(w, b)) if encoder == "deterministic" else ExactPosterior(w, b)
    model = _model(w, b, StandardNormal(L), enc)
    marginal = _marginal(w, b)
    train, x = marginal.sample((200,)), marginal.sample((60,))
    est = Referee(model, train, samples=400)(x, progress=False)
    _check_close_and_below(est, marginal.log_prob(x), tolerance=0.05)
    assert est.values.shape == est.stderr.shape == (60,) and bool((est.stderr > 0).all())


def test_one_dimensional_latent_matches_quadrature(mapa_model, vae_model, circle_data):
    x = circle_data[:30]
    for model in (mapa_model, vae_model):
        exact = quadrature_log_likelihood(model.decoder, x)
        est = Referee(model, circle_data[30:], samples=500)(x, progress=False)
        _check_close_and_below(est, exact, tolerance=0.1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mixture_prior_matches_its_closed_form_and_the_empirical_sum_is_exact(dtype):
    """A 3-component Gaussian-mixture prior and a linear decoder: the marginal is a mixture of
    Gaussians, ``Σ_k π_k N(x; W μ_k + b, W Σ_k Wᵀ + σ² I)``; the referee evaluates a float32
    prior in float32 (as it was fitted) and is as close."""
    w, b = _linear(1)
    prior = MixturePrior(L, components=3).to(dtype)
    prior.logits.copy_(torch.tensor([0.0, -0.5, 0.3]))
    prior.loc.copy_(torch.tensor([[-3.0, 0.0], [3.0, 1.0], [0.0, -3.0]]))
    prior.scale_tril.copy_(0.4 * torch.eye(L).expand(3, -1, -1))
    model = _model(w, b, prior)
    loc, tril = prior.loc.double(), prior.scale_tril.double()
    comps = MultivariateNormal(loc @ w.T + b, w @ (tril @ tril.mT) @ w.T
                               + NOISE * torch.eye(D, dtype=torch.float64))
    log_pi = torch.log_softmax(prior.logits.double(), 0)

    def exact(x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(log_pi + comps.log_prob(x[:, None]), -1)

    with torch.no_grad():
        z = prior().sample((260,)).double()
        xs = model.decoder(z).sample()
    train, x = xs[:200], xs[200:]
    referee = Referee(model, train, samples=400)
    assert referee.prior.dtype == dtype
    est = referee(x, progress=False)
    _check_close_and_below(est, exact(x), tolerance=0.1)
    # the empiricalized model over the 200 atoms, summed by brute force one atom at a time
    with torch.no_grad():
        atoms = [model.decoder(model.encoder(a[None])) for a in train]
        brute = torch.logsumexp(torch.stack([d.log_prob(x) for d in atoms]), 0) - math.log(200)
    assert est.empirical is not None
    torch.testing.assert_close(est.empirical, brute, rtol=0, atol=1e-6)


def test_estimates_are_below_the_truth_in_expectation():
    """Averaged over many independent runs with few draws (where the bias shows), the estimate
    stays below the exact value, and the per-point delta-method errors match the run-to-run spread."""
    w, b = _linear(2)
    model = _model(w, b, StandardNormal(L))
    marginal = _marginal(w, b)
    train, x = marginal.sample((100,)), marginal.sample((8,))
    referee = Referee(model, train, samples=20, pilot_samples=20)
    values = torch.stack([referee(x, progress=False).values for _ in range(60)])  # (runs, points)
    mean, se = values.mean(0), values.std(0) / math.sqrt(values.shape[0])
    assert bool((mean < marginal.log_prob(x) + 3 * se).all())
    # the delta method's error is the spread of one proposal's estimates (the pilot's choice,
    # which also varies from run to run, is held fixed here)
    fixed = Referee(model, train, samples=200, candidates=[Candidate(0.25, 0.5)])
    runs = [fixed(x, progress=False) for _ in range(40)]
    ratio = torch.stack([r.stderr for r in runs]).mean(0) / torch.stack([r.values for r in runs]).std(0)
    assert bool(((ratio > 0.6) & (ratio < 1.6)).all()), ratio


def test_the_atom_table_a_block_at_a_time_equals_it_whole():
    """Atoms decoded 7 at a time and scored 3 points at a time (a running log-sum-exp and a
    running top m) give the table of one block: the same empiricalized values, top atoms and
    codes; and the draws of a small block stay within it."""
    w, b = _linear(6)
    model = _model(w, b, StandardNormal(L))
    marginal = _marginal(w, b)
    train, x = marginal.sample((200,)), marginal.sample((20,))
    whole, blocked = Referee(model, train), Referee(model, train, block_bytes=8 * D * 7)
    assert blocked.block == 7 and whole.block >= 200
    for a, c in zip(whole._atoms(x), blocked._atoms(x), strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
    assert max(rows.stop - rows.start for rows, _ in blocked._blocks(20, 5)) * 5 <= 7
    assert all(draws * (rows.stop - rows.start) <= 7 for rows, draws in blocked._blocks(20, 30))
    est = blocked(x, progress=False)  # many small blocks: as close to the truth
    _check_close_and_below(est, marginal.log_prob(x), tolerance=0.05)


def test_the_pilots_first_round_keeps_the_best_candidates():
    """The two-round pilot (20 candidates at a quarter of the draws, the best 4 at all of them)
    takes 0.45 of one round's draws and picks a proposal whose final estimate is as high as the
    one-round pilot's pick."""
    w, b = _linear(7)
    model = _model(w, b, StandardNormal(L))
    marginal = _marginal(w, b)
    train, x = marginal.sample((200,)), marginal.sample((40,))
    two, one = Referee(model, train, samples=300), Referee(model, train, samples=300, finalists=20)
    assert len(two.candidates()) == 20
    assert two._pilot_draws(40) == (20 * 8 + 4 * 32) * 32 and one._pilot_draws(40) == 20 * 32 * 32
    picks = [r.choose(x) for r in (two, one)]
    fixed = [Referee(model, train, samples=2000, candidates=[c])(x, progress=False) for c in picks]
    gap = fixed[0].mean - fixed[1].mean
    assert gap > -4 * math.hypot(fixed[0].mc_stderr_of_mean, fixed[1].mc_stderr_of_mean), (picks, gap)
    assert "then the best 4" in two(x, progress=False).how


def test_proposal_density_integrates_to_one_and_matches_a_brute_force_sum():
    w, b = _linear(3)
    model = _model(w, b, StandardNormal(L))
    marginal = _marginal(w, b)
    referee = Referee(model, marginal.sample((50,)), top=3)
    x = marginal.sample((2,))
    _, _, atoms = referee._prepare(x)
    cand = Candidate(0.5, beta=0.5)
    r = Proposal(referee._local(x, cand, atoms), model.prior(), 0.1)
    # on a grid covering the prior and the atoms, ∫ r(z | x) dz = 1 for each point
    h = 0.02
    axis = torch.arange(-6.0, 6.0 + h / 2, h, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)[:, None, :].expand(-1, 2, -1)  # (G, 2, L)
    log_r = r.log_prob(grid, model.prior().log_prob(grid))
    mass = log_r.exp().sum(0) * h * h
    torch.testing.assert_close(mass, torch.ones(2, dtype=torch.float64), rtol=0, atol=2e-3)
    # the density by hand: 0.9 [β N(g(x), w²) + (1-β) Σ_j π_j N(z_j, w²)] + 0.1 N(0, I)
    z = r.sample(7)  # (7, 2, L)
    assert referee.sigma is not None
    width = 0.5 * referee.sigma
    top_v, top_z = atoms  # type: ignore[misc]
    centres = torch.cat([model.encoder(x)[:, None], top_z], 1)  # (2, 4, L)
    weights = torch.cat([torch.full((2, 1), 0.5, dtype=torch.float64), 0.5 * torch.softmax(top_v, -1)], 1)
    gauss = Normal(centres, width).log_prob(z[:, :, None, :]).sum(-1).exp()  # (7, 2, 4)
    by_hand = 0.9 * (weights * gauss).sum(-1) + 0.1 * model.prior().log_prob(z).exp()
    torch.testing.assert_close(r.log_prob(z, model.prior().log_prob(z)), by_hand.log(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("s", [1.0, 30.0])
def test_the_width_search_follows_the_scale_of_the_codes(s):
    """The same model with its codes multiplied by ``s`` (prior N(0, s² I), ``f(z / s)``): the
    chosen width is ``s`` times wider, and the estimate is as close to the truth either way,
    where the fixed 0.1-wide proposal falls far below once the codes are wide."""
    w, b = _linear(4)
    model = _model(w, b, ScaledNormal(L, s), CodeEncoder(LeastSquares(w, b, s)), s)
    marginal = _marginal(w, b)
    train, x = marginal.sample((200,)), marginal.sample((40,))
    referee = Referee(model, train, samples=300)
    chosen = referee.choose(x)
    assert referee.sigma is not None
    absolute = chosen.width * float(referee.sigma.mean())
    assert 0.02 * s < absolute < 0.5 * s, (chosen, absolute)  # the posterior's std is ≈ 0.1 s
    est = referee(x, progress=False)
    _check_close_and_below(est, marginal.log_prob(x), tolerance=0.05)
    fixed = importance_log_likelihood(model, x, samples=300, code_scale=0.1)
    if s > 1:
        assert float((est.values - fixed).mean()) > 1.0  # 1.9 nats measured


def test_a_gaussian_encoder_keeps_its_own_proposal_among_the_candidates(vae_model, circle_data):
    referee = Referee(vae_model, samples=300)
    assert referee.candidates() == [Candidate(c) for c in INFLATIONS]
    x = circle_data[:50]
    old = importance_log_likelihood(vae_model, x, samples=300)  # 0.9 q + 0.1 p, the old referee
    est = referee(x, progress=False)
    assert est.mean > float(old.mean()) - 4 * est.mc_stderr_of_mean - 0.02


# --- the evaluate command -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mapa_run(tmp_path_factory):
    """A MAPA run with a 2-D latent (so the referee, not quadrature, scores it) on a small file."""
    from mapa_vae.data.groundtruth import ground_truth

    root = tmp_path_factory.mktemp("referee")
    x, _ = ground_truth("circle", surrogate=False).sample(120, torch.Generator().manual_seed(0))
    data = root / "circle.npy"
    np.save(data, x.numpy())
    run = root / "run"
    argv = ["train", "--data", str(data), "--method", "mapa", "--latent-dim", "2", "--epochs", "2",
            "--samples", "10", "--noise-var", "0.01", "--code-prior", "mixture", "--prior-components",
            "2", "--code-prior-steps", "20", "--restarts", "1", "--cache-dir", str(root / "cache"),
            "--out", str(run), "--quiet"]
    assert main(argv) == 0
    return run, data, x.numpy()


def _evaluate(capsys, *argv: str) -> tuple[str, str]:
    capsys.readouterr()
    assert main(["evaluate", *argv, "--samples", "50", "--quiet"]) == 0
    out, err = capsys.readouterr()
    return out, err


def test_evaluate_prints_the_errors_the_proposal_and_the_empiricalized_score(mapa_run, capsys):
    run, data, _ = mapa_run
    out, err = _evaluate(capsys, str(run), "--data", str(data))
    assert re.search(r"mean test log-likelihood: -?[0-9.]+ nats over 120 points", out), out
    assert re.search(r"standard error: ±[0-9.]+ over points, ±[0-9.]+ Monte Carlo", out), out
    assert "proposal" in out and "atoms" in out, out
    assert re.search(r"exact empiricalized log-likelihood .* 96 training atoms.*: -?[0-9.]+ nats", out), out
    # the whole file holds the run's 96 training rows (80 %), and evaluate says so
    assert "warning: 96 of the 120 rows" in err, err
    # train's final evaluation recorded the same referee's errors, proposal and empiricalized score
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_log_lik_stderr"] > 0 and metrics["test_log_lik_mc_stderr"] > 0
    assert "proposal" in metrics["test_log_lik_how"] and math.isfinite(metrics["test_empirical_log_lik"])


def test_evaluate_scores_one_row_and_a_built_in_test_split(mapa_run, tmp_path, capsys):
    run, _, x = mapa_run
    one = tmp_path / "one.csv"
    np.savetxt(one, x[:1] + 5.0, delimiter=",")  # far from every training row
    out, err = _evaluate(capsys, str(run), "--data", str(one))
    assert "over 1 points" in out and "warning" not in err, (out, err)
    out, err = _evaluate(capsys, str(run), "--data", "circle")
    assert "the test split of the built-in circle" in out, out


def test_the_draws_follow_what_the_proposal_needs():
    """With a per-point error target, a proposal that fits the posterior takes few draws and a
    poor one (codes proposed 2 σ wide, the posterior is about 0.1 σ) many more."""
    w, b = _linear(5)
    marginal = _marginal(w, b)
    train, x = marginal.sample((200,)), marginal.sample((40,))
    fits = Referee(_model(w, b, StandardNormal(L), ExactPosterior(w, b)), samples=1000, target_stderr=0.2)
    poor = Referee(_model(w, b, StandardNormal(L)), train, samples=1000, target_stderr=0.2,
                   candidates=[Candidate(2.0)])
    good, bad = fits(x, progress=False), poor(x, progress=False)
    k_good = int(re.search(r"K=(\d+)", good.how).group(1))  # type: ignore[union-attr]
    k_bad = int(re.search(r"K=(\d+)", bad.how).group(1))  # type: ignore[union-attr]
    assert k_good < 300 and k_bad > 500, (k_good, k_bad)  # 100 and 773 measured
    assert float(good.stderr.mean()) < 0.4
    _check_close_and_below(good, marginal.log_prob(x), tolerance=0.05)
