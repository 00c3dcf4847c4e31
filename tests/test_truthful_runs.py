"""Runs that tell the truth (issue 10): no silent failure, no lost result, a report that renders.

Each test fails on the behaviour the issue reported and passes now. Tiny configs: circle, one
hidden layer of 8, about 100 training points, a few epochs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from mapa_vae.cli import main
from mapa_vae.config import TrainConfig
from mapa_vae.errors import MapaError, NoUsableModel
from mapa_vae.experiments.report import STYLE, Report
from mapa_vae.experiments.reproduce import _fmt, _verdict, below_budget
from mapa_vae.experiments.sweep import PROFILES
from mapa_vae.storage import load_tensors
from mapa_vae.training.loop import train
from mapa_vae.training.runs import load_run

SMALL = dict(data="circle", hidden=(8,), samples=5, n_train=100, n_val=50, n_test=100, epochs=4,
             eval_every=2, val_grid=2**9, test_grid=2**10, prior_steps=30, restarts=1)


def small(tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**SMALL, "cache_dir": str(tmp_path / "cache"), **kw})


def _cli_train(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", "circle", "--hidden", "8", "--samples", "5", "--n-train", "100",
            "--n-val", "50", "--n-test", "100", "--eval-every", "2", "--val-grid", "512",
            "--test-grid", "1024", "--prior-steps", "30", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out), "--quiet", *extra]


def _strict_load(path: Path):
    """Parse as strict JSON: NaN / Infinity are refused as a strict parser would."""
    def refuse(name: str):
        raise ValueError(f"{path}: non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


# --- runs that fail silently ---------------------------------------------------------------------


def test_all_steps_skipped_is_no_usable_model_exit_3(tmp_path, capsys):
    """Finite data at the scale 1e30: every squared error overflows float32, so every step is
    non-finite; the CLI says so with the numbers, exits 3, writes strict JSON, and ``sample``
    refuses the run instead of drawing from an untrained model."""
    points = tmp_path / "huge.npy"
    np.save(points, np.random.default_rng(0).normal(size=(200, 2)) * 1e30)
    out = tmp_path / "run"
    argv = _cli_train(tmp_path, out, "--method", "vae", "--epochs", "2", "--noise-var", "0.5")
    argv[argv.index("--data") + 1] = str(points)
    for flag in ("--n-train", "--n-val", "--n-test"):  # the file's own 160/20/20 split
        del argv[argv.index(flag):argv.index(flag) + 2]
    assert main(argv) == 3
    err = capsys.readouterr().err
    metrics = _strict_load(out / "metrics.json")
    steps = metrics["steps"]
    assert steps >= 2 and metrics["usable"] is False and metrics["skipped_steps"] == steps
    assert "no usable model" in err and f"{steps} of {steps} steps were skipped" in err, err
    _strict_load(out / "history.json")
    assert main(["sample", str(out), "--n", "5", "--out", str(tmp_path / "x.npy")]) == 2
    assert "no usable model" in capsys.readouterr().err


def test_a_noise_var_too_small_for_the_dtype_is_refused_in_one_line(tmp_path, capsys):
    """--noise-var 1e-300 would make every step non-finite: refused up front, exit 2, one line."""
    out = tmp_path / "run"
    assert main(_cli_train(tmp_path, out, "--method", "vae", "--epochs", "2",
                           "--noise-var", "1e-300")) == 2
    err = capsys.readouterr().err
    assert err.startswith("mapa-vae: error: ") and err.count("\n") == 1, err
    assert "--noise-var" in err and "1e-300" in err and "Traceback" not in err
    assert not (out / "metrics.json").exists()


def test_divergent_run_is_no_usable_model_but_written(tmp_path):
    """--lr 1e9: no step skipped, yet the model scores 1e17 nats below the truth; refused with
    the numbers, the run (and its best checkpoint) still written."""
    with pytest.raises(NoUsableModel, match="far below") as caught:
        train(small(tmp_path, method="vae", lr=1e9, epochs=6), tmp_path / "run", progress=False)
    result = caught.value.result
    assert result.metrics["usable"] is False and result.metrics["skipped_steps"] == 0
    assert result.metrics["best_val_selection_score"] < -1e6
    ck = load_tensors(tmp_path / "run" / "checkpoint.pt")
    assert ck["best_epoch"] == result.metrics["best_epoch"] > 0
    assert _strict_load(tmp_path / "run" / "metrics.json")["problem"] == result.metrics["problem"]


def test_healthy_run_is_usable_and_strict(tmp_path):
    result = train(small(tmp_path, method="iwae"), tmp_path / "run", progress=False)
    metrics = _strict_load(tmp_path / "run" / "metrics.json")
    assert metrics["usable"] is True and metrics["problem"] is None and metrics["warnings"] == []
    assert metrics["test_kl"] == pytest.approx(result.metrics["test_kl"])


# --- results that are lost or rewritten ----------------------------------------------------------


LOCK_HOLDER = textwrap.dedent("""
    import sys, time, filelock
    lock = filelock.FileLock(sys.argv[1], timeout=0)
    lock.acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_locked_run_directory_refuses_a_second_train(tmp_path):
    """Another process holds the run directory's lock (a train in progress): refused at once."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out / ".train.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(MapaError, match="another train is writing"):
            train(small(tmp_path, method="vae"), out, progress=False)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()  # type: ignore[union-attr]
    assert not (out / "config.json").exists()
    train(small(tmp_path, method="vae"), out, progress=False)  # free again once the holder is gone


def test_finished_run_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_cli_train(tmp_path, out, "--method", "vae", "--epochs", "2")) == 0
    before = (out / "metrics.json").read_text()
    assert main(_cli_train(tmp_path, out, "--method", "vae", "--epochs", "2", "--seed", "1")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == before  # untouched
    assert main(_cli_train(tmp_path, out, "--method", "vae", "--epochs", "2", "--seed", "1",
                           "--overwrite")) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 1


def test_resume_keeps_cumulative_time_and_passes_and_refuses_fewer_epochs(tmp_path):
    out = tmp_path / "run"
    first = train(small(tmp_path, method="iwae", epochs=4), out, progress=False)
    passes = first.metrics["passes_per_point_per_step"]
    # resume a finished run: the cost is the run's, not 0 s and 0 passes
    again = train(small(tmp_path, method="iwae", epochs=4), out, progress=False, resume=True)
    assert again.metrics["train_seconds"] == pytest.approx(first.metrics["train_seconds"], abs=0.02)
    assert again.metrics["passes_per_point_per_step"] == passes
    # resume to 8 epochs: the time counts both parts
    more = train(small(tmp_path, method="iwae", epochs=8), out, progress=False, resume=True)
    assert more.metrics["train_seconds"] > first.metrics["train_seconds"]
    assert more.metrics["steps"] == 8 and more.metrics["passes_per_point_per_step"] == passes
    with pytest.raises(MapaError, match="8 epochs done; --epochs 4 is fewer"):
        train(small(tmp_path, method="iwae", epochs=4), out, progress=False, resume=True)


def test_sizes_and_samples_actually_used_are_recorded(tmp_path):
    x = torch.randn(200, 2)
    np.save(tmp_path / "points.npy", x.numpy())
    # the file splits 80/10/10 (160/20/20 rows); train is cut to 100, val and test left whole
    cfg = small(tmp_path, data=str(tmp_path / "points.npy"), method="vae", noise_var=0.5,
                n_train=100, n_val=None, n_test=None)
    result = train(cfg, tmp_path / "run", progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    sizes = config["data_sizes"]
    assert sizes == {"n_train": result.data.train.shape[0], "n_val": result.data.val.shape[0],
                     "n_test": result.data.test.shape[0]}
    assert sizes == {"n_train": 100, "n_val": 20, "n_test": 20}  # the sizes used, not the config's
    assert cfg.n_val is None and cfg.n_test is None
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["samples"] is None and metrics["n_train"] == sizes["n_train"]
    assert load_run(tmp_path / "run").config == cfg  # the extra key does not break reloading


# --- feedback a user expects ---------------------------------------------------------------------


def test_every_slow_phase_says_what_it_does(tmp_path, capsys):
    train(small(tmp_path, method="mapa", epochs=2), progress=True)
    err = capsys.readouterr().err
    assert "fitting its prior" in err and "evaluating on 50 validation and 100 test points" in err


def test_interrupt_names_resume_and_the_saved_epoch(tmp_path, monkeypatch, capsys):
    from mapa_vae.training import loop

    real = loop.evaluate_final

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "evaluate_final", interrupt)
    out = tmp_path / "run"
    assert main(_cli_train(tmp_path, out, "--method", "vae", "--epochs", "4")) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "epoch 4" in err and str(out) in err, err
    monkeypatch.setattr(loop, "evaluate_final", real)
    assert main(_cli_train(tmp_path, out, "--method", "vae", "--epochs", "4", "--resume")) == 0


def test_train_applies_the_configs_thread_count(tmp_path, monkeypatch):
    seen: list[int] = []
    from mapa_vae.training import engines

    real = engines.seed_everything

    def spy(seed, copy=0):
        seen.append(torch.get_num_threads())
        return real(seed, copy)

    monkeypatch.setattr(engines, "seed_everything", spy)
    before = torch.get_num_threads()
    train(small(tmp_path, method="vae", epochs=1, threads=3), progress=False)
    assert seen == [3] and torch.get_num_threads() == before  # applied, then restored


# --- the report ----------------------------------------------------------------------------------


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.style, self.in_style, self.stack = "", False, []
        self.figures: list[dict[str, object]] = []

    def handle_starttag(self, tag, attrs):
        self.stack.append(tag)
        if tag == "style":
            self.in_style = True
        if tag == "figure":
            self.figures.append({"img": 0, "caption": ""})
        if tag == "img":
            assert self.stack[-2] == "figure", "an image outside a figure"
            self.figures[-1]["img"] += 1  # type: ignore[operator]

    def handle_endtag(self, tag):
        self.stack.pop()
        if tag == "style":
            self.in_style = False

    def handle_data(self, data):
        if self.in_style:
            self.style += data
        elif self.stack and self.stack[-1] == "figcaption":
            self.figures[-1]["caption"] = str(self.figures[-1]["caption"]) + data


def _rules(css: str) -> dict[str, str]:
    """A strict parse of a flat stylesheet: ``selector{declarations}``, balanced, no ``{{``."""
    assert "{{" not in css and "}}" not in css, css
    rules = re.findall(r"([^{}]+)\{([^{}]*)\}", css)
    assert "".join(f"{s}{{{d}}}" for s, d in rules) == css, "unparsed text in the stylesheet"
    out = {}
    for selector, body in rules:
        for decl in body.split(";"):
            assert re.fullmatch(r"\s*([a-z-]+\s*:\s*[^:;]+)?\s*", decl), decl
        for s in selector.split(","):
            out[s.strip()] = body
    return out


def test_report_html_is_well_formed_and_every_image_captioned(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(22, 2))  # 2420 px wide at 110 dpi: wider than the page
    fig.savefig(tmp_path / "wide.png", dpi=110)
    plt.close(fig)
    rep = Report("t")
    rep.table(["claim", "verdict"], [["(d) q(i | n) tracks", "reproduced"]])
    rep.figure(tmp_path / "wide.png", "a wide figure")
    page = _Page()
    page.feed(rep.html())
    rules = _rules(page.style)
    assert "max-width:100%" in rules["img"] and "height:auto" in rules["img"]
    assert "border" in rules["td"] and "border-collapse:collapse" in rules["table"]
    assert page.figures == [{"img": 1, "caption": "a wide figure"}]
    assert page.style == STYLE
    md = rep.markdown(tmp_path)
    assert "| (d) q(i \\| n) tracks | reproduced |" in md and "*a wide figure*" in md
    with pytest.raises(ValueError, match="caption"):
        rep.figure(tmp_path / "wide.png", " ")


def test_verdicts_below_budget_are_not_judged_and_one_draw_has_no_spread():
    assert below_budget(PROFILES["tiny"]) is not None and below_budget(PROFILES["quick"]) is None
    assert _verdict(0.0, below_budget(PROFILES["tiny"])).startswith("not judged (3 epochs")
    assert _verdict(1.0) == "reproduced"
    assert _fmt({"mean": 0.5, "std": 0.0, "n": 1}) == "0.500 (1 draw)"
    assert _fmt({"mean": 0.5, "std": 0.1, "n": 3}) == "0.500 ± 0.100"


def test_kl_figure_labels_its_y_axis(tmp_path, monkeypatch):
    """A narrow KL range (one decade or less) still gets y tick labels."""
    from mapa_vae.experiments import figures

    captured = {}
    real_save = figures._save

    def save(fig, path):
        fig.canvas.draw()
        captured["labels"] = [[t.get_text() for t in ax.get_yticklabels() if t.get_text()]
                              for ax in fig.axes]
        return real_save(fig, path)

    monkeypatch.setattr(figures, "_save", save)
    summary = {("circle", "iwae", 10): {"mean": 0.31, "std": 0.01, "n": 2},
               ("circle", "iwae", 50): {"mean": 0.34, "std": 0.01, "n": 2},
               ("circle", "vae", 1): {"mean": 0.33, "std": 0.0, "n": 1}}
    figures.plot_kl_vs_samples(summary, tmp_path / "kl.png")
    assert len(captured["labels"][0]) >= 2, captured


def test_metrics_files_are_strict_json_with_reasons(tmp_path, monkeypatch):
    """A validation score of -inf (weights stay finite) is written as null plus its reason; the
    returned metrics keep the float. No finite validation score: no usable model."""
    from mapa_vae.methods.gaussian import VAEMethod

    monkeypatch.setattr(VAEMethod, "validation_log_likelihood", lambda *a: -math.inf)
    with pytest.raises(NoUsableModel, match="no finite validation score") as caught:
        train(small(tmp_path, method="vae", epochs=2), tmp_path / "run", progress=False)
    assert math.isinf(caught.value.result.metrics["best_val_selection_score"])
    metrics = _strict_load(tmp_path / "run" / "metrics.json")
    assert metrics["best_val_selection_score"] is None
    assert metrics["best_val_selection_score_nonfinite"] == "-inf"
    history = _strict_load(tmp_path / "run" / "history.json")
    assert history[-1]["val_log_lik"] is None and history[-1]["val_log_lik_nonfinite"] == "-inf"


def test_overwrite_of_an_interrupted_run_is_refused_without_flag(tmp_path):
    cfg = small(tmp_path, method="vae")
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    (out / "config.json").unlink()  # as if killed before the results were written
    with pytest.raises(MapaError, match="interrupted run"):
        train(dataclasses.replace(cfg, seed=3), out, progress=False)
