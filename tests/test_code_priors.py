"""Priors fitted to MAPA's codes when the latent has more than one dimension (SPEC §4, §8).

Each property runs over every prior in :data:`CODE_PRIORS`, fitted once per module to 2-D
codes on a noisy ring, a density no Gaussian fits and whose exact form is known.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch.distributions import (
    AffineTransform,
    Categorical,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    TransformedDistribution,
)

from mapa_vae.errors import MapaError
from mapa_vae.evaluation.likelihood import importance_log_likelihood
from mapa_vae.models.code_priors import (
    CodePrior,
    FlowPrior,
    KernelDensityPrior,
    build_code_prior,
    fit_code_prior,
)
from mapa_vae.models.latent import CodeEncoder, Decoder, LatentVariableModel, StandardNormal
from mapa_vae.models.likelihoods import GaussianLikelihood
from mapa_vae.models.networks import MLP
from mapa_vae.registry import CODE_PRIORS

CENTER, RADIUS, WIDTH = (3.0, -1.0), 2.0, 0.15
# small enough to fit in seconds (the defaults are for real runs); TINY for the 200-point model
CONFIGS: dict[str, dict[str, Any]] = {
    "mixture": {"components": 10}, "flow": {"transforms": 3, "hidden": [32, 32]}, "kde": {}}
TINY: dict[str, dict[str, Any]] = {
    "mixture": {"components": 4}, "flow": {"transforms": 2, "hidden": [16, 16]}, "kde": {}}
STEPS = {"mixture": 200, "flow": 3000, "kde": 40}  # the flow stops early (275 steps)
USED: dict[str, int] = {}  # steps or iterations each fixture's fit used
ATOMS = {"kde": 1000}  # a kernel density costs O(atoms) per point: keeps the grid test to seconds


def ring(n: int, g: torch.Generator) -> torch.Tensor:
    """``z = c + r (cos t, sin t)``, ``t ~ U(0, 2π)``, ``r ~ N(R, w²)``: codes ``(n, 2)``."""
    t = torch.rand(n, generator=g) * 2 * math.pi
    r = RADIUS + WIDTH * torch.randn(n, generator=g)
    return torch.stack([CENTER[0] + r * t.cos(), CENTER[1] + r * t.sin()], -1)


def ring_log_prob(z: torch.Tensor) -> torch.Tensor:
    """The ring's exact density: polar coordinates, ``p(z) = N(|z - c|; R, w²) / (2π |z - c|)``."""
    r = (z - torch.tensor(CENTER, dtype=z.dtype)).norm(dim=-1)
    return Normal(RADIUS, WIDTH).log_prob(r) - torch.log(2 * math.pi * r)


@pytest.fixture(scope="module")
def codes() -> tuple[torch.Tensor, torch.Tensor]:
    """2000 training and 500 held-out float32 ring codes."""
    g = torch.Generator().manual_seed(0)
    return ring(2000, g), ring(500, g)


@pytest.fixture(scope="module", params=sorted(CODE_PRIORS))
def fitted(request, codes) -> CodePrior:
    """Each prior fitted in float32 (as after training), then converted to float64."""
    train, held = codes
    torch.manual_seed(0)
    prior = build_code_prior(request.param, 2, **CONFIGS[request.param])
    USED[request.param] = prior.fit(train[: ATOMS.get(request.param)], held, STEPS[request.param])
    return prior.double()


