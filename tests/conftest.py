"""Shared fixtures: every test starts from the same seeds; small float64 models and data; a tiny
training run as a config (``tiny_config``) and as ``train`` arguments (``train_args``); files that
attack a loader (``pickled_code``) or a disk that fills up (``fill_disk``); a fresh process
(``run_cli``) and its one-line error (``one_line_error``)."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mapa_vae.config import TrainConfig, flag_name
from mapa_vae.data.groundtruth import ground_truth
from mapa_vae.models.latent import CodeEncoder, Decoder, GaussianEncoder, LatentVariableModel, StandardNormal
from mapa_vae.models.likelihoods import GaussianLikelihood
from mapa_vae.models.networks import MLP


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny networks gain nothing from threads, and lose a lot when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002
    torch.manual_seed(0)


@pytest.fixture
def circle_data() -> torch.Tensor:
    """200 points of the analytic circle (σ² = 0.01), float64."""
    x, _ = ground_truth("circle", surrogate=False).sample(200, torch.Generator().manual_seed(0))
    return x


def _mapa_model(noise_var: float = 0.01, hidden: tuple[int, ...] = (16, 16)) -> LatentVariableModel:
    return LatentVariableModel(
        CodeEncoder(MLP(2, 1, hidden)),
        Decoder(MLP(1, 2, hidden), GaussianLikelihood(noise_var)),
        StandardNormal(1),
    ).double()


def _vae_model(noise_var: float = 0.01, hidden: tuple[int, ...] = (16, 16)) -> LatentVariableModel:
    return LatentVariableModel(
        GaussianEncoder(MLP(2, 2, hidden)),
        Decoder(MLP(1, 2, hidden), GaussianLikelihood(noise_var)),
        StandardNormal(1),
    ).double()


@pytest.fixture
def mapa_model() -> LatentVariableModel:
    """A small float64 MAPA model (deterministic encoder) for 2-D data, σ² = 0.01."""
    return _mapa_model()


@pytest.fixture
def vae_model() -> LatentVariableModel:
    """A small float64 VAE model (Gaussian encoder) for 2-D data, σ² = 0.01."""
    return _vae_model()


# --- a tiny training run ----------------------------------------------------------------------

TINY_RUN: dict[str, Any] = {
    "data": "circle", "method": "mapa", "hidden": (8,), "samples": 5, "k": 1, "epochs": 4,
    "batch_size": 100, "lr": 1e-3, "seed": 0, "restarts": 1, "threads": 1, "dtype": "float32",
    "n_train": 100, "n_val": 50, "n_test": 100, "eval_every": 2, "val_grid": 2**9,
    "test_grid": 2**10, "prior_steps": 30,
}
"""Every knob of a run that takes a second or two (no default a later change could move)."""


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., TrainConfig]:
    """``tiny_config(**overrides)``: :data:`TINY_RUN` as a ``TrainConfig``, its posterior cache
    under ``tmp_path / "cache"``."""
    def make(**overrides: Any) -> TrainConfig:
        return TrainConfig(**{**TINY_RUN, "cache_dir": str(tmp_path / "cache"), **overrides})
    return make


@pytest.fixture
def train_args(tmp_path: Path) -> Callable[..., list[str]]:
    """``train_args(out, *extra, **overrides)``: ``mapa-vae train`` arguments for :data:`TINY_RUN`
    into ``out`` (quiet, cache under ``tmp_path / "cache"``); an override of None leaves its flag
    out (the CLI's default), ``extra`` goes last."""
    def make(out: Path, *extra: str, **overrides: Any) -> list[str]:
        argv = ["train"]
        for name, value in {**TINY_RUN, "cache_dir": str(tmp_path / "cache"), **overrides}.items():
            if value is not None:
                values = value if isinstance(value, tuple) else (value,)
                argv += [flag_name(name), *(str(v) for v in values)]
        return [*argv, "--out", str(out), "--quiet", *extra]
    return make


# --- hostile files, full disks, fresh processes -----------------------------------------------


class PickledCode:
    """Unpickling this creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture
def pickled_code() -> type[PickledCode]:
    """``pickled_code(marker)``: an object whose unpickling touches ``marker``."""
    return PickledCode


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


def arm_once(monkeypatch: pytest.MonkeyPatch, name: str, make: Callable[..., Any]) -> None:
    """Replace ``os.<name>`` for its next call only (the one inside ``atomic_write``) by
    ``make(real, *args, **kwargs)``."""
    real = getattr(os, name)
    state = {"armed": True}

    def once(*args, **kwargs):
        if state["armed"]:
            state["armed"] = False
            return make(real, *args, **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, once)


@pytest.fixture
def fill_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """``fill_disk(limit)``: the next file opened by ``os.fdopen`` (``atomic_write``'s temp file)
    takes ``limit`` bytes, then fails with ENOSPC."""
    def arm(limit: int) -> None:
        arm_once(monkeypatch, "fdopen", lambda real, *a, **k: _DiskFull(real(*a, **k), limit))
    return arm


def one_thread_env() -> dict[str, str]:
    """The environment for a child process: one BLAS / OpenMP thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_cli(*args, timeout=120)``: ``mapa-vae ARGS`` in a fresh Python process in
    ``tmp_path``, one thread."""
    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mapa_vae.cli", *args], cwd=tmp_path,
                              env=one_thread_env(), capture_output=True, text=True, timeout=timeout,
                              check=False)
    return run


@pytest.fixture
def one_line_error() -> Callable[[str], str]:
    """``one_line_error(stderr)``: ``stderr`` after checking it is one ``mapa-vae: error:`` line
    and no traceback."""
    def check(stderr: str) -> str:
        assert "Traceback" not in stderr, stderr
        assert stderr.startswith("mapa-vae: error: ") and stderr.count("\n") == 1, stderr
        return stderr
    return check


@pytest.fixture
def child_env() -> dict[str, str]:
    """:func:`one_thread_env` for tests that start their own child processes."""
    return one_thread_env()


@pytest.fixture
def strict_json() -> Callable[[Path], Any]:
    """``strict_json(path)``: the file parsed as strict JSON (NaN and Infinity refused, as a
    strict parser would)."""
    def load(path: Path) -> Any:
        def refuse(name: str):
            raise ValueError(f"{path}: non-standard JSON constant {name}")
        return json.loads(path.read_text(), parse_constant=refuse)
    return load


@pytest.fixture
def arm_os(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, Callable[..., Any]], None]:
    """``arm_os(name, make)``: the next call of ``os.<name>`` is ``make(real, *args, **kwargs)``."""
    return lambda name, make: arm_once(monkeypatch, name, make)
