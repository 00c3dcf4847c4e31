"""Every benchmark script runs: ``benchmarks/*.py --tiny --json PATH`` as a subprocess, each in
seconds, writing strict, non-empty JSON with the harness's machine description.

The scripts are found by glob, so a new benchmark is covered the day it is added; a script that
does not take ``--tiny`` yet is an expected failure naming why (its owner adds the flag).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "harness.py")
SECONDS = 120  # a --tiny run takes seconds; this only stops a hung one


def _strict(text: str) -> Any:
    """Parse ``text`` refusing NaN and infinities (which ``json.loads`` accepts by default)."""
    def refuse(token: str) -> float:
        raise ValueError(f"non-finite number {token} in the JSON")
    return json.loads(text, parse_constant=refuse)


def _has_tiny(script: Path) -> bool:
    return "--tiny" in script.read_text() or "from harness import" in script.read_text()


def test_there_are_benchmarks() -> None:
    assert {"passes.py", "posterior.py", "sbn.py", "vae_dgp.py", "learned_proposal.py",
            "whole_train.py", "prior_fit.py"} <= {
        p.name for p in SCRIPTS}


@pytest.mark.slow
@pytest.mark.parametrize("script", [
    pytest.param(s, id=s.stem, marks=() if _has_tiny(s) else pytest.mark.xfail(
        reason=f"{s.name} does not take --tiny yet (its owner adds it)", strict=True))
    for s in SCRIPTS])
def test_benchmark_runs_tiny(script: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    env = {**os.environ, "MAPA_VAE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), "--tiny", "--json", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=SECONDS)
    assert done.returncode == 0, f"{script.name} failed:\n{done.stderr[-3000:]}"
    data = _strict(out.read_text())
    assert data, f"{script.name} wrote empty JSON"
    if isinstance(data, dict) and "records" in data:  # the harness's layout
        assert data["records"], f"{script.name} wrote no records"
        machine = data["machine"]
        assert machine["cores"] >= 1 and machine["torch_threads"] >= 1 and machine["cpu"]
        assert all(math.isfinite(v) for v in machine["load_average"])
