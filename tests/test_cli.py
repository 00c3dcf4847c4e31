"""The ``mapa-vae`` command line: train / sample / evaluate on a user's file, and one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import mapa_vae.data.loading
from mapa_vae.cli import main
from mapa_vae.config import TrainConfig
from mapa_vae.data.groundtruth import ground_truth
from mapa_vae.models.likelihoods import GaussianLikelihood
from mapa_vae.registry import METHODS as REGISTERED
from mapa_vae.training.runs import load_run

METHODS = ["mapa", "vae", "iwae"]
RUN_FILES = ["config.json", "model.pt", "trained.pt", "metrics.json", "history.json", "checkpoint.pt"]
N_POINTS = 300
GAUSSIAN_METHODS = [m for m in REGISTERED.names() if REGISTERED[m].accepts("gaussian")]  # 2-D points


def _train_args(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--epochs", "2", "--samples", "10",
            "--cache-dir", str(cache), "--out", str(out), "--quiet", *extra]


def _one_line_error(err: str) -> str:
    """Check ``err`` is exactly one ``mapa-vae: error:`` line and return it."""
    assert err.startswith("mapa-vae: error: "), err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def circle_file(tmp_path_factory) -> Path:
    """300 points of the analytic circle (σ² = 0.01) as a .npy file."""
    x, _ = ground_truth("circle", surrogate=False).sample(N_POINTS, torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("data") / "circle.npy"
    np.save(path, x.numpy())
    return path


@pytest.fixture(scope="module")
def runs(circle_file, tmp_path_factory) -> dict[str, tuple[int, str, str, Path]]:
    """Each method trained once: ``(exit code, stdout, stderr, run dir)``."""
    root = tmp_path_factory.mktemp("runs")
    out: dict[str, tuple[int, str, str, Path]] = {}
    for method in GAUSSIAN_METHODS:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main(_train_args(circle_file, root / method, root / "cache",
                                  "--method", method, "--noise-var", "0.01"))
        out[method] = (rc, stdout.getvalue(), stderr.getvalue(), root / method)
    return out


# --- data -------------------------------------------------------------------------------------


def test_data_unknown_name(tmp_path, capsys):
    assert main(["data", "squiggle", "--n", "10", "--out", str(tmp_path / "x.npy")]) == 2
    out, err = capsys.readouterr()
    line = _one_line_error(err)
    assert "squiggle" in line and "circle" in line
    assert out == ""
    assert not (tmp_path / "x.npy").exists()


@pytest.fixture
def analytic_data(monkeypatch):
    """Make ``data`` draw from the analytic curve so that no surrogate is needed."""
    real = mapa_vae.data.loading.make_ground_truth_data

    def analytic(*args, **kwargs):
        return real(*args, **{**kwargs, "surrogate": False})

    monkeypatch.setattr(mapa_vae.data.loading, "make_ground_truth_data", analytic)


@pytest.mark.usefixtures("analytic_data")
def test_data_output_must_be_npy(tmp_path, capsys):
    assert main(["data", "circle", "--n", "10", "--out", str(tmp_path / "x.csv")]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "x.csv" in line and ".npy" in line
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.usefixtures("analytic_data")
def test_data_writes_points_and_codes(tmp_path, capsys):
    x_path, z_path = tmp_path / "x.npy", tmp_path / "z.npy"
    argv = ["data", "circle", "--n", "25", "--seed", "3", "--out", str(x_path), "--codes", str(z_path)]
    assert main(argv) == 0
    assert "25" in capsys.readouterr().out
    x, z = np.load(x_path), np.load(z_path)
    assert x.shape == (25, 2) and z.shape == (25, 1)
    # the points lie near the unit circle (σ = 0.1)
    assert np.abs(np.linalg.norm(x, axis=1) - 1).max() < 0.6
    assert main(argv) == 0  # same seed, same draw
    np.testing.assert_array_equal(np.load(x_path), x)


# --- train / sample / evaluate on a user's file -------------------------------------------------


@pytest.mark.parametrize("method", GAUSSIAN_METHODS)
def test_train_writes_run_directory(runs, method):
    rc, stdout, stderr, run = runs[method]
    assert rc == 0, stderr
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val_log_lik", "test_log_lik", "train_seconds", "passes_per_point_per_step"):
        assert key in metrics, key
    assert metrics["method"] == method
    assert np.isfinite(metrics["val_log_lik"]) and np.isfinite(metrics["test_log_lik"])
    assert metrics["train_seconds"] >= 0
    assert json.loads(stdout) == metrics  # the metrics are also printed, as JSON
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == method and config["data_dim"] == 2
    assert config["likelihood_config"] == {"name": "gaussian", "noise_var": 0.01}
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]


@pytest.mark.parametrize("method", GAUSSIAN_METHODS)
def test_sample(runs, method, tmp_path, capsys):
    run = runs[method][3]
    f, g = tmp_path / "f.npy", tmp_path / "g.npy"
    assert main(["sample", str(run), "--n", "50", "--out", str(f)]) == 0
    assert main(["sample", str(run), "--n", "50", "--mean", "--out", str(g)]) == 0
    assert "50" in capsys.readouterr().out
    x, m = np.load(f), np.load(g)
    for a in (x, m):
        assert a.shape == (50, 2)
        assert np.issubdtype(a.dtype, np.floating)
        assert np.isfinite(a).all()
    # same seed, same z: the two differ by the observation noise alone, N(0, σ² = 0.01) for a
    # fixed-variance decoder; a GP decoder's predictive variance adds its function uncertainty
    likelihood = load_run(run).model.decoder.likelihood
    low, high = (0.005, 0.02) if isinstance(likelihood, GaussianLikelihood) else (0.005, math.inf)
    assert low < float(np.var(x - m)) < high


@pytest.mark.parametrize("method", GAUSSIAN_METHODS)
def test_evaluate(runs, method, circle_file, tmp_path, capsys):
    run = runs[method][3]
    pp = tmp_path / "pp.npy"
    argv = ["evaluate", str(run), "--data", str(circle_file), "--grid", "4096"]
    assert main([*argv, "--per-point", str(pp)]) == 0
    out = capsys.readouterr().out
    assert "mean test log-likelihood" in out
    match = re.search(r"mean test log-likelihood: (-?[0-9.]+) nats over (\d+) points", out)
    assert match is not None, out
    printed, n = float(match.group(1)), int(match.group(2))
    assert n == N_POINTS
    values = np.load(pp)
    assert values.shape == (N_POINTS,)
    assert np.isfinite(values).all()
    assert float(values.mean()) == pytest.approx(printed, abs=5e-4)
    # without --per-point: the same number
    assert main(argv) == 0
    assert f"{printed:.4f}" in capsys.readouterr().out


def test_resume_continues_from_checkpoint(circle_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = _train_args(circle_file, out, tmp_path / "cache", "--method", "vae", "--noise-var", "0.01")
    assert main(args) == 0
    more = [a if a != "2" else "4" for a in args]  # --epochs 4
    assert main([*more, "--resume"]) == 0
    capsys.readouterr()
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


# --- one-line errors ----------------------------------------------------------------------------


def _expect_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing half-done is reported as a result
    assert "Traceback" not in err
    return _one_line_error(err)


def test_train_on_nan_file(tmp_path, capsys):
    a = np.ones((50, 2))
    a[7, 1] = np.nan
    bad = tmp_path / "bad.npy"
    np.save(bad, a)
    line = _expect_error(capsys, _train_args(bad, tmp_path / "run", tmp_path / "cache",
                                             "--noise-var", "0.01"))
    assert str(bad) in line
    assert "row 7" in line
    assert not (tmp_path / "run" / "config.json").exists()


def test_train_gaussian_on_file_needs_noise_var(circle_file, tmp_path, capsys):
    line = _expect_error(capsys, _train_args(circle_file, tmp_path / "run", tmp_path / "cache",
                                             "--method", "vae"))
    assert "--noise-var" in line


def test_train_bernoulli_needs_unit_interval(circle_file, tmp_path, capsys):
    line = _expect_error(capsys, _train_args(circle_file, tmp_path / "run", tmp_path / "cache",
                                             "--method", "vae", "--likelihood", "bernoulli"))
    assert "[0, 1]" in line


def test_train_mapa_too_many_samples(circle_file, tmp_path, capsys):
    args = _train_args(circle_file, tmp_path / "run", tmp_path / "cache", "--method", "mapa",
                       "--noise-var", "0.01")
    args[args.index("--samples") + 1] = "400"  # k + S = 440 > N - 1 = 239
    line = _expect_error(capsys, args)
    assert "k + S = 440" in line and "239" in line


def test_evaluate_wrong_number_of_columns(runs, tmp_path, capsys):
    three = tmp_path / "three.npy"
    np.save(three, np.zeros((20, 3)))
    line = _expect_error(capsys, ["evaluate", str(runs["vae"][3]), "--data", str(three)])
    assert str(three) in line
    assert "3 features" in line and "2" in line


def test_evaluate_missing_run(circle_file, tmp_path, capsys):
    missing = tmp_path / "no-run"
    line = _expect_error(capsys, ["evaluate", str(missing), "--data", str(circle_file)])
    assert str(missing) in line


def test_sample_missing_run(tmp_path, capsys):
    missing = tmp_path / "no-run"
    line = _expect_error(capsys, ["sample", str(missing), "--n", "5",
                                  "--out", str(tmp_path / "s.npy")])
    assert str(missing) in line
    assert not (tmp_path / "s.npy").exists()


def test_resume_without_checkpoint(circle_file, tmp_path, capsys):
    out = tmp_path / "fresh"
    line = _expect_error(capsys, [*_train_args(circle_file, out, tmp_path / "cache",
                                               "--method", "vae", "--noise-var", "0.01"),
                                  "--resume"])
    assert "checkpoint" in line and str(out) in line


# --- help ---------------------------------------------------------------------------------------


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for verb in ("data", "train", "sample", "evaluate", "compare"):
        assert re.search(rf"\b{verb}\b", out), verb


def test_train_help_lists_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--method", "--samples", "--k", "--epochs", "--seed", "--noise-var",
                   "--latent-dim", "--out"):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", out), option


def test_evaluate_reloads_an_older_runs_data_by_its_recorded_sizes(runs, circle_file, tmp_path, capsys):
    """Runs written before the size knobs took subsets stored n_train = 1000 etc. even for a file
    whose own 80/10/10 split they used; evaluate rebuilds the training atoms from the sizes the
    run recorded (config.json's data_sizes), not from those knobs."""
    import shutil

    from mapa_vae.storage import load_tensors, save_tensors, write_json
    from mapa_vae.training.checkpoint import config_json

    old = tmp_path / "old-run"
    shutil.copytree(runs["mapa"][3], old)
    raw = json.loads((old / "config.json").read_text())
    assert raw["data_sizes"]["n_train"] == 240  # the file's own split was used
    raw.update(n_train=1000, n_val=500, n_test=2000)  # what such a run wrote
    write_json(old / "config.json", raw)
    cfg = TrainConfig.from_dict(
        {k: v for k, v in raw.items() if k not in ("data_dim", "likelihood_config", "data_sizes")})
    for name in ("model.pt", "trained.pt"):
        saved = load_tensors(old / name)
        save_tensors(old / name, {**saved, "config": config_json(cfg)})
    assert main(["evaluate", str(old), "--data", str(circle_file), "--grid", "4096"]) == 0
    captured = capsys.readouterr()
    assert "cannot be loaded again" not in captured.err, captured.err
    assert "240 training atoms" in captured.out, captured.out
