"""Reliability: a user's runs are hours of compute and their data is theirs.

The tool must survive being killed, never run code from a file it loads, never silently use a
stale or corrupt result, and keep going when single steps or jobs go wrong:

- safe loading: pickled code in a checkpoint or cache is refused and never runs;
- atomic writes: a write that fails or is SIGKILLed leaves the previous file, which loads;
- exact resume across processes, for one run and for a sweep killed midway;
- numerical guards: a non-finite step is skipped before the weights change;
- cache integrity: the key, the stored digest, and four processes building one cache at once;
- a soak test of the sweep runner with jobs that fail on purpose.

Input validation (bad files through the loaders, the training API and the CLI) is in
``test_data.py``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import pathlib
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mapa_vae
import mapa_vae.storage as storage
from mapa_vae.cli import main
from mapa_vae.config import TrainConfig
from mapa_vae.errors import MapaError
from mapa_vae.experiments.sweep import Profile, make_jobs, run_jobs
from mapa_vae.inference.cache import cached_posterior
from mapa_vae.inference.posterior import MapaPosterior
from mapa_vae.kernels import BernoulliKernel, GaussianKernel
from mapa_vae.registry import METHODS
from mapa_vae.storage import (
    TEMP_SUFFIX,
    atomic_write,
    load_tensors,
    remove_stale_temps,
    save_tensors,
    write_json,
)
from mapa_vae.training import loop as training
from mapa_vae.training.loop import train
from mapa_vae.training.runs import load_run

SRC = Path(mapa_vae.__file__).parent
TINY = dict(n_train=200, n_val=100, n_test=200, eval_every=2, val_grid=2**10, test_grid=2**12,
            prior_steps=100, restarts=1)  # single runs; tests/test_restarts.py: R > 1
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX) + "$")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``mapa-vae ARGS`` in a fresh Python process."""
    return subprocess.run([sys.executable, "-m", "mapa_vae.cli", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def _one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    assert stderr.startswith("mapa-vae: error: ") and stderr.count("\n") == 1, stderr
    return stderr


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# --- safe loading ---------------------------------------------------------------------------------


class _Explodes:
    """Unpickling this creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _write_malicious(path: Path, marker: Path, how: str) -> None:
    payload = {"model": {"weight": _Explodes(marker)}, "epoch": 3}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))


def test_the_malicious_payload_really_runs_code(tmp_path):
    """The sentinel works: unpickling the payload without protection creates the marker."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Explodes(marker)))
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("name", ["model.pt", "checkpoint.pt"])
def test_load_tensors_refuses_pickled_code(tmp_path, how, name):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    _write_malicious(path, marker, how)
    with pytest.raises(MapaError) as info:
        load_tensors(path)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message
    assert str(path) in message and "refused" in message
    assert "weights_only=False" not in message  # never advise the unsafe way
    assert not marker.exists()


def test_no_fallback_to_unsafe_loading(tmp_path, monkeypatch):
    """Every torch.load call is weights-only, for good, malicious and corrupt files alike."""
    calls: list[dict] = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    marker = tmp_path / "pwned"
    save_tensors(tmp_path / "good.pt", {"w": torch.ones(3)})
    _write_malicious(tmp_path / "bad.pt", marker, "torch.save")
    (tmp_path / "torn.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:100])
    assert torch.equal(load_tensors(tmp_path / "good.pt")["w"], torch.ones(3))
    for name in ("bad.pt", "torn.pt"):
        with pytest.raises(MapaError):
            load_tensors(tmp_path / name)
    assert len(calls) == 3
    assert all(kw.get("weights_only") is True for kw in calls)
    assert not marker.exists()


def _hand_made_run(run: Path) -> None:
    """A run directory with a valid config.json (no training needed)."""
    cfg = TrainConfig(data="circle", method="vae", hidden=(8,), samples=10, epochs=2, **TINY,
                      cache_dir=str(run.parent / "cache"))
    run.mkdir()
    write_json(run / "config.json", {**dataclasses.asdict(cfg), "data_dim": 2,
                                     "likelihood_config": {"name": "gaussian", "noise_var": 0.01}})


@pytest.mark.slow
def test_cli_refuses_malicious_model_and_checkpoint(tmp_path):
    """``sample`` and ``train --resume`` in a fresh process: one line, exit 2, nothing runs."""
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    _hand_made_run(run)
    _write_malicious(run / "model.pt", marker, "pickle")  # plain pickle also makes torch warn
    _write_malicious(run / "checkpoint.pt", marker, "torch.save")
    out = tmp_path / "samples.npy"
    res = _cli("sample", str(run), "--n", "5", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert str(run / "model.pt") in _one_line_error(res.stderr)
    assert res.stdout == "" and not out.exists()
    train_args = ["train", "--data", "circle", "--method", "vae", "--hidden", "8", "--epochs", "2",
                  "--samples", "10", "--n-train", "200", "--n-val", "100", "--n-test", "200",
                  "--eval-every", "2", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    res = _cli(*train_args, "--out", str(run), "--resume", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert str(run / "checkpoint.pt") in _one_line_error(res.stderr)
    res = _cli(*train_args, "--out", str(tmp_path / "fresh"), "--resume", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "no checkpoint" in _one_line_error(res.stderr)
    assert not marker.exists()


FORBIDDEN = {
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
    "pickle.load": re.compile(r"\bpickle\s*\.\s*(loads?|Unpickler)\b"),
    "other unpicklers": re.compile(r"^\s*(import|from)\s+(cloudpickle|dill|shelve|marshal)\b", re.M),
    "joblib.load": re.compile(r"\bjoblib\s*\.\s*load\s*\("),
    "torch.load without weights_only=True":
        re.compile(r"\btorch\s*\.\s*load\s*\((?![^)]*weights_only\s*=\s*True)"),
    "np.load without allow_pickle=False":
        re.compile(r"\bnp\s*\.\s*load\s*\((?![^)]*allow_pickle\s*=\s*False)"),
    "safe-globals allow-list": re.compile(r"add_safe_globals|safe_globals\s*\("),
}


def test_forbidden_patterns_are_recognized():
    """The scanner below can fail: each pattern catches a line that would be unsafe."""
    bad = {
        "allow_pickle=True": "np.load(f, allow_pickle=True)",
        "weights_only=False": "torch.load(p, weights_only=False)",
        "pickle.load": "obj = pickle.load(fh)",
        "other unpicklers": "import dill",
        "joblib.load": "model = joblib.load(path)",
        "torch.load without weights_only=True": "torch.load(path, map_location='cpu')",
        "np.load without allow_pickle=False": "np.load(path)",
        "safe-globals allow-list": "torch.serialization.add_safe_globals([Foo])",
    }
    for name, pattern in FORBIDDEN.items():
        assert pattern.search(bad[name]), name
    assert not FORBIDDEN["torch.load without weights_only=True"].search(
        "torch.load(path, map_location=map_location, weights_only=True)")
    assert not FORBIDDEN["np.load without allow_pickle=False"].search("np.load(fh, allow_pickle=False)")


def test_source_never_unpickles():
    """Grep the package: loading is weights-only / pickle-free everywhere, no pickle files ship."""
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    found = [f"{f.relative_to(SRC)}: {name}" for f in files for name, pattern in FORBIDDEN.items()
             if pattern.search(f.read_text())]
    assert not found, found
    shipped = [p.name for p in SRC.rglob("*") if p.suffix in {".pkl", ".pickle", ".joblib", ".npz"}]
    assert not shipped, shipped


# --- atomic writes ----------------------------------------------------------------------------


class _DiskFull:
    """A file that takes ``limit`` bytes and then fails as a full disk does."""

    def __init__(self, inner, limit: int) -> None:
        self.inner, self.left = inner, limit

    def write(self, b) -> int:
        data = bytes(b)
        if len(data) > self.left:
            self.inner.write(data[: self.left])
            self.inner.flush()
            self.left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.inner.write(data)

    def __getattr__(self, name):  # flush, fileno, seek, tell, close, ...: the real file's
        return getattr(self.inner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.inner.close()


def _arm(monkeypatch, name: str, make):
    """Replace ``os.<name>`` for its next call only (the one inside atomic_write)."""
    real = getattr(os, name)
    state = {"armed": True}

    def once(*args, **kwargs):
        if state["armed"]:
            state["armed"] = False
            return make(real, *args, **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, once)


def _fail(real, *args, **kwargs):
    raise OSError(errno.EIO, "injected I/O error")


FAILURES = {
    "disk-full-mid-write": ("fdopen", lambda real, *a, **k: _DiskFull(real(*a, **k), 1000)),
    "fsync": ("fsync", _fail),
    "rename": ("replace", _fail),
}

WRITERS = {
    "save_tensors": (lambda p, v: save_tensors(p, {"w": torch.full((5000,), float(v))}),
                     lambda p: float(load_tensors(p)["w"][0])),
    "write_json": (lambda p, v: write_json(p, {"v": v, "pad": "x" * 5000}),
                   lambda p: json.loads(p.read_text())["v"]),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("writer", list(WRITERS))
def test_failed_write_keeps_previous_file(tmp_path, monkeypatch, failure, writer):
    write, read = WRITERS[writer]
    path = tmp_path / "checkpoint.pt"
    write(path, 1)
    before = path.read_bytes()
    name, make = FAILURES[failure]
    _arm(monkeypatch, name, make)
    with pytest.raises(OSError):
        write(path, 2)
    assert path.read_bytes() == before
    assert read(path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left
    write(path, 3)  # and the next write works
    assert read(path) == 3


def test_exception_inside_atomic_write_keeps_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError, match="half"), atomic_write(path) as f:
        f.write(b'{"v": 2, "trunc')
        raise RuntimeError("half-way")
    assert json.loads(path.read_text()) == {"v": 1}
    with pytest.raises(TypeError):
        write_json(path, {"v": object()})  # not serializable: fails inside the write
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_failed_cache_write_leaves_no_file_and_other_caches_intact(circle_data, tmp_path, monkeypatch):
    kernel = GaussianKernel(0.01)
    first, hit = cached_posterior(circle_data, kernel, tmp_path, top_k=20)
    assert not hit
    _arm(monkeypatch, "fdopen", lambda real, *a, **k: _DiskFull(real(*a, **k), 4000))
    with pytest.raises(OSError, match="No space"):
        cached_posterior(circle_data, kernel, tmp_path, top_k=30)
    assert len(list(tmp_path.glob("posterior-*.npz"))) == 1  # only the earlier, complete cache
    assert not _temp_files(tmp_path)
    again, hit = cached_posterior(circle_data, kernel, tmp_path, top_k=20)
    assert hit and all(torch.equal(getattr(first, f), getattr(again, f))
                       for f in ("log_q", "index", "log_rest"))
    _, hit = cached_posterior(circle_data, kernel, tmp_path, top_k=30)
    assert not hit  # rebuilt now that the disk has room
    _, hit = cached_posterior(circle_data, kernel, tmp_path, top_k=30)
    assert hit


def test_cli_write_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """An output path that cannot be written (exit 2) or a disk that fills up (exit 1)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["data", "circle", "--n", "50", "--out", str(blocker / "x.npy")]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "--out" in line and str(blocker / "x.npy") in line  # the flag and the path it names
    assert f"lies under the file {blocker}" in line  # and why it cannot be written
    _arm(monkeypatch, "fdopen", lambda real, *a, **k: _DiskFull(real(*a, **k), 1000))
    assert main(["data", "circle", "--n", "2000", "--out", str(tmp_path / "x.npy")]) == 1
    assert "No space left on device" in _one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


WRITER_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from mapa_vae.storage import save_tensors
    path, i = sys.argv[1], int(sys.argv[2])
    while True:
        save_tensors(path, {"i": i, "w": torch.full((400_000,), float(i), dtype=torch.float64)})
        i += 1
""")


@pytest.mark.slow
def test_sigkill_during_writes_leaves_a_file_that_loads(tmp_path):
    """A writer killed at random moments: the target always loads, complete and consistent.

    A kill inside the write window may leave the writer's hidden temp file; nothing reads it,
    and the next write in the folder deletes it once it is ``STALE_TEMP_SECONDS`` old.
    """
    path = tmp_path / "state.pt"
    rng = random.Random(0)
    last = -1
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(path), str(last + 1)],
                                env=_env())
        try:
            deadline = time.monotonic() + 60
            while not path.exists() or load_tensors(path)["i"] <= last:  # it has written once
                assert time.monotonic() < deadline, "the writer never wrote"
                assert proc.poll() is None, "the writer died"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        state = load_tensors(path)
        assert state["i"] > last
        assert torch.equal(state["w"], torch.full((400_000,), float(state["i"]), dtype=torch.float64))
        last = state["i"]
        for p in tmp_path.iterdir():
            assert p == path or TEMP_NAME.match(p.name), p.name
    # stale temp files of dead writers: removed by the next write; fresh ones and others are kept
    stale = tmp_path / f".state.pt.abcd1234{TEMP_SUFFIX}"
    fresh = tmp_path / f".other.pt.efgh5678{TEMP_SUFFIX}"
    users = tmp_path / ".notes.tmp"
    for p in (stale, fresh, users):
        p.write_bytes(b"partial")
    old = time.time() - 2 * storage.STALE_TEMP_SECONDS
    leftovers = _temp_files(tmp_path)
    for p in leftovers:
        if p not in (fresh,):
            os.utime(p, (old, old))
    save_tensors(path, {"i": last + 1})
    remaining = {p.name for p in tmp_path.iterdir()}
    assert remaining == {"state.pt", fresh.name, users.name}
    assert remove_stale_temps(tmp_path, max_age=0) == [fresh]


# --- exact resume across processes --------------------------------------------------------------


def _train_cli(method: str, out: Path, cache: Path, epochs: int, *extra: str) -> list[str]:
    return ["train", "--data", "circle", "--method", method, "--n-train", "200", "--n-val", "100",
            "--n-test", "200", "--eval-every", "2", "--samples", "10", "--hidden", "16", "16",
            "--epochs", str(epochs), "--restarts", "1", "--cache-dir", str(cache), "--out", str(out),
            "--quiet", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["iwae", "mapa"])
def test_resume_in_a_new_process_is_exact(tmp_path, method):
    """8 epochs in one process equal 4 epochs, a new process resuming to 8: bit for bit (CPU)."""
    cache = tmp_path / "cache"
    for argv in (_train_cli(method, tmp_path / "straight", cache, 8),
                 _train_cli(method, tmp_path / "resumed", cache, 4),
                 _train_cli(method, tmp_path / "resumed", cache, 8, "--resume")):
        res = _cli(*argv, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
    a, b = tmp_path / "straight", tmp_path / "resumed"
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


def test_resume_refuses_another_configuration(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(_train_cli("vae", tmp_path / "run", cache, 2)) == 0
    capsys.readouterr()
    assert main([*_train_cli("vae", tmp_path / "run", cache, 4), "--lr", "0.01", "--resume"]) == 2
    out, err = capsys.readouterr()
    line = _one_line_error(err)
    assert "lr=0.001 there, 0.01 now" in line and out == ""
    assert main([*_train_cli("iwae", tmp_path / "run", cache, 4), "--resume"]) == 2
    assert "method='vae' there, 'iwae' now" in _one_line_error(capsys.readouterr().err)
    # only --epochs (and where the cache lives) may change
    assert main([*_train_cli("vae", tmp_path / "run", tmp_path / "cache2", 4), "--resume"]) == 0
    assert [h["epoch"] for h in json.loads((tmp_path / "run" / "history.json").read_text())] == [1, 2, 3, 4]


def test_checkpoint_missing_fields_is_a_clear_error(tmp_path):
    cfg = TrainConfig(data="circle", method="vae", hidden=(8,), samples=10, epochs=2, **TINY,
                      cache_dir=str(tmp_path / "cache"))
    train(cfg, tmp_path / "run", progress=False)
    ck = load_tensors(tmp_path / "run" / "checkpoint.pt")
    del ck["optimizer"]
    save_tensors(tmp_path / "run" / "checkpoint.pt", ck)
    with pytest.raises(MapaError, match="does not fit this run"):
        train(dataclasses.replace(cfg, epochs=4), tmp_path / "run", progress=False, resume=True)


def test_interrupted_retrain_never_passes_off_stale_files(tmp_path, monkeypatch):
    """A new run into a finished run's folder, interrupted: the old run stays readable as a
    whole, or the mismatch is an error; the old model is never read under the new config."""
    cfg = TrainConfig(data="circle", method="vae", hidden=(8,), samples=10, epochs=2, **TINY,
                      cache_dir=str(tmp_path / "cache"))
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
def test_sweep_killed_midway_resumes_without_redoing_jobs(tmp_path):
    store, cache = tmp_path / "sweep", tmp_path / "cache"
    jobs = make_jobs(Profile(**KILL_PROFILE))
    assert len(jobs) == 10
    proc = subprocess.Popen([sys.executable, "-c", SWEEP_SCRIPT, str(store), str(cache),
                             repr(KILL_PROFILE)], env=_env(), start_new_session=True)
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


# --- numerical guards ---------------------------------------------------------------------------


def _inject(kind: str, out: torch.Tensor) -> torch.Tensor:
    """Poison a decoder output the way an overflow would: gradients still flow through it."""
    mask = torch.zeros_like(out, dtype=torch.bool)
    mask.view(-1, out.shape[-1])[0, 0] = True
    if kind == "nan":
        return torch.where(mask, out * math.nan, out)
    if kind == "inf":
        return torch.where(mask, out + math.inf, out)
    return out + 1e30  # "huge": finite outputs, but every log-likelihood overflows to -inf


@pytest.mark.parametrize("kind", ["nan", "inf", "huge"])
@pytest.mark.parametrize("method", ["vae", "iwae", "mapa"])
def test_poisoned_decoder_output_skips_the_step(tmp_path, monkeypatch, method, kind):
    """Decoder output poisoned at step 3: the weights after it equal those before it, the
    optimizer state does not advance, the skip is counted and no checkpoint holds inf or NaN."""
    cls = type(METHODS[method])
    build = cls.build
    seen: dict[str, object] = {"calls": 0}

    def build_with_hook(self, arch, likelihood, cfg):
        model = build(self, arch, likelihood, cfg)

        def hook(module, inputs, out):
            if not (module.training and torch.is_grad_enabled()):
                return None
            seen["calls"] += 1
            if seen["calls"] == 3:
                seen["before"] = {k: v.clone() for k, v in model.state_dict().items()}
                return _inject(kind, out)
            if seen["calls"] == 4:
                seen["after"] = {k: v.clone() for k, v in model.state_dict().items()}
            return None

        model.decoder.net.register_forward_hook(hook)
        return model

    monkeypatch.setattr(cls, "build", build_with_hook)
    cfg = TrainConfig(data="circle", method=method, hidden=(16, 16), samples=10, epochs=4,
                      cache_dir=str(tmp_path / "cache"), **TINY)
    result = train(cfg, tmp_path / "run", progress=False)
    assert seen["calls"] == 8  # one decoder pass per step, 2 steps per epoch
    before, after = seen["before"], seen["after"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.metrics["skipped_steps"] == 1
    ck = load_tensors(tmp_path / "run" / "checkpoint.pt")
    tensors = [*ck["model"].values(), *ck["best_model"].values()]
    tensors += [t for s in ck["optimizer"]["state"].values() for t in s.values()]
    assert all(torch.isfinite(t).all() for t in tensors)
    steps = {float(s["step"]) for s in ck["optimizer"]["state"].values()}
    assert steps == {7.0}  # 8 steps, 1 skipped
    assert not all(torch.equal(after[k], v) for k, v in result.trained.state_dict().items())


def test_logsumexp_of_all_minus_inf():
    """All log-weights -inf: the bound is -inf, so the loss is not finite and the training loop
    skips the step before backpropagating. (torch's gradient here is NaN, not finite: the skip
    is what keeps it out of the weights; see ``test_poisoned_decoder_output_skips_the_step``.)"""
    log_w = torch.full((10, 3), -math.inf, requires_grad=True)
    bound = torch.logsumexp(log_w, 0) - math.log(10)
    assert torch.equal(bound, torch.full((3,), -math.inf))
    assert not torch.isfinite(-bound.mean())
    # one point's weights all -inf, the others finite: still not finite as a batch loss
    mixed = torch.cat([torch.full((10, 1), -math.inf), torch.zeros(10, 2)], 1)
    assert not torch.isfinite(-(torch.logsumexp(mixed, 0) - math.log(10)).mean())
    # a single -inf weight among finite ones: finite value, finite gradient (weight exactly 0)
    part = torch.zeros(10, 3)
    part[0] = -math.inf
    part.requires_grad_(True)
    (torch.logsumexp(part, 0) - math.log(10)).sum().backward()
    assert part.grad is not None and torch.isfinite(part.grad).all()
    assert torch.equal(part.grad[0], torch.zeros(3))


@pytest.mark.parametrize("offset", [1e4, -1e4, 0.0])
def test_float32_log_mean_exp_matches_float64_on_extreme_log_weights(offset):
    """``logsumexp(log w) - log S`` in float32 agrees with a float64 reference for log-weights
    near ±1e4, spread over hundreds of nats; the normalized weights stay a distribution."""
    g = torch.Generator().manual_seed(0)
    s, b = 100, 50
    log_w64 = offset + 300.0 * torch.randn(s, b, generator=g, dtype=torch.float64)
    log_w64[:, 0] = offset  # ties
    log_w64[1:, 1] = offset - 1e4  # one dominant weight
    log_w32 = log_w64.float().requires_grad_(True)
    value32 = torch.logsumexp(log_w32, 0) - math.log(s)
    top = log_w64.max(0).values
    ref = top + torch.log(torch.exp(log_w64 - top).sum(0)) - math.log(s)  # written out, float64
    assert torch.isfinite(value32).all()
    # float32 can only resolve |log w| ≈ 1e4 to ~1e-3 nats: the inputs' own rounding
    torch.testing.assert_close(value32.double(), ref, rtol=1e-6, atol=4e-3)
    torch.testing.assert_close(value32[0].double(), torch.tensor(offset, dtype=torch.float64),
                               rtol=0, atol=4e-3)
    value32.sum().backward()
    w = log_w32.grad
    assert w is not None and torch.isfinite(w).all()
    # w = exp(log w - value), both near 1e4 in float32: each weight is good to ~1 ulp(1e4) ≈ 1e-3
    torch.testing.assert_close(w.sum(0), torch.ones(b), rtol=0, atol=2e-3)
    assert float(w[0, 1]) == pytest.approx(1.0)
    with torch.no_grad():  # the naive formula overflows in float32: why logsumexp is needed
        naive = torch.log(torch.exp(log_w32).mean(0))
    assert not torch.isfinite(naive).all()


# --- cache integrity ------------------------------------------------------------------------------


def _same(a: MapaPosterior, b: MapaPosterior) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("log_q", "index", "log_rest"))


def test_cache_key_covers_rho_kernel_and_shape(tmp_path):
    x = (torch.rand(120, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) < 0.4)
    x = x.double()
    first, hit = cached_posterior(x, BernoulliKernel(0.9), tmp_path, top_k=20)
    assert not hit
    for data, kernel in [
        (x, BernoulliKernel(0.8)),  # ρ
        (x, GaussianKernel(0.01)),  # another kernel on the same bytes
        (x.reshape(60, 12), BernoulliKernel(0.9)),  # same bytes, another shape
    ]:
        _, hit = cached_posterior(data, kernel, tmp_path, top_k=20)
        assert not hit
    again, hit = cached_posterior(x, BernoulliKernel(0.9), tmp_path, top_k=20)
    assert hit and _same(again, first)
    assert len(list(tmp_path.glob("posterior-*.npz"))) == 4


def _rewrite_npz(path: Path, **arrays) -> None:
    with np.load(path, allow_pickle=False) as f:
        content = {name: f[name] for name in f.files}
    content.update(arrays)
    with path.open("wb") as fh:
        np.savez(fh, **content)


def test_cache_with_altered_values_but_valid_file_is_rebuilt(circle_data, tmp_path):
    """The zip is intact and the key matches: only the stored digest of the arrays catches it."""
    kernel = GaussianKernel(0.01)
    good, _ = cached_posterior(circle_data, kernel, tmp_path, top_k=30)
    (path,) = tmp_path.glob("posterior-*.npz")
    log_q = good.log_q.numpy().copy()
    log_q[5, 3] += 1e-6
    _rewrite_npz(path, log_q=log_q)
    rebuilt, hit = cached_posterior(circle_data, kernel, tmp_path, top_k=30)
    assert not hit and _same(rebuilt, good)


def test_cache_file_of_another_key_is_not_used(circle_data, tmp_path):
    kernel = GaussianKernel(0.01)
    a, _ = cached_posterior(circle_data, kernel, tmp_path, top_k=30)
    (path_a,) = tmp_path.glob("posterior-*.npz")
    cached_posterior(circle_data[:150], kernel, tmp_path, top_k=30)
    (path_b,) = set(tmp_path.glob("posterior-*.npz")) - {path_a}
    path_a.write_bytes(path_b.read_bytes())  # a valid cache, self-consistent, for other data
    again, hit = cached_posterior(circle_data, kernel, tmp_path, top_k=30)
    assert not hit and _same(again, a)


def test_cache_with_pickled_object_is_refused_without_running_it(circle_data, tmp_path):
    kernel = GaussianKernel(0.01)
    good, _ = cached_posterior(circle_data, kernel, tmp_path, top_k=30)
    (path,) = tmp_path.glob("posterior-*.npz")
    marker = tmp_path / "pwned"
    evil = np.empty(2, dtype=object)
    evil[0] = _Explodes(marker)
    with np.load(path, allow_pickle=False) as f:
        content = {name: f[name] for name in f.files}
    content["log_q"] = evil
    with path.open("wb") as fh:
        np.savez(fh, **content)  # the object array is pickled into the file
    rebuilt, hit = cached_posterior(circle_data, kernel, tmp_path, top_k=30)
    assert not hit and _same(rebuilt, good)
    assert not marker.exists()


CACHE_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import numpy as np
    import torch
    import mapa_vae.inference.cache as posterior
    from mapa_vae.kernels import GaussianKernel
    from mapa_vae.storage import array_digest

    real = posterior.compute_posterior

    def slow_compute(*args, **kwargs):  # whoever computes holds the lock a good while
        time.sleep(1.5)
        return real(*args, **kwargs)

    posterior.compute_posterior = slow_compute
    go = Path(sys.argv[2])
    Path(sys.argv[3]).touch()  # ready
    while not go.exists():
        time.sleep(0.005)
    x = torch.from_numpy(np.load(sys.argv[4], allow_pickle=False))
    post, hit = posterior.cached_posterior(x, GaussianKernel(0.01), sys.argv[1], top_k=64)
    print(json.dumps({"hit": hit, "digest": array_digest(post.log_q, post.index, post.log_rest)}))
""")


@pytest.mark.slow
def test_four_processes_build_one_cache_once(tmp_path):
    """Started together on the same data: exactly one computes, all read identical arrays."""
    x = np.random.default_rng(0).normal(size=(1500, 2))
    np.save(tmp_path / "x.npy", x)
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CACHE_SCRIPT, str(cache), str(go),
                               str(tmp_path / f"ready{i}"), str(tmp_path / "x.npy")],
                              env=_env(), stdout=subprocess.PIPE, text=True) for i in range(4)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(4)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.01)
        go.touch()
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * 4
    results = [json.loads(o.strip().splitlines()[-1]) for o in outputs]
    assert sorted(r["hit"] for r in results) == [False, True, True, True]
    assert len({r["digest"] for r in results}) == 1
    assert len(list(cache.glob("posterior-*.npz"))) == 1
    assert not _temp_files(cache)
    # and the same arrays as computing it here
    post, hit = cached_posterior(torch.from_numpy(x), GaussianKernel(0.01), cache, top_k=64)
    assert hit
    assert storage.array_digest(post.log_q, post.index, post.log_rest) == results[0]["digest"]


# --- load: a soak test of the sweep runner --------------------------------------------------------


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
    assert not _temp_files(store / "jobs")