def test_the_fitted_density_integrates_to_one(fitted):
    """Midpoint rule on a 0.02 grid over the ring ± 1.5 (10 widths): measured |1 - ∫| is
    8e-4 for the flow (3 transforms) and 1e-10 for the mixture; a missing Jacobian of the
    standardization would be off by the factor Π s ≈ 2."""
    h = 0.02
    ax = torch.arange(-3.5 + h / 2, 3.5, h, dtype=torch.float64)  # (350,)
    z = torch.stack(torch.meshgrid(ax + CENTER[0], ax + CENTER[1], indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        log_p = torch.cat([fitted().log_prob(chunk) for chunk in z.split(2**16)])  # (350²,)
    integral = float(torch.logsumexp(log_p, 0).exp()) * h * h
    assert abs(integral - 1) < 5e-3, integral


def test_fitted_prior_beats_gaussians_and_nears_the_truth_on_held_out_codes(fitted, codes):
    train, held = (c.double() for c in codes)
    with torch.no_grad():
        score = float(fitted().log_prob(held).mean())
    truth = float(ring_log_prob(held).mean())  # -2.02 nats
    gaussian = float(MultivariateNormal(train.mean(0), train.T.cov()).log_prob(held).mean())  # -3.55
    standard = float(StandardNormal(2).double()().log_prob(held).mean())  # -8.75
    assert score > gaussian + 1.0 and score > standard + 5.0  # measured: -2.04 (flow), -2.06 (mixture)
    assert truth - 0.1 < score < truth + 0.1


def test_samples_match_the_codes_moments(fitted, codes):
    """20 000 draws: mean and covariance within 0.1 of the codes' (sd ≈ 1.4, variance ≈ 2);
    measured differences are at most 0.03."""
    train = codes[0].double()
    z = fitted().sample((20_000,))  # (20000, 2)
    assert z.shape == (20_000, 2) and z.dtype == torch.float64
    torch.testing.assert_close(z.mean(0), train.mean(0), atol=0.1, rtol=0)
    torch.testing.assert_close(z.T.cov(), train.T.cov(), atol=0.1, rtol=0)


def test_save_load_round_trip_is_bit_identical(fitted):
    kind = fitted.kind
    loaded = build_code_prior(kind, 2, **CONFIGS[kind]).double()
    assert fitted.config() == build_code_prior(kind, 2, **fitted.config()).config()
    loaded.load_state_dict(fitted.state_dict())
    z = torch.randn(100, 2, dtype=torch.float64) * 2 + torch.tensor(CENTER, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded().log_prob(z), fitted().log_prob(z))
        single = build_code_prior(kind, 2, **fitted.config())  # float32, as a checkpoint loads
        single.load_state_dict({k: v.float() for k, v in fitted.state_dict().items()})
        twin = build_code_prior(kind, 2, **fitted.config())
        twin.load_state_dict(single.state_dict())
        assert torch.equal(single().log_prob(z.float()), twin().log_prob(z.float()))
        assert torch.equal(single.double()().log_prob(z), twin.double()().log_prob(z))


@pytest.mark.parametrize("kind", sorted(CODE_PRIORS))
@pytest.mark.parametrize("latent_dim", [1, 3])
def test_unfitted_priors_have_the_declared_shapes_and_dtype(kind, latent_dim):
    prior = build_code_prior(kind, latent_dim).double()
    p = prior()
    assert p.event_shape == (latent_dim,)
    z = p.sample((7, 5))
    assert z.shape == (7, 5, latent_dim) and z.dtype == torch.float64
    assert p.log_prob(z).shape == (7, 5) and bool(p.log_prob(z).isfinite().all())


def test_build_code_prior_rejects_unknown_kinds_and_options():
    with pytest.raises(MapaError, match="unknown code prior"):
        build_code_prior("parzen", 2)
    with pytest.raises(MapaError, match="bad mixture prior config"):
        build_code_prior("mixture", 2, transforms=3)
    with pytest.raises(MapaError, match="cannot fit 10 mixture components"):
        build_code_prior("mixture", 2, components=10).fit(torch.zeros(5, 2), torch.zeros(1, 2), 10)


def _mapa_2d() -> LatentVariableModel:
    return LatentVariableModel(
        CodeEncoder(MLP(2, 2, (16, 16))),
        Decoder(MLP(2, 2, (16, 16)), GaussianLikelihood(0.01)),
        StandardNormal(2),
    ).double()


@pytest.mark.parametrize("kind", sorted(CODE_PRIORS))
def test_fit_code_prior_gives_a_model_to_sample_and_evaluate(kind, circle_data):
    model = _mapa_2d()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    new, info = fit_code_prior(model, circle_data, kind=kind, steps=100, **TINY[kind])
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    assert isinstance(model.prior, StandardNormal)  # the trained model is not modified
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(new.prior, CODE_PRIORS[kind]) and new.latent_dim == 2
    assert not any(p.requires_grad for p in new.parameters())
    for part in ("encoder", "decoder"):
        old = getattr(model, part).state_dict()
        assert all(torch.equal(v, old[k]) for k, v in getattr(new, part).state_dict().items())
    assert info["prior_kind"] == kind and 0 < info["prior_fit_steps"] <= 100
    assert all(math.isfinite(info[k]) for k in ("prior_train_log_lik", "prior_held_out_log_lik",
                                                 "prior_held_out_log_lik_gaussian"))
    assert new.sample(100).shape == (100, 2)
    log_p = importance_log_likelihood(new, circle_data, samples=500)
    assert log_p.shape == (200,) and bool(log_p.isfinite().all())
    # the same seed refits the same prior, bit for bit
    again, _ = fit_code_prior(model, circle_data, kind=kind, steps=100, **TINY[kind])
    z = torch.randn(50, 2, dtype=torch.float64)
    assert torch.equal(again.prior().log_prob(z), new.prior().log_prob(z))


def test_fit_code_prior_needs_a_deterministic_encoder(vae_model, circle_data):
    with pytest.raises(MapaError, match="deterministic encoder"):
        fit_code_prior(vae_model, circle_data, kind="mixture")


# ----------------------------------------------------------------------------- the kernel density


def test_kde_integrates_to_one_in_one_dimension_and_matches_its_mixture():
    g = torch.Generator().manual_seed(1)
    atoms = torch.cat([torch.randn(300, 1, generator=g, dtype=torch.float64) * 0.3 - 2,
                       torch.rand(200, 1, generator=g, dtype=torch.float64) * 3])
    prior = KernelDensityPrior(1, bandwidth=0.2).double()
    prior.fit(atoms, atoms[:10], steps=1)
    z = torch.linspace(-6, 6, 24_001, dtype=torch.float64)[:, None]  # midpoint-free trapezoid
    with torch.no_grad():
        p = prior().log_prob(z).exp()
    integral = float(torch.trapezoid(p, z[:, 0]))
    assert abs(integral - 1) < 1e-6, integral
    mixture = MixtureSameFamily(Categorical(logits=torch.zeros(500, dtype=torch.float64)),
                                Normal(atoms[:, 0], prior.bandwidth))  # 0.2 stored in float32
    torch.testing.assert_close(prior().log_prob(z[::100]), mixture.log_prob(z[::100, 0]),
                               rtol=0, atol=1e-10)


def test_kde_log_prob_in_chunks_is_the_whole_sum(monkeypatch):
    prior = KernelDensityPrior(3, bandwidth=0.5).double()
    prior.fit(torch.randn(700, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), 1)
    z = torch.randn(4, 50, 3, dtype=torch.float64) * 2
    whole = prior().log_prob(z)
    monkeypatch.setattr(type(prior()), "_CHUNK_ENTRIES", 700 * 7)  # 7 queries a chunk
    assert whole.shape == (4, 50)
    torch.testing.assert_close(prior().log_prob(z), whole, rtol=0, atol=1e-12)
    # far from every atom: log space, no underflow to -inf
    assert bool(torch.isfinite(prior().log_prob(torch.full((1, 3), 100.0, dtype=torch.float64))).all())


def test_kde_samples_follow_its_density():
    """Kolmogorov-Smirnov in 1-D against the exact CDF ``(1/N) Σ Φ((t - a_n) / h)``: 20 000
    draws give D < 0.0136 (the 1 % level); sampling atoms without the kernel noise gives
    D ≈ 0.05, a bandwidth off by 2x D ≈ 0.03."""
    atoms = torch.tensor([[-2.0], [-1.9], [0.0], [0.4], [3.0]], dtype=torch.float64)
    prior = KernelDensityPrior(1, bandwidth=0.3).double()
    prior.fit(atoms, atoms, 1)
    torch.manual_seed(0)
    z = torch.sort(prior().sample((20_000,))[:, 0]).values
    cdf = Normal(atoms[:, 0], 0.3).cdf(z[:, None]).mean(1)  # (20000,)
    empirical = torch.arange(1, 20_001, dtype=torch.float64) / 20_000
    ks = float(torch.maximum((empirical - cdf).abs(), (empirical - 1 / 20_000 - cdf).abs()).max())
    assert ks < 1.63 / math.sqrt(20_000), ks


def test_kde_bandwidth_is_the_held_out_optimum(codes):
    train, held = (c.double() for c in codes)
    prior = KernelDensityPrior(2).double()
    used = prior.fit(train, held, steps=40)
    h = float(prior.bandwidth)
    assert 0 < used <= 40 and 0.01 < h < 1.0

    def score(bw: float) -> float:
        fixed = KernelDensityPrior(2, bandwidth=bw).double()
        fixed.fit(train, held, 1)
        return float(fixed().log_prob(held).mean())

    best = score(h)
    assert best >= score(1.1 * h) and best >= score(h / 1.1)  # a maximum within 10 %
    assert best > score(3 * h) + 0.05 and best > score(h / 3) + 0.05
    assert best > float(ring_log_prob(held).mean()) - 0.3  # measured: -2.16 against -2.02


@pytest.mark.parametrize("bandwidth", [0.0, -1.0, math.nan, math.inf])
def test_kde_bandwidth_must_be_positive(bandwidth):
    with pytest.raises(MapaError, match="--kde-bandwidth"):
        build_code_prior("kde", 2, bandwidth=bandwidth)


def test_flow_fit_stops_where_the_held_out_score_flattens(fitted, codes):
    """Given 3000 steps (the fixture's budget), the flow stops once four checks in a row (100
    steps) gain under 0.05 nats per code over the last real gain, and keeps its best average
    (the fixture's other tests check its quality; measured: 275 steps)."""
    if fitted.kind != "flow":
        pytest.skip("early stopping is the flow's")
    assert 100 <= USED["flow"] <= 1000


def test_flow_stop_rule_counts_checks_without_a_real_gain(codes):
    """No gain can reach ``min_delta = 1e9``: the first check sets the mark, then ``patience``
    checks in a row fail it, so the fit stops at ``every · (patience + 1)`` steps; a budget
    below that stops it at the budget."""
    train, held = codes
    for steps, used in ((1000, 15), (12, 12)):
        torch.manual_seed(0)
        prior = FlowPrior(2, transforms=1, hidden=(8,))
        assert prior.fit(train, held, steps, every=5, patience=2, min_delta=1e9) == used


def test_flow_prior_is_the_running_mean_of_the_adam_iterates(codes):
    """For its first ``1 / (1 - average)`` steps the fitted flow is the plain mean of the Adam
    iterates, and with ``average = 0`` the last iterate itself, bit for bit: replayed here on
    the whole (200-code) batch, so no draw differs; the fit's only check is at its last step,
    so that is what it keeps."""
    train, held = codes[0][:200].double(), codes[1][:50].double()
    torch.manual_seed(0)
    prior = FlowPrior(2, transforms=1, hidden=(8,)).double()
    fast = copy.deepcopy(prior.flow)
    assert prior.fit(train, held, 5, lr=1e-2, batch_size=200, every=5, average=0.98) == 5
    shift = AffineTransform(train.mean(0), train.std(0), event_dim=1)
    opt = torch.optim.Adam(fast.parameters(), lr=1e-2)
    iterates = []
    for _ in range(5):
        loss = -TransformedDistribution(fast(), shift).log_prob(train).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        iterates.append([p.detach().clone() for p in fast.parameters()])
    for fitted_p, *values in zip(prior.flow.parameters(), *iterates, strict=True):
        mean = torch.stack(values).mean(0)
        torch.testing.assert_close(fitted_p.detach(), mean, rtol=0, atol=1e-12)
        assert not torch.allclose(mean, values[-1])  # the mean is not the last iterate
    torch.manual_seed(0)
    plain = FlowPrior(2, transforms=1, hidden=(8,)).double()
    plain.fit(train, held, 5, lr=1e-2, batch_size=200, every=5, average=0.0)  # the iterate itself
    for plain_p, last in zip(plain.flow.parameters(), iterates[-1], strict=True):
        assert torch.equal(plain_p.detach(), last)


def test_the_flow_is_zukos_neural_spline_flow_with_a_faster_softmax():
    """:class:`FlowPrior`'s flow and ``zuko.flows.NSF`` with the same parameters give the same
    log-density, gradients and samples (the only change is how the bins' softmax is taken),
    including for spline inputs pushed to zuko's bound on the unconstrained widths."""
    import zuko

    torch.manual_seed(0)
    ours = FlowPrior(3, transforms=2, hidden=(16, 16)).double().flow
    with torch.no_grad():  # large hypernetwork outputs: widths near zuko's bound |log slope| / 2
        for p in ours.parameters():
            p.mul_(20.0)
    theirs = zuko.flows.NSF(3, transforms=2, hidden_features=(16, 16), bins=8).double()
    theirs.load_state_dict(ours.state_dict())
    z = 3 * torch.randn(500, 3, dtype=torch.float64)
    lp_ours, lp_theirs = ours().log_prob(z), theirs().log_prob(z)
    torch.testing.assert_close(lp_ours, lp_theirs, rtol=1e-10, atol=1e-10)
    g_ours = torch.autograd.grad(lp_ours.sum(), list(ours.parameters()))
    g_theirs = torch.autograd.grad(lp_theirs.sum(), list(theirs.parameters()))
    for a, b in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    torch.manual_seed(1)
    s_ours = ours().sample((200,))
    torch.manual_seed(1)
    torch.testing.assert_close(s_ours, theirs().sample((200,)), rtol=1e-10, atol=1e-10)
