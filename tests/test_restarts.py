"""Restarts (issue 12): R copies trained together equal R separate runs, the best by validation
is kept, the history holds every copy, and a resumed run continues bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from mapa_vae.config import TrainConfig
from mapa_vae.storage import load_tensors
from mapa_vae.training.loop import train
from mapa_vae.training.restart_state import RestartAdam

R = 3
SMALL = dict(data="circle", samples=10, epochs=6, n_train=200, n_val=100, n_test=200, eval_every=2,
             val_grid=2**10, test_grid=2**11, dtype="float64", restarts=1)


def small(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**SMALL, "cache_dir": str(tmp_path / "cache"), **kw})


def member(state: dict, single: dict, r: int) -> dict:
    """Copy ``r``'s weights out of a stacked (vectorized) or per-copy (sequential) state dict."""
    if all(k in state for k in single):
        return {k: v[r] if v.dim() == single[k].dim() + 1 else v for k, v in state.items()}
    return {k[len(f"{r}."):]: v for k, v in state.items() if k.startswith(f"{r}.")}


@pytest.mark.parametrize(("method", "extra", "engine"), [
    ("mapa", {}, "vectorized"),
    ("vae", {}, "vectorized"),
    ("iwae", {}, "vectorized"),
    ("iwae", {"estimator": "dreg"}, "vectorized"),
    ("vae", {"batching": "local"}, "sequential"),
    ("mapa", {"data": "digits-binary"}, "vectorized"),  # Bernoulli: pairs scored by matmul
])
def test_restarts_equal_separate_runs(tmp_path, method, extra, engine):
    """Every copy's last and best weights, train bounds and validation scores equal the
    single run of its seed (float64; the vectorized engine differs by rounding only)."""
    together = train(small(tmp_path, method=method, restarts=R, **extra), tmp_path / "all",
                     progress=False)
    assert together.metrics["restart_engine"] == engine
    ck = load_tensors(tmp_path / "all" / "checkpoint.pt")
    tol = {"rtol": 1e-9, "atol": 1e-11} if engine == "vectorized" else {"rtol": 0, "atol": 0}
    best_vals = []
    for r in range(R):
        single = train(small(tmp_path, method=method, seed=r, **extra), tmp_path / f"{r}",
                       progress=False)
        one = load_tensors(tmp_path / f"{r}" / "checkpoint.pt")
        for key, value in member(ck["model"], one["model"], r).items():
            torch.testing.assert_close(value, one["model"][key], **tol)
        for key, value in ck["restarts"]["copies"][r]["best_model"].items():
            torch.testing.assert_close(value, one["best_model"][key], **tol)
        for mine, theirs in zip(together.history, single.history, strict=True):
            assert mine["train_bound"][r] == pytest.approx(theirs["train_bound"], rel=1e-9)
            if "val_log_lik" in theirs:
                assert mine["val_log_lik"][r] == pytest.approx(theirs["val_log_lik"], rel=1e-9)
        run = together.metrics["restart_runs"][r]
        assert run["seed"] == r and run["best_epoch"] == single.metrics["best_epoch"]
        assert run["skipped_steps"] == single.metrics["skipped_steps"]
        if r == together.metrics["restart"]:
            assert together.metrics["passes_per_point_per_step"] == pytest.approx(
                single.metrics["passes_per_point_per_step"])
            for key in ("test_kl", "test_log_lik"):  # curves have both, images the second
                if key in single.metrics:
                    assert together.metrics[key] == pytest.approx(single.metrics[key], rel=1e-7)
        best_vals.append(single.metrics["best_val_selection_score"])
    # the best by validation is kept; the test set plays no part in the choice
    assert together.metrics["restart"] == max(range(R), key=best_vals.__getitem__)
    assert [r["best_val_selection_score"] for r in together.metrics["restart_runs"]] == \
        pytest.approx(best_vals, rel=1e-9)


def test_history_and_metrics_hold_every_restart(tmp_path):
    result = train(small(tmp_path, method="vae", restarts=R, epochs=4), tmp_path / "run",
                   progress=False)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert all(len(h["train_bound"]) == R for h in history)
    assert [len(h["val_log_lik"]) for h in history if "val_log_lik" in h] == [R, R]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["restarts"] == R and len(metrics["restart_runs"]) == R
    chosen = metrics["restart_runs"][metrics["restart"]]
    assert chosen["best_val_selection_score"] == max(
        r["best_val_selection_score"] for r in metrics["restart_runs"])
    assert metrics["best_val_selection_score"] == chosen["best_val_selection_score"]
    assert result.metrics["restart_seed"] == metrics["restart"]  # seeds 0 … R-1


@pytest.mark.parametrize("method", ["mapa", "iwae"])
def test_restarts_resume_bit_for_bit(tmp_path, method):
    """8 epochs straight equal 4 epochs and a resumed run to 8, every copy, bit for bit (CPU)."""
    cfg = small(tmp_path, method=method, restarts=R, dtype="float32", epochs=8)
    straight = train(cfg, tmp_path / "a", progress=False)
    train(small(tmp_path, method=method, restarts=R, dtype="float32", epochs=4), tmp_path / "b",
          progress=False)
    resumed = train(cfg, tmp_path / "b", progress=False, resume=True)
    a, b = (load_tensors(tmp_path / d / "checkpoint.pt") for d in "ab")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key])
    for x, y in zip(straight.trained.state_dict().values(), resumed.trained.state_dict().values(),
                    strict=True):
        assert torch.equal(x, y)
    assert straight.history == resumed.history
    assert straight.metrics["passes_per_point_per_step"] == resumed.metrics["passes_per_point_per_step"]


def test_restart_adam_skips_one_restart_and_matches_torch_adam():
    """A step skipped in restart 1 leaves restart 0 moving; each equals torch's Adam run alone."""
    torch.manual_seed(0)
    w0 = torch.randn(2, 3, 4, dtype=torch.float64)
    grads = torch.randn(4, 2, 3, 4, dtype=torch.float64)
    active = torch.tensor([[True, True], [True, False], [True, True], [False, True]])
    stacked = w0.clone().requires_grad_()
    opt = RestartAdam([stacked], lr=1e-2)
    for g, on in zip(grads, active, strict=True):
        stacked.grad = torch.where(on[:, None, None], g, torch.full_like(g, float("nan")))
        opt.step(on)
    for r in range(2):
        w = w0[r].clone().requires_grad_()
        ref = torch.optim.Adam([w], lr=1e-2)
        for g, on in zip(grads, active, strict=True):
            if on[r]:
                w.grad = g[r].clone()
                ref.step()
        torch.testing.assert_close(stacked.detach()[r], w.detach(), rtol=1e-13, atol=1e-15)
