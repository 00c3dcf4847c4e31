"""Resume: a run stopped — finished, interrupted (SIGINT) or killed (SIGKILL, a sweep) — goes on
with ``--resume`` exactly as if it had never stopped.

- bit for bit: 8 epochs straight equal 4 epochs then a resume to 8, for one copy and for R copies,
  in the same process and in a new one; the checkpoint format written before runs trained
  copies resumes too;
- the run's cost (time, passes) adds up across the parts;
- refusals: no checkpoint, a checkpoint missing fields, another configuration, fewer epochs;
- a sweep killed midway redoes no finished job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from mapa_vae.cli import main
from mapa_vae.errors import MapaError
from mapa_vae.experiments.sweep import Profile, make_jobs, run_jobs
from mapa_vae.storage import TEMP_SUFFIX, load_tensors, save_tensors
from mapa_vae.training import loop
from mapa_vae.training.loop import train

TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX) + "$")


def _same_state(a, b) -> bool:
    """Nested dicts and lists of tensors and numbers, equal bit for bit."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(_same_state, a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


# --- bit for bit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("restarts", [1, 3])
@pytest.mark.parametrize("method", ["mapa", "iwae"])
def test_resume_continues_bit_for_bit(tiny_config, tmp_path, method, restarts):
    """8 epochs straight equal 4 epochs, then a resumed run to 8, every copy, bit for bit on CPU:
    weights, the kept model, the optimizer's state, the history and the passes per step."""
    straight = train(tiny_config(method=method, restarts=restarts, epochs=8), tmp_path / "a",
                     progress=False)
    train(tiny_config(method=method, restarts=restarts, epochs=4), tmp_path / "b", progress=False)
    resumed = train(tiny_config(method=method, restarts=restarts, epochs=8), tmp_path / "b",
                    progress=False, resume=True)
    for x, y in zip(straight.trained.state_dict().values(), resumed.trained.state_dict().values(),
                    strict=True):
        assert torch.equal(x, y)
    ck_a, ck_b = (load_tensors(tmp_path / d / "checkpoint.pt") for d in "ab")
    assert ck_a["epoch"] == ck_b["epoch"] == 8
    assert ck_a["model"].keys() == ck_b["model"].keys()
    for key in ck_a["model"]:
        assert torch.equal(ck_a["model"][key], ck_b["model"][key])
    assert _same_state(ck_a["optimizer"], ck_b["optimizer"])  # torch's Adam, or RestartAdam's
    assert straight.history == resumed.history
    assert straight.metrics["passes_per_point_per_step"] == resumed.metrics["passes_per_point_per_step"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["iwae", "mapa"])
def test_resume_in_a_new_process_is_exact(tmp_path, train_args, run_cli, method):
    """8 epochs in one process equal 4 epochs, then a new process resuming to 8: bit for bit
    (CPU)."""
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert main(train_args(a, method=method, epochs=8)) == 0
    assert main(train_args(b, method=method, epochs=4)) == 0
    res = run_cli(*train_args(b, "--resume", method=method, epochs=8))  # a fresh process
    assert res.returncode == 0, res.stderr
    for name in ("trained.pt", "model.pt"):
        sa, sb = load_tensors(a / name)["model"], load_tensors(b / name)["model"]
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    ck_a, ck_b = load_tensors(a / "checkpoint.pt"), load_tensors(b / "checkpoint.pt")
    assert ck_a["epoch"] == ck_b["epoch"] == 8
    opt_a, opt_b = ck_a["optimizer"], ck_b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for i, state in opt_a["state"].items():
        assert all(torch.equal(state[k], opt_b["state"][i][k]) for k in state)
    assert torch.equal(ck_a["torch_rng"], ck_b["torch_rng"])
    assert json.loads((a / "history.json").read_text()) == json.loads((b / "history.json").read_text())
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for key in ("best_epoch", "best_val_selection_score", "skipped_steps", "val_log_lik", "test_kl"):
        assert ma[key] == mb[key], key


