"""The sweep runner and the one-command reproduction (tiny profile, end to end)."""

from __future__ import annotations

import json

import pytest
import torch

from mapa_vae.data.dataset import make_ground_truth_data
from mapa_vae.experiments.reproduce import measure_passes, posterior_kl, reproduce, select_best, summarize
from mapa_vae.experiments.sweep import PROFILES, VARIANTS, Job, Profile, make_jobs, run_jobs
from mapa_vae.inference.exact import compute_posterior
from mapa_vae.inference.posterior import uniform_posterior
from mapa_vae.kernels import GaussianKernel

TINY = PROFILES["tiny"]


def test_jobs_cover_the_protocol_once():
    jobs = make_jobs(PROFILES["paper"])
    per_cell = len(PROFILES["paper"].datasets) * PROFILES["paper"].draws  # R restarts in one job
    s_variants = sum(VARIANTS[v].uses_samples for v in PROFILES["paper"].variants)
    s_free = len(PROFILES["paper"].variants) - s_variants
    assert len(jobs) == per_cell * (s_free + s_variants * len(PROFILES["paper"].samples))
    assert {j.restarts for j in jobs} == {PROFILES["paper"].restarts}
    assert len({j.key for j in jobs}) == len(jobs)  # distinct configs, distinct keys
    job = next(j for j in jobs if j.variant == "mapa-k90" and j.samples == 50)
    cfg = job.config()
    assert (cfg.method, cfg.k, cfg.samples, cfg.posterior) == ("mapa", 45, 50, "kernel")
    assert cfg.epochs == 500 and cfg.n_train == 1000
    assert (cfg.seed, cfg.restarts) == (0, PROFILES["paper"].restarts)


def test_selection_takes_the_best_validation_restart():
    def rec(restart, val, kl):
        return {"status": "done", "key": str(restart),
                "job": {"data": "circle", "draw": 0, "variant": "vae", "samples": 1, "restart": restart},
                "metrics": {"val_log_lik": val, "test_kl": kl}}

    records = [rec(0, -1.0, 0.5), rec(1, -0.5, 0.9), rec(2, -2.0, 0.1),
               {"status": "failed", "job": {}, "key": "x"}]
    best = select_best(records)
    assert best[("circle", 0, "vae", 1)]["metrics"]["test_kl"] == 0.9  # by validation, not test
    assert summarize(best)[("circle", "vae", 1)] == {"mean": 0.9, "std": 0.0, "n": 1}


def test_posterior_kl_is_zero_for_itself_and_positive_for_uniform(circle_data):
    post = compute_posterior(circle_data, GaussianKernel(0.01))
    assert abs(posterior_kl(post, post)) < 1e-12
    assert posterior_kl(post, uniform_posterior(circle_data.shape[0])) > 1.0


def test_sweep_reports_failures_and_keeps_going(tmp_path):
    """One job that cannot run (k + S > N - 1) is recorded with its error; the rest finish."""
    prof = Profile("t", ("circle",), (10, 200), restarts=1, draws=1, variants=("vae", "mapa-k10"),
                   train=TINY.train)
    jobs = make_jobs(prof)
    records = run_jobs(jobs, tmp_path, cache_dir=str(tmp_path / "cache"), progress=False)
    status = {(r["job"]["variant"], r["job"]["samples"]): r["status"] for r in records}
    assert status == {("vae", 1): "done", ("mapa-k10", 10): "done", ("mapa-k10", 200): "failed"}
    failed = next(r for r in records if r["status"] == "failed")
    assert "k + S" in failed["error"] and "\n" not in failed["error"]
    # a second run retries only the failed job and keeps the finished ones
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "jobs").iterdir()}
    run_jobs(jobs, tmp_path, cache_dir=str(tmp_path / "cache"), progress=False)
    again = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "jobs").iterdir()}
    changed = {k for k in done if done[k] != again[k]}
    assert changed == {f"{failed['key']}.json"}


