"""The training loop, run directories, resume, and the main job end to end (small profile)."""

from __future__ import annotations

import json

import pytest
import torch

from mapa_vae.config import TrainConfig
from mapa_vae.errors import MapaError
from mapa_vae.evaluation.likelihood import quadrature_log_likelihood
from mapa_vae.experiments.compare import compare
from mapa_vae.storage import load_tensors
from mapa_vae.training.loop import train
from mapa_vae.training.runs import load_run

TINY = dict(n_train=200, n_val=100, n_test=200, eval_every=2, val_grid=2**10, test_grid=2**12,
            prior_steps=100, restarts=1)  # single runs; tests/test_restarts.py: R > 1


def tiny(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{"data": "circle", "samples": 10, "epochs": 4,
                          "cache_dir": str(tmp_path / "cache"), **TINY, **kw})


@pytest.mark.parametrize("method", ["mapa", "vae", "iwae"])
def test_run_directory_rebuilds_the_model(tmp_path, method):
    result = train(tiny(tmp_path, method=method), tmp_path / "run", progress=False)
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


@pytest.mark.parametrize("method", ["mapa", "iwae"])
def test_resume_continues_exactly(tmp_path, method):
    """8 epochs straight equal 4 epochs, then a resumed run to 8: bit for bit on CPU."""
    straight = train(tiny(tmp_path, method=method, epochs=8), tmp_path / "a", progress=False)
    train(tiny(tmp_path, method=method, epochs=4), tmp_path / "b", progress=False)
    resumed = train(tiny(tmp_path, method=method, epochs=8), tmp_path / "b", progress=False,
                    resume=True)
    for a, b in zip(straight.trained.state_dict().values(), resumed.trained.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    ck_a = load_tensors(tmp_path / "a" / "checkpoint.pt")
    ck_b = load_tensors(tmp_path / "b" / "checkpoint.pt")
    assert ck_a["epoch"] == ck_b["epoch"] == 8
    for s_a, s_b in zip(ck_a["optimizer"]["state"].values(), ck_b["optimizer"]["state"].values(),
                        strict=True):
        assert all(torch.equal(s_a[k], s_b[k]) for k in s_a)


def test_resume_of_a_checkpoint_written_before_copies(tmp_path):
    """A single run's checkpoint in the format written before runs trained copies (no per-copy
    state; history values as floats) resumes to the same weights and history as a run straight
    through."""
    from mapa_vae.storage import save_tensors

    straight = train(tiny(tmp_path, method="mapa", epochs=6), tmp_path / "a", progress=False)
    train(tiny(tmp_path, method="mapa", epochs=4), tmp_path / "b", progress=False)
    ck = load_tensors(tmp_path / "b" / "checkpoint.pt")
    ck["torch_rng"] = ck["restarts"]["rng"][0]  # the run's generator, as a single run kept it
    del ck["restarts"]
    ck["history"] = [{k: v for k, v in h.items() if not k.endswith("_per_copy")} for h in ck["history"]]
    save_tensors(tmp_path / "b" / "checkpoint.pt", ck)
    resumed = train(tiny(tmp_path, method="mapa", epochs=6), tmp_path / "b", progress=False,
                    resume=True)
    for a, b in zip(straight.trained.state_dict().values(), resumed.trained.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert resumed.history == straight.history
    assert resumed.metrics["skipped_steps"] == straight.metrics["skipped_steps"]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(MapaError, match="no checkpoint"):
        train(tiny(tmp_path), tmp_path / "nothing", progress=False, resume=True)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    """A NaN bound at one step leaves the weights as they were and is reported."""
    from mapa_vae.inference import objectives

    calls = {"n": 0}
    original = objectives.MAPA.__call__

    def poisoned(self, model, x, index):
        calls["n"] += 1
        bound = original(self, model, x, index)
        if calls["n"] == 3:
            return objectives.Bound(bound.value * float("nan"), bound.surrogate * float("nan"))
        return bound

    monkeypatch.setattr(objectives.MAPA, "__call__", poisoned)
    result = train(tiny(tmp_path, epochs=2), tmp_path / "run", progress=False)
    assert result.metrics["skipped_steps"] == 1
    ck = load_tensors(tmp_path / "run" / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


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
                      cache_dir=str(tmp_path / "cache"), **TINY)
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


def test_two_dimensional_latent_trains_and_evaluates_by_importance_sampling(tmp_path):
    result = train(tiny(tmp_path, method="vae", latent_dim=2), tmp_path / "run", progress=False)
    assert torch.isfinite(torch.tensor(result.metrics["test_log_lik"]))
    assert result.metrics["test_kl"] > 0
    run = load_run(tmp_path / "run")
    assert run.model.latent_dim == 2 and run.model.sample(10).shape == (10, 2)


@pytest.mark.parametrize("code_prior", ["flow", "mixture"])
def test_mapa_with_a_two_dimensional_latent_fits_a_code_prior(tmp_path, code_prior):
    """L > 1: a flow or mixture fitted to the codes is the prior; the run reloads from disk."""
    cfg = tiny(tmp_path, method="mapa", latent_dim=2, code_prior=code_prior, code_prior_steps=50,
               flow_hidden=(16, 16))
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.metrics["prior_kind"] == code_prior
    assert torch.isfinite(torch.tensor(result.metrics["test_log_lik"]))
    run = load_run(tmp_path / "run")
    z = torch.randn(7, 2)
    torch.testing.assert_close(run.model.prior().log_prob(z), result.model.prior().log_prob(z),
                               rtol=0, atol=0)
    assert run.model.sample(10).shape == (10, 2)
