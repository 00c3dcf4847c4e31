"""Invariants every bound must satisfy, run over every registered method's objective (each
estimator, each MAPA posterior) and the objectives no method trains with (docs/design.md §1, §3,
§5)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mapa_vae.config import TrainConfig
from mapa_vae.data.dataset import Dataset, make_ground_truth_data
from mapa_vae.evaluation.likelihood import quadrature_log_likelihood
from mapa_vae.evaluation.sbn import exact_log_likelihood
from mapa_vae.inference.exact import compute_posterior
from mapa_vae.inference.objectives import ELBO, IWAE, MAPA, Autoencoder, EmpiricalLogLikelihood, Objective
from mapa_vae.inference.posterior import leave_one_out
from mapa_vae.kernels import GaussianKernel
from mapa_vae.methods import Architecture
from mapa_vae.models.index_proposal import IndexProposalNet
from mapa_vae.models.latent import CodeEncoder
from mapa_vae.models.likelihoods import make_likelihood
from mapa_vae.models.sbn import SBN
from mapa_vae.registry import LIKELIHOODS, METHODS, POSTERIORS

N_ATOMS = 200


@pytest.fixture
def posterior(circle_data):
    return compute_posterior(circle_data, GaussianKernel(0.01))


def brute_force_empirical(model, x: torch.Tensor, atoms: torch.Tensor, noise_var: float) -> torch.Tensor:
    """Eq. 6 with an explicit loop over atoms and a hand-written Gaussian density."""
    d = x.shape[1]
    terms = []
    for i in range(atoms.shape[0]):
        mean = model.decoder.net(model.encoder(atoms[i : i + 1]))[0]  # (D,)
        sq = ((x - mean) ** 2).sum(-1)
        terms.append(-sq / (2 * noise_var) - 0.5 * d * math.log(2 * math.pi * noise_var))
    return torch.logsumexp(torch.stack(terms, -1), -1) - math.log(atoms.shape[0])


def expected_bound(obj: Objective, model, x, index, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo mean and standard error of a stochastic bound over ``draws`` draws."""
    with torch.no_grad():
        vals = torch.stack([obj(model, x, index).value for _ in range(draws)])  # (R, B)
    return vals.mean(0), vals.std(0) / math.sqrt(draws)


def test_exact_empirical_matches_brute_force(mapa_model, circle_data):
    x = circle_data[:30]
    got = EmpiricalLogLikelihood(circle_data, chunk=64)(mapa_model, x).value
    want = brute_force_empirical(mapa_model, x, circle_data, 0.01)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_mapa_with_all_neighbours_is_exact(mapa_model, circle_data, posterior):
    index = torch.arange(0, N_ATOMS, 7)
    x = circle_data[index]
    exact = EmpiricalLogLikelihood(circle_data)(mapa_model, x).value
    got = MAPA(posterior, circle_data, k=N_ATOMS, samples=0)(mapa_model, x, index).value
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-10)


def test_mapa_k1_s0_is_the_autoencoder_term(mapa_model, circle_data, posterior):
    index = torch.arange(40)
    x = circle_data[index]
    got = MAPA(posterior, circle_data, k=1, samples=0)(mapa_model, x, index).value
    want = Autoencoder(N_ATOMS)(mapa_model, x, index).value
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    exact = EmpiricalLogLikelihood(circle_data)(mapa_model, x).value
    assert (got < exact).all()  # Eq. 14: the "gap" is positive


@pytest.mark.parametrize("top_k", [None, 30])
def test_mapa_bound_below_exact_and_tightens_with_k_and_s(mapa_model, circle_data, top_k):
    """E[L_MAPA] <= exact (Eq. 30), and E[L_MAPA] does not fall as k or S grows.

    Tolerance: 4 standard errors of the Monte Carlo mean over 400 draws per setting.
    """
    post = compute_posterior(circle_data, GaussianKernel(0.01), top_k=top_k)
    index = torch.tensor([0, 50, 123])
    x = circle_data[index]
    exact = EmpiricalLogLikelihood(circle_data)(mapa_model, x).value.detach()
    grid = [(1, 10), (1, 40), (1, 150), (5, 40), (20, 40)] if top_k is None else \
        [(1, 10), (1, 40), (1, 150), (5, 40), (25, 40)]
    means = {}
    for k, s in grid:
        gen = torch.Generator().manual_seed(k * 1000 + s)
        m, se = expected_bound(MAPA(post, circle_data, k, s, generator=gen), mapa_model, x, index, 400)
        assert (m <= exact + 4 * se + 1e-9).all(), (k, s, m - exact)
        means[(k, s)] = (m, se)

    def no_drop(a, b):
        (ma, sa), (mb, sb) = means[a], means[b]
        assert (mb >= ma - 4 * torch.sqrt(sa**2 + sb**2) - 1e-9).all(), (a, b, mb - ma)

    no_drop((1, 10), (1, 40))
    no_drop((1, 40), (1, 150))  # in S
    no_drop((1, 40), (5, 40))
    no_drop((5, 40), grid[-1])  # in k
    # and it really moves: more samples close a visible part of the gap on this untrained model
    assert (means[(1, 150)][0] - means[(1, 10)][0]).mean() > 0


