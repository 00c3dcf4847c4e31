"""Devices and data-parallel training (torchrun, gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mapa_vae.errors import MapaError
from mapa_vae.storage import load_tensors
from mapa_vae.training.distributed import Parallel, resolve_device

ARGS = ["train", "--data", "circle", "--method", "mapa", "--samples", "0", "--k", "5",
        "--epochs", "3", "--n-train", "200", "--n-val", "100", "--n-test", "100",
        "--eval-every", "1", "--quiet"]


def test_devices_resolve_and_refuse_clearly():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(MapaError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(MapaError, match="unknown device"):
        resolve_device("tpu")


def test_shards_cover_each_global_batch_once():
    index = torch.randperm(103)
    parts = [Parallel(rank=r, world=4).shard(index) for r in range(4)]
    assert torch.equal(torch.cat(parts), index)
    assert Parallel().shard(index) is index


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """MAPA with S = 0 is deterministic, so 2 × 50 points per step must equal 1 × 100; with the
    default R = 3 restarts, vectorized in one process and stepped in turn under torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MAPA_VAE_CACHE": str(tmp_path / "cache")}
    one = [sys.executable, "-m", "mapa_vae.cli", *ARGS, "--out", str(tmp_path / "one")]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mapa_vae.cli", *ARGS, "--out", str(tmp_path / "two")]
    for cmd in (one, two):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-2000:]
    a = load_tensors(tmp_path / "one" / "trained.pt")["model"]
    b = load_tensors(tmp_path / "two" / "trained.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    # both logged the same (summed over processes) training bound, and it rose: real training
    bounds = [[h["train_bound_per_copy"] for h in json.loads((tmp_path / d / "history.json").read_text())]
              for d in ("one", "two")]
    one_copy, two_copies = (torch.tensor(b, dtype=torch.float64) for b in bounds)  # (epochs, R)
    assert one_copy.shape == two_copies.shape == (3, 3)
    torch.testing.assert_close(one_copy, two_copies, rtol=0, atol=1e-4)
    assert bool((one_copy[-1] > one_copy[0]).all())  # every copy trained
