"""Files: the tool never runs code from a file it loads, and never loses one it writes.

- safe loading: pickled code in a model or checkpoint is refused and never runs, from the API
  and the CLI; no loader in the package can unpickle (a grep whose patterns are themselves
  tested);
- atomic writes: a write that fails (disk full, fsync, rename, an exception midway) or is
  SIGKILLed leaves the previous file, which loads, and no temp file past its age;
- write errors in the CLI are one line naming the file.

The posterior cache's integrity is in ``test_cache.py``, resume in ``test_resume.py``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import mapa_vae
import mapa_vae.storage as storage
from mapa_vae.cli import main
from mapa_vae.errors import MapaError
from mapa_vae.storage import (
    TEMP_SUFFIX,
    atomic_write,
    load_tensors,
    remove_stale_temps,
    save_tensors,
    write_json,
)

SRC = Path(mapa_vae.__file__).parent
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX) + "$")


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# --- safe loading ---------------------------------------------------------------------------------


def _write_malicious(path: Path, bomb: object, how: str) -> None:
    """A checkpoint-shaped file whose unpickling runs ``bomb``'s code."""
    payload = {"model": {"weight": bomb}, "epoch": 3}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))


def test_the_malicious_payload_really_runs_code(tmp_path, pickled_code):
    """The sentinel works: unpickling the payload without protection creates the marker."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(pickled_code(marker)))
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("name", ["model.pt", "checkpoint.pt"])
def test_load_tensors_refuses_pickled_code(tmp_path, pickled_code, how, name):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    _write_malicious(path, pickled_code(marker), how)
    with pytest.raises(MapaError) as info:
        load_tensors(path)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message
    assert str(path) in message and "refused" in message
    assert "weights_only=False" not in message  # never advise the unsafe way
    assert not marker.exists()


def test_no_fallback_to_unsafe_loading(tmp_path, monkeypatch, pickled_code):
    """Every torch.load call is weights-only, for good, malicious and corrupt files alike."""
    calls: list[dict] = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    marker = tmp_path / "pwned"
    save_tensors(tmp_path / "good.pt", {"w": torch.ones(3)})
    _write_malicious(tmp_path / "bad.pt", pickled_code(marker), "torch.save")
    (tmp_path / "torn.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:100])
    assert torch.equal(load_tensors(tmp_path / "good.pt")["w"], torch.ones(3))
    for name in ("bad.pt", "torn.pt"):
        with pytest.raises(MapaError):
            load_tensors(tmp_path / name)
    assert len(calls) == 3
    assert all(kw.get("weights_only") is True for kw in calls)
    assert not marker.exists()


def _hand_made_run(run: Path, cfg) -> None:
    """A run directory with ``cfg`` as a valid config.json (no training needed)."""
    run.mkdir()
    write_json(run / "config.json", {**dataclasses.asdict(cfg), "data_dim": 2,
                                     "likelihood_config": {"name": "gaussian", "noise_var": 0.01}})


@pytest.mark.slow
def test_cli_refuses_malicious_model_and_checkpoint(tmp_path, tiny_config, train_args, run_cli,
                                                   one_line_error, pickled_code):
    """``sample`` and ``train --resume`` in a fresh process: one line, exit 2, nothing runs."""
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    _hand_made_run(run, tiny_config(method="vae", samples=10, epochs=2))
    _write_malicious(run / "model.pt", pickled_code(marker), "pickle")  # plain pickle: torch warns
    _write_malicious(run / "checkpoint.pt", pickled_code(marker), "torch.save")
    out = tmp_path / "samples.npy"
    res = run_cli("sample", str(run), "--n", "5", "--out", str(out))
    assert res.returncode == 2, res.stderr
    assert str(run / "model.pt") in one_line_error(res.stderr)
    assert res.stdout == "" and not out.exists()
    res = run_cli(*train_args(run, "--resume", method="vae", samples=10, epochs=2))
    assert res.returncode == 2, res.stderr
    assert str(run / "checkpoint.pt") in one_line_error(res.stderr)
    res = run_cli(*train_args(tmp_path / "fresh", "--resume", method="vae", samples=10, epochs=2))
    assert res.returncode == 2, res.stderr
    assert "no checkpoint" in one_line_error(res.stderr)
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


def _fail(real, *args, **kwargs):
    raise OSError(errno.EIO, "injected I/O error")


FAILURES = ["disk-full-mid-write", "fsync", "rename"]

WRITERS = {
    "save_tensors": (lambda p, v: save_tensors(p, {"w": torch.full((5000,), float(v))}),
                     lambda p: float(load_tensors(p)["w"][0])),
    "write_json": (lambda p, v: write_json(p, {"v": v, "pad": "x" * 5000}),
                   lambda p: json.loads(p.read_text())["v"]),
}


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("writer", list(WRITERS))
def test_failed_write_keeps_previous_file(tmp_path, fill_disk, arm_os, failure, writer):
    write, read = WRITERS[writer]
    path = tmp_path / "checkpoint.pt"
    write(path, 1)
    before = path.read_bytes()
    if failure == "disk-full-mid-write":
        fill_disk(1000)
    else:
        arm_os({"fsync": "fsync", "rename": "replace"}[failure], _fail)
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


def test_cli_write_errors_are_one_line(tmp_path, fill_disk, one_line_error, capsys):
    """An output path that cannot be written (exit 2) or a disk that fills up (exit 1)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["data", "circle", "--n", "50", "--out", str(blocker / "x.npy")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "--out" in line and str(blocker / "x.npy") in line  # the flag and the path it names
    assert f"lies under the file {blocker}" in line  # and why it cannot be written
    fill_disk(1000)
    assert main(["data", "circle", "--n", "2000", "--out", str(tmp_path / "x.npy")]) == 1
    assert "No space left on device" in one_line_error(capsys.readouterr().err)
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
def test_sigkill_during_writes_leaves_a_file_that_loads(tmp_path, child_env):
    """A writer killed at random moments: the target always loads, complete and consistent.

    A kill inside the write window may leave the writer's hidden temp file; nothing reads it,
    and the next write in the folder deletes it once it is ``STALE_TEMP_SECONDS`` old.
    """
    path = tmp_path / "state.pt"
    rng = random.Random(0)
    last = -1
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(path), str(last + 1)],
                                env=child_env)
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


# --- numerical guards ---------------------------------------------------------------------------


# --- cache integrity ------------------------------------------------------------------------------


# --- load: a soak test of the sweep runner --------------------------------------------------------