def test_forward_pass_reuse_gives_the_same_bound(mapa_model, circle_data, posterior):
    index = torch.arange(0, 100)
    x = circle_data[index]
    reuse = MAPA(posterior, circle_data, 5, 50, reuse=True, generator=torch.Generator().manual_seed(3))
    naive = MAPA(posterior, circle_data, 5, 50, reuse=False, generator=torch.Generator().manual_seed(3))
    a, b = reuse(mapa_model, x, index).value, naive(mapa_model, x, index).value
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert naive.passes.decoder == 100 * 55
    assert reuse.passes.decoder <= N_ATOMS < naive.passes.decoder
    assert reuse.passes.encoder == reuse.passes.decoder


def test_iwae_with_one_sample_is_the_elbo(vae_model, circle_data):
    x = circle_data[:50]
    idx = torch.arange(50)
    torch.manual_seed(11)
    iwae = IWAE(1)(vae_model, x, idx).value
    torch.manual_seed(11)
    elbo = ELBO(1)(vae_model, x, idx).value
    torch.testing.assert_close(iwae, elbo, rtol=0, atol=0)


def test_iwae_below_quadrature_and_tightens(vae_model, circle_data):
    """E[IWAE_S] <= log p(x) (quadrature), rising with S towards it (4 s.e. tolerance)."""
    x = circle_data[:5]
    idx = torch.arange(5)
    exact = quadrature_log_likelihood(vae_model.decoder, x)
    prev = None
    for s in (1, 10, 100, 1000):
        m, se = expected_bound(IWAE(s), vae_model, x, idx, 200)
        assert (m <= exact + 4 * se + 1e-9).all(), (s, m - exact)
        if prev is not None:
            assert (m >= prev[0] - 4 * torch.sqrt(se**2 + prev[1] ** 2)).all()
        prev = (m, se)
    assert (exact - prev[0]).abs().max() < 0.5  # S = 1000 is close on this 1-D model


def method_cases() -> list[tuple[str, str, str | None]]:
    """Every registered method with every estimator it takes and, for MAPA, every registered
    posterior: read from the registries, so a new entry is tested the day it is registered."""
    cases = []
    for name, method in METHODS.items():
        for estimator in method.estimators or ("naive",):
            posteriors = tuple(POSTERIORS) if method.uses_k else (None,)
            cases += [(name, estimator, posterior) for posterior in posteriors]
    return cases


def build_case(name: str, estimator: str, posterior: str | None, cache: Path):
    """The method's model (float64, small networks) and objective on data its likelihood takes:
    the circle for a Gaussian, random bits for a Bernoulli. Returns (model, objective, x, data)."""
    method = METHODS[name]
    likelihood = method.likelihoods[0] if method.likelihoods else "gaussian"
    if likelihood == "gaussian":
        data = make_ground_truth_data("circle", 60, 10, 10, seed=0)
    else:
        bits = (torch.rand(80, 12, dtype=torch.float64) < 0.3).double()
        data = Dataset("bits", bits[:60], bits[60:70], bits[70:])
    cfg = TrainConfig(data=data.name, method=name, estimator=estimator, likelihood=likelihood,
                      posterior=posterior or "kernel", samples=4, k=2, hidden=(8,), layers=(6,),
                      inducing=4, cache_dir=str(cache), dtype="float64")
    method.check(cfg)
    lik = make_likelihood(LIKELIHOODS[likelihood].settings(cfg, data))
    model = method.build(Architecture(data.dim, 1, (8,), "tanh"), lik, cfg).double()
    x = data.train.double()
    return model, method.objective(model, x, cfg, data), x, data


