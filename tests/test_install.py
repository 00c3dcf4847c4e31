"""A real install: build the wheel, install it (not editable) into a fresh virtual environment,
and train on a built-in curve from it, with no surrogate refit and no write into the package.

The fresh environment reuses this one's dependencies (torch, numpy, …) through a ``.pth`` line,
so nothing is downloaded; the package itself comes only from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime (ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_wheel_installs_and_trains_without_refit(tmp_path):
    # Build from a copy of the sources, so the checkout gets no build/ or egg-info folder.
    src = tmp_path / "src-copy"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=ignore)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(wheels)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("mapa_vae-*.whl")

    # A fresh environment without the editable checkout; dependencies from this one, appended
    # after its own site-packages so the wheel's copy of mapa_vae is the one imported.
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.run([str(python), "-c", purelib], check=True, capture_output=True,
                               text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True)
    package = site / "mapa_vae"
    assert sorted(p.name for p in (package / "data" / "surrogates").glob("*.pt")) == [
        "absolute-value.pt", "circle.pt", "clusters.pt", "figure-8.pt", "spiral-dots.pt"]
    where = subprocess.run([str(python), "-c", "import mapa_vae; print(mapa_vae.__file__)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path).stdout.strip()
    assert Path(where).parent == package  # the installed copy, not the checkout

    before = _snapshot(package)
    env = {**os.environ, "MAPA_VAE_CACHE": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    run = subprocess.run(
        [str(env_dir / "bin" / "mapa-vae"), "train", "--data", "circle", "--method", "mapa",
         "--epochs", "1", "--n-train", "100", "--n-val", "50", "--n-test", "100", "--samples", "10",
         "--hidden", "8", "--test-grid", "256", "--val-grid", "64", "--prior-steps", "10",
         "--out", str(tmp_path / "run"), "--quiet"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    seconds = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["data"] == "circle"
    assert _snapshot(package) == before  # no surrogate refit stored, nothing else written there
    # A refit takes 6 000 full-batch steps (minutes); one epoch on 100 points takes seconds.
    assert seconds < 60, f"train took {seconds:.0f} s: was a surrogate refitted?"
