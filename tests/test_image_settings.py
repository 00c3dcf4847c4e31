"""MAPA on binary images: the image defaults ``train`` resolves, the calibrated-perplexity kernel,
and the time-to-quality benchmark's referee and verdicts (benchmarks/time_to_quality.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mapa_vae.cli import main
from mapa_vae.config import TrainConfig
from mapa_vae.errors import MapaError
from mapa_vae.evaluation.likelihood import importance_log_likelihood
from mapa_vae.kernels import BernoulliKernel, calibrate_rho
from mapa_vae.methods.mapa import IMAGE_DEFAULTS, kernel_posterior
from mapa_vae.models.latent import CodeEncoder, Decoder, LatentVariableModel, StandardNormal
from mapa_vae.models.likelihoods import BernoulliLikelihood, GaussianLikelihood
from mapa_vae.models.networks import MLP
from mapa_vae.registry import METHODS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import image_settings
import time_to_quality as ttq


def _binary_npz(path: Path, n: int = 200, seed: int = 0) -> Path:
    """A binarized-MNIST-shaped .npz: ``n`` training images, 20 each for validation and test."""
    rng = np.random.default_rng(seed)
    protos = rng.random((4, 784)) < 0.3  # four "digits", each image flips 5 % of its pixels
    def draw(m: int) -> np.ndarray:
        x = protos[rng.integers(4, size=m)] ^ (rng.random((m, 784)) < 0.05)
        return np.packbits(x.astype(np.uint8), axis=1)
    np.savez(path, train=draw(n), valid=draw(20), test=draw(20))
    return path


# ----------------------------------------------------------------------------- image defaults


def test_image_defaults_fill_only_the_knobs_no_flag_set() -> None:
    cfg = TrainConfig(data="x.npz", method="mapa", likelihood="bernoulli", batch_size=7)
    resolved, note = METHODS["mapa"].resolve(cfg, {"data", "method", "likelihood", "batch_size"})
    assert resolved.batch_size == 7  # the flag wins
    for key in IMAGE_DEFAULTS.keys() - {"batch_size"}:
        assert getattr(resolved, key) == IMAGE_DEFAULTS[key], key
        assert f"--{key.replace('_', '-')}" in note
    assert note is not None and "\n" not in note and "--batch-size" not in note


@pytest.mark.parametrize("data,likelihood", [("circle", None), ("x.npz", "gaussian"),
                                             ("digits", None), ("mnist1d", None)])
def test_image_defaults_leave_other_data_alone(data: str, likelihood: str | None) -> None:
    cfg = TrainConfig(data=data, method="mapa", likelihood=likelihood, noise_var=0.1)
    resolved, note = METHODS["mapa"].resolve(cfg, {"data"})
    assert note is None and resolved == cfg


def test_other_methods_keep_their_settings_on_images() -> None:
    cfg = TrainConfig(data="sprites-binary", method="iwae", samples=50)
    assert METHODS["iwae"].resolve(cfg, set()) == (cfg, None)


def test_train_says_which_image_settings_it_chose(tmp_path: Path, capsys) -> None:
    data = _binary_npz(tmp_path / "bin.npz")
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--likelihood", "bernoulli", "--method", "mapa",
            "--epochs", "1", "--restarts", "1", "--latent-dim", "2", "--hidden", "8",
            "--code-prior-steps", "5", "--batch-size", "25", "--cache-dir", str(tmp_path / "c"),
            "--out", str(run), "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("MAPA on binary images")]
    assert len(lines) == 1 and "--batch-size" not in lines[0]
    saved = json.loads((run / "config.json").read_text())
    assert saved["batch_size"] == 25 and saved["samples"] == IMAGE_DEFAULTS["samples"]
    assert saved["k"] == IMAGE_DEFAULTS["k"] and saved["lr"] == IMAGE_DEFAULTS["lr"]


@pytest.mark.parametrize("value,says", [("1", "above 1"), ("0.5", "above 1"), ("200", "below"),
                                        ("900", "below")])
def test_kernel_perplexity_bad_values_are_one_line(tmp_path: Path, capsys, value: str,
                                                   says: str) -> None:
    data = _binary_npz(tmp_path / "bin.npz")
    argv = ["train", "--data", str(data), "--likelihood", "bernoulli", "--method", "mapa",
            "--epochs", "1", "--restarts", "1", "--latent-dim", "2", "--hidden", "8",
            "--kernel-perplexity", value, "--cache-dir", str(tmp_path / "c"),
            "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("mapa-vae: error:")]
    assert len(errors) == 1 and err.endswith(errors[0] + "\n")
    assert "--kernel-perplexity" in errors[0] and says in errors[0]


def test_kernel_perplexity_needs_the_bernoulli_kernel() -> None:
    cfg = TrainConfig(data="circle", method="mapa", kernel_perplexity=5.0)
    model = LatentVariableModel(CodeEncoder(MLP(2, 1, (4,))),
                                Decoder(MLP(1, 2, (4,)), GaussianLikelihood(0.1)), StandardNormal(1))
    with pytest.raises(MapaError, match="--kernel-perplexity"):
        kernel_posterior(model, torch.zeros(10, 2), cfg, None)


# ----------------------------------------------------------------------------- the kernel remedy


def _median_perplexity(x: torch.Tensor, rho: float) -> float:
    """Median over every point of ``exp H[q(· | n)]``, the kernel posterior of Eq. 8."""
    log_q = torch.log_softmax(BernoulliKernel(rho).log_kernel(x, x), -1)  # (N, N)
    return float(torch.exp(-(log_q.exp() * log_q).sum(-1)).median())


@pytest.mark.parametrize("target", [2.0, 5.0, 30.0])
def test_calibrated_rho_gives_the_target_perplexity(target: float) -> None:
    x = (torch.rand(300, 64, generator=torch.Generator().manual_seed(1)) < 0.3).double()
    rho = calibrate_rho(x, target, rows=300)  # every row: the median is the data's own
    assert 0.5 < rho < 1.0
    assert _median_perplexity(x, rho) == pytest.approx(target, rel=1e-4)


def test_calibrated_rho_softens_as_the_target_grows() -> None:
    x = (torch.rand(200, 64, generator=torch.Generator().manual_seed(2)) < 0.5).double()
    rhos = [calibrate_rho(x, p) for p in (2.0, 8.0, 50.0)]
    assert rhos[0] > rhos[1] > rhos[2]


@pytest.mark.parametrize("bad", [1.0, 0.3, 200.0, 500.0])
def test_calibrate_rho_refuses_a_perplexity_outside_one_to_n(bad: float) -> None:
    with pytest.raises(ValueError, match="perplexity"):
        calibrate_rho(torch.zeros(200, 8), bad)


# ----------------------------------------------------------------------------- the benchmark


def test_referee_keeps_the_best_proposal_width_for_a_deterministic_encoder() -> None:
    spread = torch.nn.Linear(2, 2, bias=False)  # codes spread wide, as MAPA's are on MNIST
    torch.nn.init.eye_(spread.weight)
    spread.weight.data.mul_(5.0)
    model = LatentVariableModel(CodeEncoder(torch.nn.Sequential(MLP(16, 2, (8,)), spread)),
                                Decoder(MLP(2, 16, (8,)), BernoulliLikelihood()), StandardNormal(2))
    x = (torch.rand(12, 16) < 0.5).float()
    score = ttq.best_width_log_likelihood(model, x, samples=64, pick=x.shape[0], seed=3)
    by_width = {}
    for w in ttq.WIDTHS:
        torch.manual_seed(3)
        by_width[w] = float(importance_log_likelihood(model, x, 64, code_scale=w).mean())
    assert score.log_lik == pytest.approx(max(by_width.values()), abs=1e-9)
    best = max(by_width, key=lambda w: by_width[w])
    assert f"N(g(x), {best:g}^2)" in score.how
    assert score.stderr > 0 and math.isfinite(score.stderr)


def _points(scores: list[float], step: float = 10.0) -> list[dict[str, object]]:
    return [{"kind": "time", "seconds": step * (j + 1), "test_log_lik": s} for j, s in enumerate(scores)]


def test_verdicts_compare_with_the_best_baseline_at_every_checkpoint() -> None:
    curves = {"iwae50": _points([-200.0, -180.0, -170.0]), "vae": _points([-190.0, -185.0, -175.0]),
              "mapa": _points([-185.0, -168.0, -160.0])}
    v = ttq.verdicts(curves)
    assert v["best_baseline"] == "iwae50" and v["best_baseline_final"] == -170.0
    assert v["mapa_seconds_to_target"] == 20.0 and v["ratio"] == pytest.approx(20.0 / 30.0)
    assert not v["ratio_holds"] and v["mapa_at_or_above_at_every_checkpoint"]
    curves["mapa"] = _points([-195.0, -160.0, -150.0], step=3.0)  # below the VAE at the first
    v = ttq.verdicts(curves)
    assert v["ratio"] == pytest.approx(6.0 / 30.0) and v["ratio_holds"]
    assert not v["mapa_at_or_above_at_every_checkpoint"]
    curves["mapa"] = _points([-300.0, -250.0, -171.0])
    assert ttq.verdicts(curves)["ratio"] is None


def test_time_to_quality_joins_methods_timed_in_separate_processes(tmp_path: Path) -> None:
    """``--merge`` gives the report one run of all methods would: each method's curve as
    measured, the verdicts against the best baseline; runs that measured other things (here
    other test images) or the same method twice are refused in one line."""
    parts = {}
    for label in ("vae", "mapa"):
        parts[label] = tmp_path / f"{label}.json"
        ttq.main(["--tiny", "--methods", label, "--json", str(parts[label])])
    joined = tmp_path / "joined.json"
    got = ttq.main(["--merge", str(parts["vae"]), str(parts["mapa"]), "--json", str(joined)])
    data = json.loads(joined.read_text())
    for label in ("vae", "mapa"):
        alone = json.loads(parts[label].read_text())["records"]
        assert [r for r in data["records"] if r["method"] == label] == alone
    assert data["summary"]["best_baseline"] == "vae" == got["summary"]["best_baseline"]
    assert data["summary"] == ttq.verdicts(got["curves"])
    assert [p["methods"] for p in data["merged_from"]] == [["vae"], ["mapa"]]
    assert joined.with_suffix(".png").stat().st_size > 0
    with pytest.raises(SystemExit, match="more than one file"):
        ttq.main(["--merge", str(parts["vae"]), str(joined)])
    again = ttq.main(["--merge", f"{joined}:mapa", str(parts["vae"])])  # only MAPA from the joined
    assert again["summary"] == got["summary"]
    with pytest.raises(SystemExit, match="no iwae5 records"):
        ttq.main(["--merge", f"{joined}:iwae5"])
    other = json.loads(parts["mapa"].read_text())
    other["args"]["n_test"] += 1
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="n_test"):
        ttq.main(["--merge", str(parts["vae"]), str(tmp_path / "other.json")])


_COMMON = {"data": "x.npz", "latent_dim": 4, "hidden": (8,), "activation": "tanh", "seed": 0,
           "restarts": 1, "threads": 1, "dtype": "float32", "likelihood": "bernoulli"}


@pytest.mark.parametrize("name,want", [
    ("S20-k2-lr3e-3", (20, 2, 100, 3e-3, None, 0)),
    ("S1-k1-b50-lr1e-2-ppl5-s3", (1, 1, 50, 1e-2, 5.0, 3)),
    ("S0-k1-lr0.01-s1", (0, 1, 100, 1e-2, None, 1)),
    ("S100-k10", (100, 10, 100, 1e-3, None, 0)),
])
def test_image_settings_variant_names_spell_their_config(name: str, want: tuple) -> None:
    cfg = image_settings.variant_config(name, _COMMON, prior_steps=10)
    got = (cfg.samples, cfg.k, cfg.batch_size, cfg.lr, cfg.kernel_perplexity, cfg.seed)
    assert got == pytest.approx(want) and cfg.method == "mapa"


@pytest.mark.parametrize("name", ["S20k2", "S20-k2-lr", "S20-k2-s1-b50", "k2-S20"])
def test_image_settings_refuses_an_unreadable_variant(name: str) -> None:
    with pytest.raises(SystemExit, match="--variants"):
        image_settings.variant_config(name, _COMMON, prior_steps=10)


def test_image_settings_equal_steps_must_be_whole_epochs() -> None:
    assert image_settings.whole_epochs(4000, 50, 10_000) == 20
    with pytest.raises(SystemExit, match="--steps 150"):
        image_settings.whole_epochs(150, 100, 10_000)