def reference_log_likelihood(model, x: torch.Tensor) -> torch.Tensor:
    """What the bound bounds, exactly: the SBN's enumeration, the empiricalized likelihood of a
    deterministic encoder's model (Eq. 6), else quadrature over the 1-D latent."""
    with torch.no_grad():
        if isinstance(model, SBN):
            return exact_log_likelihood(model, x)
        if isinstance(model.encoder, CodeEncoder):
            return EmpiricalLogLikelihood(x)(model, x).value
        return quadrature_log_likelihood(model.decoder, x, 2**10)


_SHIFT = f"index_proposal.scorer.{len(IndexProposalNet(1).scorer) - 1}.bias"
UNUSED = {"learned-nvil": (_SHIFT,), "learned-vimco": (_SHIFT, "index_proposal.baseline")}
"""Parameters a model carries that its objective cannot train: the scorer's last bias shifts every
candidate's score alike, which the proposal's softmax ignores (its gradient is exactly zero); and
VIMCO's leave-one-out signal needs no baseline, but the index proposal builds NVIL's for both."""


@pytest.mark.parametrize(("name", "estimator", "posterior"), method_cases(),
                         ids=["-".join(filter(None, c)) for c in method_cases()])
def test_every_method_objective_shape_gradients_passes_and_bound(name, estimator, posterior,
                                                                 tmp_path):
    model, obj, x, _ = build_case(name, estimator, posterior, tmp_path)
    index = torch.arange(10, 42)
    # a bound, not an estimate above the truth: below what it bounds, on average over the batch
    exact = reference_log_likelihood(model, x[index])
    with torch.no_grad():
        value = obj(model, x[index], index).value
    assert float(value.mean()) <= float(exact.mean()) + 1e-9
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):  # after one step, past any layer that starts at zero (a proposal's last)
        opt.zero_grad()
        bound = obj(model, x[index], index)
        (-bound.surrogate.mean()).backward()
        opt.step()
    assert bound.value.shape == (32,) and bound.surrogate.shape == (32,)
    assert torch.isfinite(bound.value).all() and torch.isfinite(bound.surrogate).all()
    unused = UNUSED.get(posterior or "", ())
    for pname, p in model.named_parameters():
        if not pname.startswith(unused):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"
    assert obj.passes.points == 32 * 3 and obj.passes.decoder > 0


def objectives(circle_data, posterior):
    """The objectives no method trains with: checked here beside the methods' own."""
    return {
        "mapa-exact": (MAPA(posterior, circle_data, N_ATOMS, 0), "mapa"),
        "empirical": (EmpiricalLogLikelihood(circle_data), "mapa"),
        "autoencoder": (Autoencoder(N_ATOMS), "mapa"),
    }


@pytest.mark.parametrize("name", ["mapa-exact", "empirical", "autoencoder"])
def test_other_objectives_shape_gradients_and_pass_count(name, circle_data, posterior, mapa_model):
    obj, _ = objectives(circle_data, posterior)[name]
    model = mapa_model
    index = torch.arange(10, 42)
    bound = obj(model, circle_data[index], index)
    assert bound.value.shape == (32,) and bound.surrogate.shape == (32,)
    assert torch.isfinite(bound.value).all()
    (-bound.surrogate.mean()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"
    assert obj.passes.points == 32 and obj.passes.decoder > 0 and obj.passes.encoder > 0
    with torch.no_grad():
        exact = EmpiricalLogLikelihood(circle_data)(model, circle_data[index]).value
    assert float(bound.value.detach().mean()) <= float(exact.mean()) + 1e-9


@pytest.mark.parametrize("ratio", [0, 10**9])
def test_pairs_scored_by_matmul_equal_elementwise_scoring(ratio, monkeypatch):
    """Bernoulli pairs: one matrix product (then gather) and the elementwise (B, m, D) path give
    the same log-densities and gradients (float64), whichever the switch picks."""
    from mapa_vae.inference import objectives
    from mapa_vae.models.likelihoods import BernoulliLikelihood

    monkeypatch.setattr(objectives, "MATMUL_PAIRS_RATIO", ratio)
    gen = torch.Generator().manual_seed(0)
    lik = BernoulliLikelihood()
    params = torch.randn(40, 64, generator=gen, dtype=torch.float64, requires_grad=True)
    x = (torch.rand(7, 64, generator=gen) < 0.3).double()
    inverse = torch.randint(0, 40, (7, 11), generator=gen)
    got = objectives.score_pairs(lik, params, x, inverse)
    (grad,) = torch.autograd.grad(got.sum(), params)
    want = torch.stack([torch.stack([
        (x[b] * params[j] - torch.nn.functional.softplus(params[j])).sum() for j in inverse[b]])
        for b in range(7)])  # Σ_d x log σ(l) + (1-x) log σ(-l), written out pair by pair
    (want_grad,) = torch.autograd.grad(want.sum(), params)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-10)