@pytest.mark.slow
def test_reproduce_tiny_profile_end_to_end(tmp_path):
    md = reproduce("tiny", tmp_path / "rep", n_jobs=1, cache_dir=str(tmp_path / "cache"),
                   progress=False)
    text = md.read_text()
    for claim in ("(a)", "(b)", "(c)", "(d)", "(e)"):
        assert f"## {claim}" in text
        section = text.split(f"## {claim}")[1].split("## ")[0]
        assert "Verdict:" in section
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == text.count("![")  # every figure inline
    figures = {p.name for p in (tmp_path / "rep" / "figures").iterdir()}
    assert {"test_kl_vs_S.png", "passes_vs_S.png", "posterior_circle.png",
            "nonidentifiability_circle.png", "nonidentifiability_absolute-value.png",
            "samples_circle.png"} <= figures
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert {row["variant"] for row in summary} == set(TINY.variants)
    # (c) is measured at N = 1000 whatever the profile: MAPA(200) vs IWAE(50) has numbers
    assert "| circle |" in text.split("## (c)")[1].split("## ")[0]
    # resuming runs no job again
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "rep" / "jobs").iterdir()}
    reproduce("tiny", tmp_path / "rep", cache_dir=str(tmp_path / "cache"), progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert torch.isfinite(torch.tensor([row["mean"] for row in summary])).all()


def test_measure_passes_follows_the_tail_and_the_batching():
    """Claim (c)'s counter with the chosen estimator: per-point tails on random batches touch
    many atoms at N = 3000; a shared tail on local batches touches the union of the batch's
    top-k sets and S shared draws, at most k + S / B per point."""
    ds = make_ground_truth_data("circle", 3000, 0, 0, seed=0)
    own = measure_passes(ds, (50,), steps=3)  # the defaults: per-point, random
    shared = measure_passes(ds, (50,), steps=3, tail="shared", batching="local")
    k, s, b = 5, 50, 100
    assert own[("circle", "iwae", 50)]["decoder"] == 50 and own[("circle", "mapa", 50)]["n"] == 3000
    assert shared[("circle", "mapa", 50)]["decoder"] <= k + s / b
    assert own[("circle", "mapa", 50)]["decoder"] > 2 * (k + s / b)


def test_job_key_depends_on_every_config_value():
    a = Job("circle", 0, "mapa-k10", 10, 0, (("epochs", 3),))
    assert a.key != Job("circle", 0, "mapa-k10", 10, 0, (("epochs", 4),)).key
    assert a.key != Job("circle", 1, "mapa-k10", 10, 0, (("epochs", 3),)).key
    assert a.key != Job("circle", 0, "mapa-gt", 10, 0, (("epochs", 3),)).key
    assert a.key == Job("circle", 0, "mapa-k10", 10, 0, (("epochs", 3),)).key


def test_dask_backend_runs_the_same_jobs(tmp_path):
    """The cluster path: the same jobs through joblib's Dask backend (a local cluster here)."""
    pytest.importorskip("dask.distributed")
    prof = Profile("d", ("circle",), (10,), restarts=1, draws=1, variants=("vae", "mapa-k10"),
                   train=TINY.train)
    jobs = make_jobs(prof)
    records = run_jobs(jobs, tmp_path, n_jobs=2, backend="dask", cache_dir=str(tmp_path / "c"),
                       progress=False)
    assert [r["status"] for r in records] == ["done", "done"]
    local = run_jobs(jobs, tmp_path / "local", cache_dir=str(tmp_path / "c"), progress=False)
    for a, b in zip(records, local, strict=True):  # same seeds, same numbers, wherever they ran
        assert a["metrics"]["test_kl"] == b["metrics"]["test_kl"]


def test_unknown_or_missing_backend_is_a_clear_error(tmp_path):
    from mapa_vae.errors import MapaError

    jobs = make_jobs(Profile("d", ("circle",), (10,), 1, 1, ("vae",), TINY.train))
    with pytest.raises(MapaError, match="unknown backend"):
        run_jobs(jobs, tmp_path, backend="spark", progress=False)


@pytest.mark.slow
def test_a_sweep_with_failed_jobs_says_so_and_is_not_a_success(tmp_path):
    """The report is written, but reproduce raises (the CLI exits 3) saying how many failed and why."""
    from mapa_vae.experiments.sweep import IncompleteSweep

    prof = Profile("tiny", ("circle",), (10, 200), restarts=1, draws=1, variants=("vae", "mapa-k10"),
                   train=TINY.train)
    with pytest.raises(IncompleteSweep, match=r"1 of 3 jobs failed \(first: circle draw 0 mapa-k10 "
                       r"S=200.*k \+ S") as e:
        reproduce(prof, tmp_path / "rep", cache_dir=str(tmp_path / "cache"), progress=False)
    assert e.value.report == tmp_path / "rep" / "report.md" and e.value.report.exists()
    assert "Failed jobs" in e.value.report.read_text()
    assert e.value.exit_code == 3
