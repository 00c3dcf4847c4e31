"""CONTRIBUTING.md's checklists, followed as a contributor would.

The package is copied, and exactly the edits CONTRIBUTING.md shows (its code blocks marked
``file:``) are made to the copy: a β-VAE method module, its knob with its old-run value, a
Laplace likelihood and its kernel. Then, in a fresh interpreter on the copy, each new part
trains for two epochs through the command line, an older run folder (written before the knob
existed) still loads, and the property tests pick the new entries up from the registries. If
any other file had needed an edit, one of these would fail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mapa_vae.config import ADDED_LATER, TrainConfig
from mapa_vae.training.checkpoint import config_json

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "CONTRIBUTING.md"
BLOCK = re.compile(r"<!-- file: (\S+) \((.+?)\) -->\s*```python\n(.*?)```", re.DOTALL)

OLDEST_CONFIG = {
    "data": "circle", "method": "vae", "samples": 100, "k": None, "epochs": 3, "batch_size": 100,
    "lr": 0.001, "seed": 0, "data_seed": 0, "n_train": 120, "n_val": 60, "n_test": 120,
    "likelihood": None, "noise_var": None, "rho": 0.9, "latent_dim": 1, "hidden": [50, 50, 50],
    "activation": "tanh", "network": "mlp", "channels": [32, 64], "image_shape": None,
    "posterior": "kernel", "posterior_engine": "auto", "top_k": None, "estimator": "naive",
    "layers": [200], "sbn_hidden": None, "tail": "per-point", "batching": "random", "gp_layers": 1,
    "inducing": 32, "learn_noise": False, "eval_every": 10, "val_grid": 4096, "test_grid": 65536,
    "prior_fit": "map", "prior_steps": 4000, "code_prior": "flow", "code_prior_steps": 2000,
    "prior_components": 10, "flow_transforms": 3, "flow_hidden": [64, 64], "cache_dir": None,
    "device": "cpu", "threads": 1, "extra": {},
}
"""A ``config.json`` as runs wrote it before the knobs of ``ADDED_LATER`` existed: the oldest
stored config this package still reads. Every knob missing from it must declare ``old=``."""


def test_every_later_knob_declares_its_old_value():
    later = {f.name for f in dataclasses.fields(TrainConfig)} - set(OLDEST_CONFIG)
    missing = sorted(later - set(ADDED_LATER))
    assert not missing, (f"knobs added later without their old-run value: {missing}; declare "
                         "knob(default, help, ..., old=VALUE) (CONTRIBUTING.md, 'Add a knob')")
    cfg = TrainConfig.from_dict(OLDEST_CONFIG)
    assert all(getattr(cfg, k) == v for k, v in ADDED_LATER.items())  # read at the old values
    stored = json.loads(config_json(cfg))
    assert not set(ADDED_LATER) & set(stored)  # so it matches what the old model files hold


def test_the_guide_shows_every_edit_it_asks_for():
    blocks = {(path, where) for path, where, _ in BLOCK.findall(GUIDE.read_text())}
    assert blocks == {
        ("src/mapa_vae/methods/beta_vae.py", "new"),
        ("src/mapa_vae/config.py", 'before the line starting "    extra: dict[str, Any] = knob("'),
        ("src/mapa_vae/models/likelihoods.py", "append"),
        ("src/mapa_vae/models/likelihoods.py", 'replace the line starting "from ..kernels import"'),
        ("src/mapa_vae/kernels.py", "append"),
    }


def follow_the_guide(tree: Path) -> None:
    """Copy the package and its tests to ``tree`` and make exactly CONTRIBUTING.md's edits."""
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (tree / "tests").mkdir()
    for name in ("conftest.py", "test_models.py", "test_objectives.py"):
        shutil.copy(ROOT / "tests" / name, tree / "tests" / name)
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    for path, where, code in BLOCK.findall(GUIDE.read_text()):
        target = tree / path
        if where == "new":
            assert not target.exists(), f"{path} exists already"
            target.write_text(code)
        elif where == "append":
            target.write_text(target.read_text() + "\n\n" + code)
        else:
            how = re.fullmatch(r'(before|replace) the line starting "(.+)"', where)
            assert how, where
            text = target.read_text()
            at = text.index("\n" + how.group(2)) + 1
            end = text.index("\n", at) + 1 if how.group(1) == "replace" else at
            target.write_text(text[:at] + code + text[end:])


