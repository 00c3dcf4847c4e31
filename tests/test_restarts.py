"""Restarts: R copies trained together equal the same copies trained one after another, copy 0
is the single run, the best by validation is kept, the history holds every copy, and one training
loop serves every R. (R copies resumed bit for bit: ``test_resume.py``; one copy's skipped step:
``test_nonfinite.py``.)"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from mapa_vae.storage import load_tensors
from mapa_vae.training import engines
from mapa_vae.training.loop import train

R = 3
TRAINING = Path(engines.__file__).parent
FLOAT64 = {"dtype": "float64", "epochs": 6, "samples": 10}  # comparisons to 1e-9


def member(state: dict, single: dict, r: int) -> dict:
    """Copy ``r``'s weights out of a stacked (vectorized) or per-copy (sequential) state dict."""
    if all(k in state for k in single):
        return {k: v[r] if v.dim() == single[k].dim() + 1 else v for k, v in state.items()}
    return {k[len(f"{r}."):]: v for k, v in state.items() if k.startswith(f"{r}.")}


def assert_same_copy(a: dict, ra: int, b: dict, rb: int, tol: dict) -> None:
    """Copy ``ra`` of checkpoint ``a`` has copy ``rb``'s weights, best weights and scores in ``b``."""
    mine, theirs = member(a["model"], a["best_model"], ra), member(b["model"], b["best_model"], rb)
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        torch.testing.assert_close(value, theirs[key], **tol)
    for key, value in a["restarts"]["copies"][ra]["best_model"].items():
        torch.testing.assert_close(value, b["restarts"]["copies"][rb]["best_model"][key], **tol)
    for x, y in zip(a["history"], b["history"], strict=True):
        assert x["train_bound_per_copy"][ra] == pytest.approx(y["train_bound_per_copy"][rb], rel=1e-9)
        if "val_log_lik_per_copy" in y:
            assert x["val_log_lik_per_copy"][ra] == pytest.approx(y["val_log_lik_per_copy"][rb],
                                                                  rel=1e-9)


@pytest.mark.parametrize(("method", "extra", "engine"), [
    ("mapa", {}, "vectorized"),
    ("vae", {}, "vectorized"),
    ("iwae", {}, "vectorized"),
    ("iwae", {"estimator": "dreg"}, "vectorized"),
    ("vae", {"batching": "local"}, "sequential"),
    ("mapa", {"data": "digits-binary"}, "vectorized"),  # Bernoulli: pairs scored by matmul
])
def test_restarts_equal_separate_runs(tiny_config, tmp_path, monkeypatch, method, extra, engine):
    """Copy 0 of R equals the single run of the same seed, and every copy trained together
    (vectorized) equals it trained in turn (sequential), in float64: weights, best weights,
    train bounds and validation scores; the vectorized engine differs by rounding only."""
    together = train(tiny_config(**FLOAT64, method=method, restarts=R, **extra), tmp_path / "all",
                     progress=False)
    assert together.metrics["restart_engine"] == engine
    ck = load_tensors(tmp_path / "all" / "checkpoint.pt")
    tol = {"rtol": 1e-9, "atol": 1e-11} if engine == "vectorized" else {"rtol": 0, "atol": 0}
    single = train(tiny_config(**FLOAT64, method=method, **extra), tmp_path / "one", progress=False)
    assert single.metrics["restart_engine"] == "sequential" and single.metrics["restarts"] == 1
    assert_same_copy(ck, 0, load_tensors(tmp_path / "one" / "checkpoint.pt"), 0, tol)
    if together.metrics["restart"] == 0:
        for key in ("test_kl", "test_log_lik"):  # curves have both, images the second
            if key in single.metrics:
                assert together.metrics[key] == pytest.approx(single.metrics[key], rel=1e-7)
    if engine == "vectorized":
        monkeypatch.setattr(engines, "vectorizable", lambda *a: "forced for the test")
        apart = train(tiny_config(**FLOAT64, method=method, restarts=R, **extra), tmp_path / "seq",
                      progress=False)
        assert apart.metrics["restart_engine"] == "sequential"
        seq = load_tensors(tmp_path / "seq" / "checkpoint.pt")
        for r in range(R):
            assert_same_copy(ck, r, seq, r, tol)
        assert together.metrics["passes_per_point_per_step"] == pytest.approx(
            apart.metrics["passes_per_point_per_step"])
        for key in ("best_epoch_per_copy", "skipped_steps_per_copy", "seed_per_copy"):
            assert together.metrics[key] == apart.metrics[key]
    # the best by validation is kept; the test set plays no part in the choice
    best = together.metrics["best_val_selection_score_per_copy"]
    assert together.metrics["restart"] == max(range(R), key=best.__getitem__)
    assert together.metrics["best_val_selection_score"] == max(best)


def test_history_and_metrics_have_one_shape_for_every_r(tiny_config, tmp_path):
    """Per-epoch records hold the chosen copy's scores and every copy's, for R = 3 and R = 1."""
    for r_count in (R, 1):
        out = tmp_path / f"run{r_count}"
        result = train(tiny_config(**{**FLOAT64, "epochs": 4}, method="vae", restarts=r_count), out,
                       progress=False)
        history = json.loads((out / "history.json").read_text())
        assert [h["epoch"] for h in history] == [1, 2, 3, 4]
        assert all(len(h["train_bound_per_copy"]) == r_count for h in history)
        assert [len(h["val_log_lik_per_copy"]) for h in history if "val_log_lik" in h] == \
            [r_count, r_count]
        metrics = json.loads((out / "metrics.json").read_text())
        chosen = metrics["restart"]
        assert metrics["restarts"] == r_count and len(metrics["best_epoch_per_copy"]) == r_count
        for h in history:
            assert h["train_bound"] == h["train_bound_per_copy"][chosen]
            if "val_log_lik" in h:
                assert h["val_log_lik"] == h["val_log_lik_per_copy"][chosen]
        scores = metrics["best_val_selection_score_per_copy"]
        assert metrics["best_val_selection_score"] == scores[chosen] == max(scores)
        assert max(h["val_log_lik"] for h in history if "val_log_lik" in h) == scores[chosen]
        assert metrics["best_epoch"] == metrics["best_epoch_per_copy"][chosen]
        assert result.metrics["seed_per_copy"] == metrics["seed_per_copy"]
        assert (out / "curves.png").stat().st_size > 0


def test_one_training_loop():
    """The engines hold no epoch loop (no name in their code mentions an epoch), and the loop and
    the engines together are shorter than the two loops they replaced (952 lines)."""
    tree = ast.parse((TRAINING / "engines.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not [n for n in names if "epoch" in n.lower()]
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.While)]
    assert not (TRAINING / "restarts.py").exists()
    lines = sum(len((TRAINING / f).read_text().splitlines()) for f in ("loop.py", "engines.py"))
    assert lines < 952


def test_tensorboard_logs_every_epoch_of_every_copy(tiny_config, tmp_path):
    """With ``tensorboard`` set, each epoch's record (every copy's bound and score) is logged
    as it is made: the logged values are the history's."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(tiny_config(method="vae", restarts=2, epochs=4, samples=10, dtype="float32",
                               tensorboard=str(tmp_path / "tb")), tmp_path / "run", progress=False)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    for r in range(2):
        logged = [(e.step, e.value) for e in acc.Scalars(f"val_log_lik/copy_{r}")]
        expected = [(h["epoch"], h["val_log_lik_per_copy"][r]) for h in result.history
                    if "val_log_lik_per_copy" in h]
        assert [s for s, _ in logged] == [2, 4]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
        assert len(acc.Scalars(f"train_bound/copy_{r}")) == 4
