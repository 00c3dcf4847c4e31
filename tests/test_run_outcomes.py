"""A run's outcome, told truthfully: no silent failure, no lost or rewritten result.

- a divergent run is no usable model, yet written; a healthy one is usable, in strict JSON;
- a run directory another train holds is refused; a finished or interrupted run is replaced
  only with ``--overwrite``, and an interrupted replacement never passes off the old files;
- the data sizes actually used are recorded; slow phases say what they do; the thread count
  is applied and restored;
- a sweep whose jobs fail on purpose records each failure and loses nothing.

Non-finite steps and scores: ``test_nonfinite.py``; resume: ``test_resume.py``; the report's
page: ``test_report.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mapa_vae.cli import main
from mapa_vae.errors import MapaError, NoUsableModel
from mapa_vae.experiments.sweep import Profile, make_jobs, run_jobs
from mapa_vae.storage import load_tensors
from mapa_vae.training import loop as training
from mapa_vae.training.loop import train
from mapa_vae.training.runs import load_run

# --- runs that fail silently ---------------------------------------------------------------------


def test_divergent_run_is_no_usable_model_but_written(tiny_config, strict_json, tmp_path):
    """--lr 1e9: no step skipped, yet the model scores 1e17 nats below the truth; refused with
    the numbers, the run (and its best checkpoint) still written."""
    with pytest.raises(NoUsableModel, match="far below") as caught:
        train(tiny_config(method="vae", lr=1e9, epochs=6), tmp_path / "run", progress=False)
    result = caught.value.result
    assert result.metrics["usable"] is False and result.metrics["skipped_steps"] == 0
    assert result.metrics["best_val_selection_score"] < -1e6
    ck = load_tensors(tmp_path / "run" / "checkpoint.pt")
    assert ck["best_epoch"] == result.metrics["best_epoch"] > 0
    assert strict_json(tmp_path / "run" / "metrics.json")["problem"] == result.metrics["problem"]


def test_healthy_run_is_usable_and_strict(tiny_config, strict_json, tmp_path):
    result = train(tiny_config(method="iwae"), tmp_path / "run", progress=False)
    metrics = strict_json(tmp_path / "run" / "metrics.json")
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


def test_a_locked_run_directory_refuses_a_second_train(tiny_config, tmp_path):
    """Another process holds the run directory's lock (a train in progress): refused at once."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out / ".train.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(MapaError, match="another train is writing"):
            train(tiny_config(method="vae"), out, progress=False)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()  # type: ignore[union-attr]
    assert not (out / "config.json").exists()
    train(tiny_config(method="vae"), out, progress=False)  # free again once the holder is gone