DRIVER = r"""
import contextlib, io, json, sys
from pathlib import Path
from mapa_vae.cli import main
from mapa_vae.storage import load_tensors, save_tensors
from mapa_vae.training.runs import load_run

out = Path(sys.argv[1])
tiny = ["--data", "circle", "--epochs", "2", "--n-train", "120", "--n-val", "60", "--n-test", "120",
        "--hidden", "8", "--test-grid", "1024", "--val-grid", "1024", "--eval-every", "1",
        "--prior-steps", "20", "--quiet"]


def train(name, *flags):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["train", *tiny, *flags, "--out", str(out / name)])
    return {"rc": rc, "metrics": json.loads(stdout.getvalue()) if rc == 0 else None,
            "stderr": stderr.getvalue()}


runs = {
    "beta": train("beta", "--method", "beta-vae", "--beta", "0.5", "--restarts", "2"),
    "old": train("old", "--method", "vae", "--restarts", "1"),
    "laplace-mapa": train("laplace-mapa", "--method", "mapa", "--likelihood", "laplace",
                          "--samples", "10", "--restarts", "1"),
    "laplace-vae": train("laplace-vae", "--method", "vae", "--likelihood", "laplace",
                         "--restarts", "1"),
}
# a run folder as written before the knob existed: no "beta" in config.json nor in the config
# its model file is tied to
config = json.loads((out / "old" / "config.json").read_text())
del config["beta"]
(out / "old" / "config.json").write_text(json.dumps(config))
saved = load_tensors(out / "old" / "model.pt")
tied = json.loads(saved["config"])
tied.pop("beta", None)
saved["config"] = json.dumps(tied, sort_keys=True, default=str)
save_tensors(out / "old" / "model.pt", saved)
run = load_run(out / "old")
runs["old-loads"] = {"rc": 0, "beta": run.config.beta, "dim": run.data_dim}
print(json.dumps(runs))
"""


@pytest.mark.slow
def test_a_method_with_a_knob_and_a_likelihood_need_only_the_guides_edits(tmp_path):
    tree = tmp_path / "tree"
    follow_the_guide(tree)
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "MAPA_VAE_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "runs")], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.splitlines()[-1])
    for name, r in runs.items():
        assert r["rc"] == 0, (name, r.get("stderr", "")[-2000:])
    beta = runs["beta"]["metrics"]
    assert beta["method"] == "beta-vae" and beta["restarts"] == 2
    assert beta["restart_engine"] == "vectorized"  # BetaELBO.batched: the copies train as one
    assert "one after another" not in runs["beta"]["stderr"]
    assert runs["old-loads"]["beta"] == 1.0  # read at its declared old value
    for name in ("laplace-mapa", "laplace-vae"):
        m = runs[name]["metrics"]
        assert m["test_log_lik"] is not None and m["test_log_lik"] > -1e3, (name, m)

    # the property tests run the new entries, found in the registries
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
         "tests/test_models.py", "tests/test_objectives.py", "-k", "laplace or beta"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    assert tests.returncode == 0, tests.stdout[-3000:]
    ran = set(re.findall(r"PASSED tests/(\S+)", tests.stdout))
    assert any("laplace" in t and "test_pairwise_log_prob" in t for t in ran), ran
    assert any("laplace" in t and "test_settings_round_trip" in t for t in ran), ran
    assert any("beta-vae" in t and "test_every_method_objective" in t for t in ran), ran
