"""The posterior cache (``inference/cache.py``): MAPA's top-K table is computed once per data,
kernel and table shape, and a cached table is used only if it is the one asked for.

- the key covers the data's values, dtype and shape, the kernel and its parameter, K, and the
  engine with its index settings; the same request is a hit with identical arrays;
- a stored digest of the arrays: a cache truncated, flipped, garbled, altered in one value,
  copied from another key or holding a pickled object is rebuilt (the object never runs);
- a write that fails (disk full) leaves no file and no temp file, other caches intact;
- four processes asking at once: one computes, all read identical arrays.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mapa_vae.errors import MapaError
from mapa_vae.inference.cache import cached_posterior
from mapa_vae.inference.posterior import MapaPosterior
from mapa_vae.kernels import BernoulliKernel, GaussianKernel
from mapa_vae.storage import array_digest


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def _same(a: MapaPosterior, b: MapaPosterior) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("log_q", "index", "log_rest"))


# --- the key -----------------------------------------------------------------------------------


def _requests(change: str, x: torch.Tensor) -> tuple[tuple, tuple]:
    """``(data, kernel, K)`` asked first, and the same request with ``change`` made to its key."""
    gaussian, rho = GaussianKernel(0.01), BernoulliKernel(0.9)
    bits = (torch.rand(120, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) < 0.4)
    bits = bits.double()
    changed = x.clone()
    changed[3, 1] += 1e-9
    return {
        "one value": ((x, gaussian, 20), (changed, gaussian, 20)),
        "noise var": ((x, gaussian, 20), (x, GaussianKernel(0.011), 20)),
        "K": ((x, gaussian, 20), (x, gaussian, 21)),
        "dtype": ((x, gaussian, 20), (x.float(), gaussian, 20)),
        "rho": ((bits, rho, 20), (bits, BernoulliKernel(0.8), 20)),
        "kernel on the same bytes": ((bits, rho, 20), (bits, gaussian, 20)),
        "shape of the same bytes": ((bits, rho, 20), (bits.reshape(60, 12), rho, 20)),
    }[change]


KEY_CHANGES = ["one value", "noise var", "K", "dtype", "rho", "kernel on the same bytes",
               "shape of the same bytes"]


@pytest.mark.parametrize("change", KEY_CHANGES)
def test_the_key_covers_every_part_of_the_request(circle_data, tmp_path, change):
    """The same request (even a copy of the data) is a hit with identical arrays; a request with
    one part of the key changed is a miss, cached beside the first; no temp file remains."""
    (data, kernel, k), (other_data, other_kernel, other_k) = _requests(change, circle_data)
    first, hit = cached_posterior(data, kernel, tmp_path, top_k=k)
    assert not hit
    again, hit = cached_posterior(data.clone(), kernel, tmp_path, top_k=k)
    assert hit and _same(first, again)
    _, hit = cached_posterior(other_data, other_kernel, tmp_path, top_k=other_k)
    assert not hit
    again, hit = cached_posterior(data, kernel, tmp_path, top_k=k)
    assert hit and _same(first, again)
    _, hit = cached_posterior(other_data, other_kernel, tmp_path, top_k=other_k)
    assert hit
    assert len(list(tmp_path.glob("posterior-*.npz"))) == 2
    assert not _temp_files(tmp_path), "no temporary files remain"


def test_cache_key_covers_engine_and_index_settings(circle_data, tmp_path):
    kernel = GaussianKernel(0.01)
    exact, hit = cached_posterior(circle_data, kernel, tmp_path, top_k=20)
    assert not hit
    approx, hit = cached_posterior(circle_data, kernel, tmp_path, top_k=20, engine="faiss")
    assert not hit
    again, hit = cached_posterior(circle_data, kernel, tmp_path, top_k=20, engine="faiss")
    assert hit and _same(again, approx) and not _same(approx, exact)
    _, hit = cached_posterior(circle_data, kernel, tmp_path, top_k=20, engine="faiss", tail_samples=8)
    assert not hit
    auto, hit = cached_posterior(circle_data, kernel, tmp_path, top_k=20, engine="auto")
    assert hit and _same(auto, exact)  # auto picks exact at N = 200 and shares its cache
    assert len(list(tmp_path.glob("posterior-*.npz"))) == 3
    with pytest.raises(MapaError, match="takes no index settings"):
        cached_posterior(circle_data, kernel, tmp_path, top_k=20, ef_search=10)  # engine="exact"


# --- damaged, foreign or hostile files ----------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_cache_is_detected_and_rebuilt(circle_data, tmp_path, damage):
    kernel = GaussianKernel(0.01)
    good, _ = cached_posterior(circle_data, kernel, tmp_path, top_k=30)
    (path,) = tmp_path.glob("posterior-*.npz")
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    else:
        raw = bytearray(b"not a zip file")
    path.write_bytes(bytes(raw))
    rebuilt, hit = cached_posterior(circle_data, kernel, tmp_path, top_k=30)
    assert not hit and _same(good, rebuilt)
    _, hit = cached_posterior(circle_data, kernel, tmp_path, top_k=30)
    assert hit


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


def test_cache_with_pickled_object_is_refused_without_running_it(circle_data, tmp_path, pickled_code):
    kernel = GaussianKernel(0.01)
    good, _ = cached_posterior(circle_data, kernel, tmp_path, top_k=30)
    (path,) = tmp_path.glob("posterior-*.npz")
    marker = tmp_path / "pwned"
    evil = np.empty(2, dtype=object)
    evil[0] = pickled_code(marker)
    with np.load(path, allow_pickle=False) as f:
        content = {name: f[name] for name in f.files}
    content["log_q"] = evil
    with path.open("wb") as fh:
        np.savez(fh, **content)  # the object array is pickled into the file
    rebuilt, hit = cached_posterior(circle_data, kernel, tmp_path, top_k=30)
    assert not hit and _same(rebuilt, good)
    assert not marker.exists()


# --- writers: a full disk, four processes at once ------------------------------------------------


def test_failed_cache_write_leaves_no_file_and_other_caches_intact(circle_data, tmp_path, fill_disk):
    kernel = GaussianKernel(0.01)
    first, hit = cached_posterior(circle_data, kernel, tmp_path, top_k=20)
    assert not hit
    fill_disk(4000)
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
def test_four_processes_build_one_cache_once(tmp_path, child_env):
    """Started together on the same data: exactly one computes, all read identical arrays."""
    x = np.random.default_rng(0).normal(size=(1500, 2))
    np.save(tmp_path / "x.npy", x)
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CACHE_SCRIPT, str(cache), str(go),
                               str(tmp_path / f"ready{i}"), str(tmp_path / "x.npy")],
                              env=child_env, stdout=subprocess.PIPE, text=True) for i in range(4)]
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
    assert array_digest(post.log_q, post.index, post.log_rest) == results[0]["digest"]
