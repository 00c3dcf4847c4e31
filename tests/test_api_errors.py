"""The Python API's edges: what a config, a data set or a size refuses (one-line MapaError) or
takes, before any work; fresh points; a Ctrl-C while the package imports; ``--help``."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mapa_vae import METHODS, MapaError, TrainConfig, load_dataset, train
from mapa_vae.cli import build_parser
from mapa_vae.data.dataset import data_generator, fresh_points, make_ground_truth_data
from mapa_vae.data.export import data_points
from mapa_vae.data.files import load_array, parse_number
from mapa_vae.data.memory import check_memory


def test_seeds_of_any_size_or_one_line():
    with pytest.raises(MapaError, match=r"seed \(--seed\) must be at least 0, got -1"):
        TrainConfig(seed=-1)
    with pytest.raises(MapaError, match=r"data_seed \(--data-seed\)"):
        TrainConfig(data_seed=-3)
    assert TrainConfig(seed=2**70, data_seed=2**70).seed == 2**70
    a = load_dataset("circle", 5, 5, 5, seed=2**70)
    b = load_dataset("circle", 5, 5, 5, seed=2**70)
    assert torch.equal(a.train, b.train)
    assert not torch.equal(a.train, load_dataset("circle", 5, 5, 5, seed=2**70 + 1).train)


def test_small_data_seeds_draw_what_they_always_drew():
    """Below 2**64 a data seed seeds torch as it is: every earlier run's data is unchanged."""
    for seed in (0, 7, 2**63 + 5):
        assert torch.equal(torch.rand(4, generator=data_generator(seed)),
                           torch.rand(4, generator=torch.Generator().manual_seed(seed)))


def test_what_a_run_writes_is_checked_before_it_trains(tmp_path):
    with pytest.raises(MapaError, match="extra: must hold only JSON values"):
        train(TrainConfig(data="circle", epochs=1, extra={"f": object()}), tmp_path / "run",
              progress=False)
    assert not (tmp_path / "run").exists()
    assert TrainConfig(extra={"note": "ok", "n": [1, 2.5]}).extra["n"] == [1, 2.5]


def test_a_path_names_a_file():
    assert TrainConfig(data=Path("points.npy")).data == "points.npy"  # type: ignore[arg-type]
    with pytest.raises(MapaError, match=r"data \(--data\) is empty"):
        TrainConfig(data="")


def test_knobs_that_would_be_ignored_or_useless_are_refused():
    with pytest.raises(MapaError, match=r"--image-shape.*--network mlp"):
        TrainConfig(image_shape=(1, 1, 2))
    assert TrainConfig(image_shape=(1, 1, 2), network="conv").image_shape == (1, 1, 2)
    with pytest.raises(MapaError, match=r"--noise-var.*1e-10 in float32"):
        TrainConfig(noise_var=1e-30)
    assert TrainConfig(noise_var=1e-20, dtype="float64").noise_var == 1e-20


def _file(tmp_path: Path, rows: int) -> Path:
    path = tmp_path / "points.npy"
    np.save(path, np.random.default_rng(0).normal(size=(rows, 2)))
    return path


def test_split_sizes_take_a_subset_of_a_file_or_are_refused(tmp_path):
    path = _file(tmp_path, 200)
    full = load_dataset(str(path))
    assert (full.train.shape[0], full.val.shape[0], full.test.shape[0]) == (160, 20, 20)
    part = load_dataset(str(path), n_train=100, n_test=5)
    assert (part.train.shape[0], part.val.shape[0], part.test.shape[0]) == (100, 20, 5)
    rows = {tuple(r) for r in full.train.tolist()}
    assert all(tuple(r) in rows for r in part.train.tolist())  # a subset of the training split
    with pytest.raises(MapaError, match=r"--n-train 5000: .*points.npy.* only 160 train rows"):
        load_dataset(str(path), n_train=5000)