def test_bernoulli_mapa_bound_is_the_same_with_reuse(monkeypatch):
    """On binary data MAPA scores a batch's pairs by matrix product (reuse) or one pass per pair
    (no reuse): the same bound, and it stays below the exact empiricalized likelihood."""
    from mapa_vae.inference import objectives
    from mapa_vae.kernels import BernoulliKernel
    from mapa_vae.models.latent import CodeEncoder, Decoder, LatentVariableModel, StandardNormal
    from mapa_vae.models.likelihoods import BernoulliLikelihood
    from mapa_vae.models.networks import MLP

    monkeypatch.setattr(objectives, "MATMUL_PAIRS_RATIO", 10**9)  # always the product
    torch.manual_seed(0)
    atoms = (torch.rand(120, 16) < 0.3).double()
    model = LatentVariableModel(CodeEncoder(MLP(16, 2, (8,), "tanh")),
                                Decoder(MLP(2, 16, (8,), "tanh"), BernoulliLikelihood()),
                                StandardNormal(2)).double()
    post = compute_posterior(atoms, BernoulliKernel(0.9))
    index = torch.arange(0, 60)
    reuse = MAPA(post, atoms, 3, 20, reuse=True, generator=torch.Generator().manual_seed(1))
    naive = MAPA(post, atoms, 3, 20, reuse=False, generator=torch.Generator().manual_seed(1))
    a, b = reuse(model, atoms[index], index).value, naive(model, atoms[index], index).value
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    exact = EmpiricalLogLikelihood(atoms)(model, atoms[index]).value
    mean, se = expected_bound(reuse, model, atoms[index], index, 200)
    assert bool((mean <= exact + 4 * se + 1e-9).all())


def test_leave_one_out_mapa_is_the_exact_leave_one_out_sum_and_a_bound(mapa_model, circle_data, posterior):
    """With ``q(n | n)`` removed (``--posterior kernel-loo``), ``k = N - 1, S = 0`` gives
    ``log Σ_{i≠n} p(x_n | f(g(x_i))) - log N`` exactly, below the empiricalized log-likelihood;
    on a sparse table the rows stay normalized and tail draws never land on ``n``."""
    index = torch.arange(0, N_ATOMS, 9)
    x = circle_data[index]
    got = MAPA(leave_one_out(posterior), circle_data, k=N_ATOMS - 1, samples=0)(mapa_model, x, index).value
    with torch.no_grad():
        params = mapa_model.decoder.net(mapa_model.encoder(circle_data))  # (N, D)
        pairs = mapa_model.decoder.likelihood.pairwise_log_prob(params, x)  # (B, N)
        pairs[torch.arange(index.numel()), index] = -math.inf
    torch.testing.assert_close(got, torch.logsumexp(pairs, -1) - math.log(N_ATOMS), rtol=0, atol=1e-10)
    exact = EmpiricalLogLikelihood(circle_data)(mapa_model, x).value
    assert (got < exact).all()
    sparse = leave_one_out(compute_posterior(circle_data, GaussianKernel(0.5), top_k=30))
    mass = torch.logaddexp(torch.logsumexp(sparse.log_q, -1), sparse.log_rest)
    torch.testing.assert_close(mass, torch.zeros_like(mass), rtol=0, atol=1e-12)
    rows = torch.arange(N_ATOMS)
    assert (sparse.top(rows, 1)[:, 0] != rows).all()  # B_n(1): the nearest other point
    drawn, _ = sparse.sample_tail(rows, 1, 400, torch.Generator().manual_seed(0))  # (N, 400)
    assert not (drawn == rows[:, None]).any()
    gen = torch.Generator().manual_seed(3)
    m, se = expected_bound(MAPA(sparse, circle_data, 1, 20, generator=gen), mapa_model, x, index, 200)
    assert (m <= exact + 4 * se + 1e-9).all()
