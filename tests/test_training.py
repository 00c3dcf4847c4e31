"""The training loop: run directories that rebuild the model, refusals, binary data and 2-D latents,
and the main job end to end (small profile). Resume: ``test_resume.py``; non-finite steps:
``test_nonfinite.py``; R copies: ``test_restarts.py``."""

from __future__ import annotations

import json

import pytest
import torch

from mapa_vae.config import TrainConfig
from mapa_vae.errors import MapaError
from mapa_vae.evaluation.likelihood import quadrature_log_likelihood
from mapa_vae.experiments.compare import compare
from mapa_vae.training.loop import train
from mapa_vae.training.runs import load_run


@pytest.mark.parametrize("method", ["mapa", "vae", "iwae"])
def test_run_directory_rebuilds_the_model(tiny_config, tmp_path, method):
    result = train(tiny_config(method=method, samples=10), tmp_path / "run", progress=False)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "model.pt", "trained.pt", "checkpoint.pt", "metrics.json",
            "history.json"} <= files
    run = load_run(tmp_path / "run")
    assert run.data_dim == 2 and run.config == result.config
    x = result.data.test[:50]
    torch.testing.assert_close(quadrature_log_likelihood(run.model.decoder, x, 2**10),
                               quadrature_log_likelihood(result.model.decoder, x, 2**10),
                               rtol=0, atol=0)
    trained = load_run(tmp_path / "run", which="trained").model
    for a, b in zip(trained.state_dict().values(), result.trained.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test_kl"] > 0  # four epochs are far from the truth
    per_point = metrics["passes_per_point_per_step"]
    if method == "iwae":
        assert per_point == {"encoder": 1.0, "decoder": 10.0, "encoder+decoder": 11.0}
    elif method == "mapa":
        assert 1.0 <= per_point["decoder"] <= 11.0  # unique indices of k + S = 11 per point


def test_unknown_method_and_bad_values_are_rejected():
    with pytest.raises(MapaError, match="unknown method"):
        TrainConfig(method="vampire")
    with pytest.raises(MapaError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(MapaError, match="unknown code prior"):
        TrainConfig(method="mapa", latent_dim=2, code_prior="vampprior")
    with pytest.raises(MapaError, match="neither a built-in data set"):
        train(TrainConfig(data="spiral"), progress=False)


@pytest.mark.slow
def test_main_job_end_to_end_small_profile(tmp_path, capsys):
    metrics = compare("circle", tmp_path / "cmp", epochs=3, samples=10, progress=False,
                      cache_dir=str(tmp_path / "cache"), n_train=200, n_val=100, n_test=200,
                      eval_every=2, val_grid=2**10, test_grid=2**12, prior_steps=100, restarts=1)
    assert set(metrics) == {"mapa", "vae", "iwae"}
    table = capsys.readouterr().out
    for method in ("mapa", "vae", "iwae"):
        assert f"| {method} |" in table
        assert metrics[method]["test_kl"] > 0
    for name in ("comparison.json", "comparison.md", "samples.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    assert (tmp_path / "cmp" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_mapa_learns_the_circle(tmp_path):
    """A short MAPA run gets close to the ground truth: a result, not only a file."""
    cfg = TrainConfig(data="circle", method="mapa", samples=20, epochs=60, n_train=500,
                      n_val=200, n_test=500, eval_every=10, prior_steps=1500,
                      cache_dir=str(tmp_path / "cache"))
    result = train(cfg, progress=False)
    assert result.metrics["test_kl"] < 0.3, result.metrics["test_kl"]


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli"])
@pytest.mark.parametrize("method", ["mapa", "iwae"])
def test_binary_data_trains_with_unit_interval_likelihoods(tmp_path, likelihood, method):
    """User data in {0, 1}: the Bernoulli kernel builds the posterior, quadrature evaluates."""
    import numpy as np

    rng = np.random.default_rng(0)
    prototypes = rng.random((4, 12)) < 0.5
    x = prototypes[rng.integers(0, 4, 300)] ^ (rng.random((300, 12)) < 0.05)  # noisy copies
    np.save(tmp_path / "bits.npy", x.astype(np.float64))
    cfg = TrainConfig(data=str(tmp_path / "bits.npy"), method=method, likelihood=likelihood,
                      samples=10, epochs=3, eval_every=1, val_grid=2**10, test_grid=2**12,
                      prior_steps=50, cache_dir=str(tmp_path / "cache"))
    result = train(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(result.metrics["test_log_lik"])
    history = [h["train_bound"] for h in result.history]
    assert history[-1] > history[0]  # the bound rises
    run = load_run(tmp_path / "run")
    assert run.model.decoder.likelihood.name == likelihood
    samples = run.model.sample(20)
    assert samples.shape == (20, 12) and ((samples >= 0) & (samples <= 1)).all()


def test_two_dimensional_latent_trains_and_evaluates_by_importance_sampling(tiny_config, tmp_path):
    result = train(tiny_config(method="vae", latent_dim=2), tmp_path / "run", progress=False)
    assert torch.isfinite(torch.tensor(result.metrics["test_log_lik"]))
    assert result.metrics["test_kl"] > 0
    run = load_run(tmp_path / "run")
    assert run.model.latent_dim == 2 and run.model.sample(10).shape == (10, 2)


@pytest.mark.parametrize("code_prior", ["flow", "mixture"])
def test_mapa_with_a_two_dimensional_latent_fits_a_code_prior(tiny_config, tmp_path, code_prior):
    """L > 1: a flow or mixture fitted to the codes is the prior; the run reloads from disk."""
    cfg = tiny_config(method="mapa", latent_dim=2, code_prior=code_prior, code_prior_steps=50,
               flow_hidden=(16, 16))
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.metrics["prior_kind"] == code_prior
    assert torch.isfinite(torch.tensor(result.metrics["test_log_lik"]))
    run = load_run(tmp_path / "run")
    z = torch.randn(7, 2)
    torch.testing.assert_close(run.model.prior().log_prob(z), result.model.prior().log_prob(z),
                               rtol=0, atol=0)
    assert run.model.sample(10).shape == (10, 2)