def test_split_sizes_on_a_fixed_split(tmp_path):
    digits = load_dataset("digits-binary", n_val=50)
    assert digits.val.shape[0] == 50 and digits.train.shape[0] == 1197
    with pytest.raises(MapaError, match="--n-train 5000: digits-binary has only 1197 train rows"):
        load_dataset("digits-binary", n_train=5000)
    rows = np.packbits(np.eye(6, 784, dtype=np.uint8), axis=1)
    npz = tmp_path / "m.npz"
    np.savez(npz, train=rows, valid=rows[:3], test=rows[:2])
    assert load_dataset(str(npz), n_train=4).train.shape == (4, 784)
    with pytest.raises(MapaError, match=r"--n-test 9: .*m.npz has only 2 test rows"):
        load_dataset(str(npz), n_test=9)


def test_sizes_that_cannot_fit_are_refused_before_allocating():
    with pytest.raises(MapaError, match=r"--n-train 1000000000000 \(circle\) needs about"):
        load_dataset("circle", n_train=10**12)
    with pytest.raises(MapaError, match="more than the"):
        check_memory(2**70, "--n")


def test_fresh_points_are_no_split_of_any_run():
    """`mapa-vae data NAME` scores a model on points it never saw: none is a row of the splits
    `train --data NAME` draws, for any data seed; a split written by `data --split` is that one."""
    x, z = fresh_points("circle", 500, seed=0)
    assert x.shape == (500, 2) and z.shape == (500, 1)
    assert torch.equal(x, fresh_points("circle", 500, seed=0)[0])
    for data_seed in (0, 1):
        ds = make_ground_truth_data("circle", seed=data_seed)
        seen = torch.cat([ds.train, ds.val, ds.test])
        assert torch.cdist(x, seen).min() > 0
    test, _, what = data_points("circle", "test", None, 3)
    assert torch.equal(test, load_dataset("circle", seed=3).test) and "test split" in what


def test_csv_numbers_are_read_strictly(tmp_path):
    assert parse_number(" -1.5e2 ") == -150.0 and parse_number("+.5") == 0.5
    assert math.isnan(parse_number("NaN"))
    for cell in ("12_0", "１", "0x10", "1,5", "", "--1"):
        with pytest.raises(ValueError):
            parse_number(cell)
    path = tmp_path / "d.csv"
    path.write_text("1,2\n0x10,5\n")
    with pytest.raises(MapaError, match="hexadecimal") as e:
        load_array(path)
    assert "decimal comma" not in str(e.value)


def test_help_names_every_method():
    text = build_parser().format_help()
    for name in METHODS:
        assert name in text


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT")
def test_ctrl_c_while_importing_is_one_line(tmp_path):
    """SIGINT just after the interpreter is up, while torch and the package import (seconds):
    one line, status 130 (the shell's for Ctrl-C), no traceback. The child starts the command as
    ``python -m mapa_vae`` does (runpy), once it has said it is up."""
    argv = ["mapa-vae", "data", "circle", "--n", "5", "--out", str(tmp_path / "x.npy")]
    code = (f"import runpy, sys; sys.argv = {argv!r}; print('up', file=sys.stderr, flush=True); "
            "runpy.run_module('mapa_vae', run_name='__main__', alter_sys=True)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stderr is not None and p.stderr.readline() == "up\n"
    start = time.perf_counter()
    time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip(f"the command finished within {time.perf_counter() - start:.2f} s, before the signal")
    assert err.splitlines() == ["mapa-vae: interrupted while starting"], err
    assert p.returncode == 130 and out == ""
    assert not (tmp_path / "x.npy").exists()


def test_train_refuses_resume_with_overwrite_before_any_work(tmp_path):
    """The Python API keeps the command line's rule: the two flags contradict each other, and the
    run folder is not created."""
    cfg = TrainConfig(data="circle", method="vae", epochs=1, restarts=1, n_train=100, n_val=20,
                      n_test=20, hidden=(8,), threads=1)
    with pytest.raises(MapaError, match="--resume and --overwrite contradict"):
        train(cfg, tmp_path / "run", progress=False, resume=True, overwrite=True)
    assert not (tmp_path / "run").exists()