def test_resume_of_a_checkpoint_written_before_copies(tiny_config, tmp_path):
    """A single run's checkpoint in the format written before runs trained copies (no per-copy
    state; history values as floats) resumes to the same weights and history as a run straight
    through."""
    straight = train(tiny_config(method="mapa", epochs=6), tmp_path / "a", progress=False)
    train(tiny_config(method="mapa", epochs=4), tmp_path / "b", progress=False)
    ck = load_tensors(tmp_path / "b" / "checkpoint.pt")
    ck["torch_rng"] = ck["restarts"]["rng"][0]  # the run's generator, as a single run kept it
    del ck["restarts"]
    ck["history"] = [{k: v for k, v in h.items() if not k.endswith("_per_copy")} for h in ck["history"]]
    save_tensors(tmp_path / "b" / "checkpoint.pt", ck)
    resumed = train(tiny_config(method="mapa", epochs=6), tmp_path / "b", progress=False,
                    resume=True)
    for a, b in zip(straight.trained.state_dict().values(), resumed.trained.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert resumed.history == straight.history
    assert resumed.metrics["skipped_steps"] == straight.metrics["skipped_steps"]


# --- what a resumed run reports ----------------------------------------------------------------


def test_resume_keeps_cumulative_time_and_passes_and_refuses_fewer_epochs(tiny_config, tmp_path):
    out = tmp_path / "run"
    first = train(tiny_config(method="iwae", epochs=4), out, progress=False)
    passes = first.metrics["passes_per_point_per_step"]
    # resume a finished run: the cost is the run's, not 0 s and 0 passes
    again = train(tiny_config(method="iwae", epochs=4), out, progress=False, resume=True)
    assert again.metrics["train_seconds"] == pytest.approx(first.metrics["train_seconds"], abs=0.02)
    assert again.metrics["passes_per_point_per_step"] == passes
    # resume to 8 epochs: the time counts both parts
    more = train(tiny_config(method="iwae", epochs=8), out, progress=False, resume=True)
    assert more.metrics["train_seconds"] > first.metrics["train_seconds"]
    assert more.metrics["steps"] == 8 and more.metrics["passes_per_point_per_step"] == passes
    with pytest.raises(MapaError, match="8 epochs done; --epochs 4 is fewer"):
        train(tiny_config(method="iwae", epochs=4), out, progress=False, resume=True)


def test_interrupt_names_resume_and_the_saved_epoch(tmp_path, train_args, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) after the last epoch: exit 130, the message names --resume, the
    saved epoch and the run; ``--resume`` then finishes the run."""
    real = loop.evaluate_final

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "evaluate_final", interrupt)
    out = tmp_path / "run"
    assert main(train_args(out, method="vae", epochs=4)) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "epoch 4" in err and str(out) in err, err
    monkeypatch.setattr(loop, "evaluate_final", real)
    assert main(train_args(out, "--resume", method="vae", epochs=4)) == 0


# --- refusals ----------------------------------------------------------------------------------


def test_resume_without_checkpoint_is_a_clear_error(tiny_config, tmp_path):
    with pytest.raises(MapaError, match="no checkpoint"):
        train(tiny_config(), tmp_path / "nothing", progress=False, resume=True)


def test_resume_refuses_another_configuration(tmp_path, train_args, one_line_error, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, method="vae", epochs=2)) == 0
    capsys.readouterr()
    assert main(train_args(run, "--resume", method="vae", epochs=4, lr=0.01)) == 2
    out, err = capsys.readouterr()
    line = one_line_error(err)
    assert "lr=0.001 there, 0.01 now" in line and out == ""
    assert main(train_args(run, "--resume", method="iwae", epochs=4)) == 2
    assert "method='vae' there, 'iwae' now" in one_line_error(capsys.readouterr().err)
    # only --epochs (and where the cache lives) may change
    assert main(train_args(run, "--resume", method="vae", epochs=4,
                           cache_dir=str(tmp_path / "cache2"))) == 0
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1, 2, 3, 4]


def test_checkpoint_missing_fields_is_a_clear_error(tiny_config, tmp_path):
    cfg = tiny_config(method="vae", samples=10, epochs=2)
    train(cfg, tmp_path / "run", progress=False)
    ck = load_tensors(tmp_path / "run" / "checkpoint.pt")
    del ck["optimizer"]
    save_tensors(tmp_path / "run" / "checkpoint.pt", ck)
    with pytest.raises(MapaError, match="does not fit this run"):
        train(dataclasses.replace(cfg, epochs=4), tmp_path / "run", progress=False, resume=True)


# --- a sweep killed midway ---------------------------------------------------------------------


SWEEP_SCRIPT = textwrap.dedent("""
    import sys, time
    import mapa_vae.experiments.sweep as sweep
    real = sweep.train

    def slow_train(*args, **kwargs):  # each job takes a moment, so the kill lands mid-sweep
        result = real(*args, **kwargs)
        time.sleep(0.3)
        return result

    sweep.train = slow_train
    profile = sweep.Profile(**eval(sys.argv[3]))
    sweep.run_jobs(sweep.make_jobs(profile), sys.argv[1], n_jobs=1, cache_dir=sys.argv[2],
                   progress=False)
""")


KILL_PROFILE = dict(name="kill", datasets=("circle",), samples=(5,), restarts=1, draws=5,
                    variants=("vae", "iwae"),
                    train={"epochs": 1, "n_train": 60, "n_val": 30, "n_test": 30, "eval_every": 1,
                           "hidden": (8,), "val_grid": 256, "test_grid": 256})


@pytest.mark.slow
def test_sweep_killed_midway_resumes_without_redoing_jobs(tmp_path, child_env):
    """A sweep SIGKILLed after 3 of its 10 jobs: run again, it does the other 7 and leaves
    the finished ones untouched."""
    store, cache = tmp_path / "sweep", tmp_path / "cache"
    jobs = make_jobs(Profile(**KILL_PROFILE))
    assert len(jobs) == 10
    proc = subprocess.Popen([sys.executable, "-c", SWEEP_SCRIPT, str(store), str(cache),
                             repr(KILL_PROFILE)], env=child_env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list((store / "jobs").glob("*.json"))) < 3:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {p.name: (p.stat().st_mtime_ns, p.read_bytes())
                for p in (store / "jobs").glob("*.json")}
    assert 3 <= len(finished) < len(jobs)
    records = run_jobs(jobs, store, n_jobs=1, cache_dir=str(cache), progress=False)
    assert [r["status"] for r in records] == ["done"] * len(jobs)
    for name, (mtime, content) in finished.items():
        p = store / "jobs" / name
        assert (p.stat().st_mtime_ns, p.read_bytes()) == (mtime, content), f"{name} was redone"
    on_disk = {p.name for p in (store / "jobs").glob("*.json")}
    assert on_disk == {f"{j.key}.json" for j in jobs}
    for p in (store / "jobs").iterdir():
        assert p.name in on_disk or TEMP_NAME.match(p.name), p.name