def test_finished_run_needs_overwrite(train_args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(out, method="vae", epochs=2)) == 0
    before = (out / "metrics.json").read_text()
    assert main(train_args(out, method="vae", epochs=2, seed=1)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == before  # untouched
    assert main(train_args(out, "--overwrite", method="vae", epochs=2, seed=1)) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 1


def test_sizes_and_samples_actually_used_are_recorded(tiny_config, tmp_path):
    x = torch.randn(200, 2)
    np.save(tmp_path / "points.npy", x.numpy())
    # the file splits 80/10/10 (160/20/20 rows); train is cut to 100, val and test left whole
    cfg = tiny_config(data=str(tmp_path / "points.npy"), method="vae", noise_var=0.5,
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


def test_every_slow_phase_says_what_it_does(tiny_config, tmp_path, capsys):
    train(tiny_config(method="mapa", epochs=2), progress=True)
    err = capsys.readouterr().err
    assert "fitting its prior" in err and "evaluating on 50 validation and 100 test points" in err


def test_train_applies_the_configs_thread_count(tiny_config, tmp_path, monkeypatch):
    seen: list[int] = []
    from mapa_vae.training import engines

    real = engines.seed_everything

    def spy(seed, copy=0):
        seen.append(torch.get_num_threads())
        return real(seed, copy)

    monkeypatch.setattr(engines, "seed_everything", spy)
    before = torch.get_num_threads()
    train(tiny_config(method="vae", epochs=1, threads=3), progress=False)
    assert seen == [3] and torch.get_num_threads() == before  # applied, then restored


# --- replacing a run ----------------------------------------------------------------------------------


def test_overwrite_of_an_interrupted_run_is_refused_without_flag(tiny_config, tmp_path):
    cfg = tiny_config(method="vae")
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    (out / "config.json").unlink()  # as if killed before the results were written
    with pytest.raises(MapaError, match="interrupted run"):
        train(dataclasses.replace(cfg, seed=3), out, progress=False)


def test_interrupted_retrain_never_passes_off_stale_files(tiny_config, tmp_path, monkeypatch):
    """A new run into a finished run's folder, interrupted: the old run stays readable as a
    whole, or the mismatch is an error; the old model is never read under the new config."""
    cfg = tiny_config(method="vae", samples=10, epochs=2)
    run = tmp_path / "run"
    first = train(cfg, run, progress=False)
    x = first.data.test[:20].float()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    # killed during the final evaluation: nothing of the new run's results is written yet
    monkeypatch.setattr(training, "evaluate_final", interrupt)
    with pytest.raises(KeyboardInterrupt):  # replacing a finished run needs overwrite=True
        train(dataclasses.replace(cfg, seed=1), run, progress=False, overwrite=True)
    monkeypatch.undo()
    loaded = load_run(run)
    assert loaded.config == cfg
    assert torch.equal(loaded.model.decoder.net(x[:, :1]), first.model.decoder.net(x[:, :1]))
    # killed between writing the new model files and config.json: refused, not mixed
    real = training.write_json

    def write_json_then_die(path, obj):
        if Path(path).name == "metrics.json":
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(training, "write_json", write_json_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(cfg, seed=2), run, progress=False, overwrite=True)
    with pytest.raises(MapaError, match="another run"):
        load_run(run)


# --- a sweep with failing jobs ------------------------------------------------------------------


SOAK = Profile("soak", ("circle",), (5, 10, 200), restarts=3, draws=2,
               variants=("vae", "iwae", "mapa-k10"),
               train={"epochs": 1, "n_train": 60, "n_val": 30, "n_test": 30, "eval_every": 1,
                      "hidden": (8,), "val_grid": 256, "test_grid": 256})


@pytest.mark.slow
def test_sweep_soak_with_failing_jobs(tmp_path):
    """14 small jobs (each training its 3 restarts together) on two loky workers; the 2 MAPA jobs
    with S = 200 > N - 1 fail on purpose: each failure is recorded with its one-line error, every
    other job finishes, nothing is lost, and a second pass redoes only the failures."""
    from joblib.externals.loky import get_reusable_executor

    jobs = make_jobs(SOAK)
    assert len(jobs) == 2 * (1 + 3 + 3)  # draws × (VAE once + IWAE and MAPA at each S)
    store = tmp_path / "sweep"
    try:
        records = run_jobs(jobs, store, n_jobs=2, cache_dir=str(tmp_path / "cache"), progress=False)
        assert [r["key"] for r in records] == [j.key for j in jobs]
        failed = [r for r in records if r["status"] == "failed"]
        done = [r for r in records if r["status"] == "done"]
        assert len(done) == 12 and len(failed) == 2
        assert {(r["job"]["variant"], r["job"]["samples"]) for r in failed} == {("mapa-k10", 200)}
        for r in failed:
            assert r["error"].startswith("MapaError: k + S = 220") and "\n" not in r["error"]
        for r in done:
            assert math.isfinite(r["metrics"]["test_kl"])
        files = {p.stem: json.loads(p.read_text()) for p in (store / "jobs").glob("*.json")}
        assert files == {r["key"]: json.loads(json.dumps(r)) for r in records}  # all on disk
        stamps = {p.stem: p.stat().st_mtime_ns for p in (store / "jobs").glob("*.json")}
        again = run_jobs(jobs, store, n_jobs=2, cache_dir=str(tmp_path / "cache"), progress=False)
    finally:
        get_reusable_executor().shutdown(wait=True)
    assert [r["status"] for r in again] == [r["status"] for r in records]
    for r in again:
        rewritten = (store / "jobs" / f"{r['key']}.json").stat().st_mtime_ns != stamps[r["key"]]
        assert rewritten == (r["status"] == "failed"), r["job"]
    assert not [p for p in (store / "jobs").iterdir() if p.name.endswith(".tmp")]
