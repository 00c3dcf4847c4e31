"""Reproduce the paper's claims in one command (docs/design.md §7 (a)–(e)).

``reproduce(profile, out)`` runs the sweep (:mod:`mapa_vae.experiments.sweep`), picks for every data set,
draw, method and ``S`` the restart with the best validation log-likelihood, and writes the
figures and a report that states each claim beside the numbers measured for it and a verdict:

(a) MAPA has lower test KL than VAE and IWAE on every data set but clusters, across ``S``;
(b) MAPA ≈ MAPA-GT, and MAPA-naive is much worse;
(c) MAPA at S = 200 costs the decoder passes of IWAE at S = 50 (encoder + decoder: S = 100);
(d) ``q(i | n)`` tracks the true posterior: ``KL[p(i | x_n) ‖ q(i | n)]`` far below uniform's;
(e) it tracks it equally for the ground truth and a VAE-learned decoder (absolute-value, circle).
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..data.dataset import Dataset, make_ground_truth_data
from ..inference.exact import compute_posterior, ground_truth_posterior
from ..inference.learned_proposal import LearnedMAPA
from ..inference.objectives import IWAE, MAPA
from ..inference.posterior import MapaPosterior, uniform_posterior
from ..inference.tails import make_tail
from ..kernels import GaussianKernel
from ..methods.base import Architecture
from ..models.likelihoods import GaussianLikelihood
from ..registry import BATCHINGS, METHODS, POSTERIORS
from ..storage import write_json
from ..training.runs import load_run
from .figures import PosteriorPanel, plot_kl_vs_samples, plot_passes, plot_posteriors
from .report import Report
from .samples_plot import plot_samples
from .sweep import (
    PAPER_SAMPLES,
    PROFILES,
    IncompleteSweep,
    Job,
    Profile,
    check_backend,
    check_writable_dir,
    estimate_seconds,
    load_record,
    make_jobs,
    run_jobs,
    variant,
)

__all__ = ["learned_proposals", "measure_passes", "posterior_kl", "reproduce", "select_best",
           "summarize"]

PASS_GRID = PAPER_SAMPLES  # claim (c)'s passes at every S of the paper's grid
LARGE_N = 10_000  # claim (c) beyond the paper's N = 1000, where a batch can touch every atom


def select_best(records: list[dict[str, Any]]) -> dict[tuple[str, int, str, int], dict[str, Any]]:
    """The finished run with the best final validation log-likelihood, per cell.

    A job trains its cell's ``R`` restarts together and its record is the restart ``train``
    kept, the best by its validation score (``metrics["restart_runs"]`` holds every restart's);
    a store from before then holds one record per restart, and the best of them is taken here.
    """
    best: dict[tuple[str, int, str, int], dict[str, Any]] = {}
    for r in records:
        if r["status"] != "done":
            continue
        j = r["job"]
        cell = (j["data"], j["draw"], j["variant"], j["samples"])
        if cell not in best or r["metrics"]["val_log_lik"] > best[cell]["metrics"]["val_log_lik"]:
            best[cell] = r
    return best


Cell = tuple[str, int, str, int]  # (data, draw, variant, S)
Summary = dict[tuple[str, str, int], dict[str, float]]  # (data, variant, S) -> mean, std, n


def summarize(best: dict[Cell, dict[str, Any]]) -> Summary:
    """Test KL mean and spread over draws per (data, variant, S)."""
    groups: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for (data, _, label, s), r in best.items():
        groups[(data, label, s)].append(r["metrics"]["test_kl"])
    return {
        key: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
              "n": len(v)}
        for key, v in groups.items()
    }


@torch.no_grad()
def measure_passes(data: Dataset, samples: tuple[int, ...] = PASS_GRID, batch: int = 100,
                   steps: int = 20, seed: int = 0, tail: str | None = None,
                   batching: str | None = None) -> dict[tuple[str, str, int], dict[str, float]]:
    """Passes per point per step of MAPA (k = 10 % of S) and IWAE on ``steps`` batches.

    MAPA uses ``tail`` and ``batching`` (default: :class:`~mapa_vae.config.TrainConfig`'s), its
    batches drawn as an epoch of training draws them; IWAE's cost is ``S`` whatever the batch.
    Every record also holds ``n``, the training points. The count depends on the posterior and
    the draws, not on the weights, so an untrained model gives the same numbers as a trained one.
    """
    assert data.truth is not None
    x = data.train.float()
    n = x.shape[0]
    lik = GaussianLikelihood(data.truth.noise_var)
    arch = Architecture(x.shape[1], 1, (50, 50, 50), "tanh")
    post = compute_posterior(x, GaussianKernel(data.truth.noise_var))
    cfg = TrainConfig()
    tail, batching = tail or cfg.tail, batching or cfg.batching
    out = {}
    g = torch.Generator().manual_seed(seed)
    for s in samples:
        k = max(1, round(0.1 * s))
        if k + s > n - 1:
            continue
        objectives = {"mapa": (METHODS["mapa"].build(arch, lik, cfg),
                               MAPA(post, x, k, s, generator=g, tail=make_tail(tail))),
                      "iwae": (METHODS["iwae"].build(arch, lik, cfg), IWAE(s))}
        with torch.no_grad():  # passes are counted in the forward pass
            for name, (model, obj) in objectives.items():
                batches: list[torch.Tensor] = []
                for _ in range(steps):
                    if not batches:
                        batches = BATCHINGS[batching](x, batch, g)
                    index = batches.pop()
                    obj(model, x[index], index)
                out[(data.name, name, s)] = {**obj.passes.per_point(), "n": n}
    return out


def posterior_kl(exact: MapaPosterior, approx: MapaPosterior) -> float:
    """Mean over points of ``KL[exact(· | n) ‖ approx(· | n)]`` (both dense)."""
    p, q = exact.dense(), approx.dense()
    kl = torch.where(p > -math.inf, p.exp() * (p - q), torch.zeros_like(p)).sum(-1)
    return float(kl.mean())


def _fmt(r: dict[str, float] | None) -> str:
    if r is None:
        return "–"
    if r.get("n", 2) < 2:  # one draw has no spread to show
        return f"{r['mean']:.3f} (1 draw)"
    return f"{r['mean']:.3f} ± {r['std']:.3f}"


def reproduce(profile: str | Profile = "quick", out: str | Path = "runs/reproduce", n_jobs: int = 1,
              backend: str = "loky", address: str | None = None, cache_dir: str | None = None,
              progress: bool = True) -> Path:
    """Run the protocol of ``profile`` and write figures and ``report.md`` / ``report.html``."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    out = Path(out)
    check_backend(backend, address)  # everything the user gave, checked before the pilot runs
    check_writable_dir(cache_dir or TrainConfig().cache_path, "--cache-dir")
    check_writable_dir(out, "--out")
    fig_dir = out / "figures"
    jobs = make_jobs(prof)
    top_s = max(prof.samples)
    keep = [j for j in jobs if j.draw == 0 and (j.samples == top_s or not variant(j.variant).uses_samples)]
    if progress:
        _announce(prof, jobs, out, n_jobs, cache_dir)
    records = run_jobs(jobs, out, n_jobs, backend, address, cache_dir, keep, progress)
    failed = [r for r in records if r["status"] != "done"]
    write_json(out / "failed.json", [{"job": r["job"], "error": r["error"]} for r in failed])
    best = select_best(records)
    summary = summarize(best)
    write_json(out / "summary.json", [{"data": d, "variant": v, "samples": s, **r}
                                      for (d, v, s), r in summary.items()])

    rep = Report(f"Reproducing MAPA: profile '{prof.name}'")
    rep.paragraph(
        f"Data sets: {', '.join(prof.datasets)}. S grid: {list(prof.samples)}. Restarts R = "
        f"{prof.restarts} (best by validation log-likelihood), draws D = {prof.draws}. Training "
        f"overrides: {prof.train or 'the defaults (500 epochs, 1000 training points)'}. Jobs: "
        f"{len(records)}, failed: {len(failed)}. Test KL = E_x~p_GT[log p_GT(x) - log p(x)], both by "
        "quadrature on fresh test points."
    )
    variants = list(prof.variants)
    _kl_table(rep, summary, prof, variants)
    figs: list[tuple[Path, str]] = [(plot_kl_vs_samples(summary, fig_dir / "test_kl_vs_S.png"),
                                     "Test KL against S, lower is better (mean ± std over "
                                     "draws; one draw: no error bar), Fig. 2a/3")]
    claim_a(rep, summary, prof)
    claim_b(rep, summary, prof)
    passes: dict[tuple[str, str, int], dict[str, float]] = {}
    sizes = _sizes(prof)
    datasets = {d: make_ground_truth_data(d, sizes["n_train"], sizes["n_val"], sizes["n_test"], seed=0)
                for d in prof.datasets}
    large: dict[tuple[str, str, int], dict[str, float]] = {}
    for d in prof.datasets:  # at the paper's scale whatever the profile: S = 200 needs N > 220
        passes.update(measure_passes(make_ground_truth_data(d, 1000, 0, 0, seed=0)))
        if prof.name != "tiny":  # its posterior takes seconds per data set: CI's profile skips it
            large.update(measure_passes(make_ground_truth_data(d, LARGE_N, 0, 0, seed=0), (50, 100, 200)))
    figs.append((plot_passes(passes, fig_dir / "passes_vs_S.png"),
                 "Network passes per point per step, batch 100, N = 1000 (Fig. 2b/4/5)"))
    claim_c(rep, passes, prof, large)
    claim_d(rep, datasets, figs, fig_dir)
    claim_e(rep, datasets, best, out, figs, fig_dir, below_budget(prof))
    learned_proposals(rep, datasets, best, out, prof)
    for d, ds in datasets.items():
        models = {}
        for v in variants:
            r = best.get((d, 0, v, top_s if variant(v).uses_samples else 1))
            if r is not None and (out / "models" / r["key"] / "model.pt").exists():
                models[v] = load_run(out / "models" / r["key"]).model
        if models:
            chosen = {v: best[(d, 0, v, top_s if variant(v).uses_samples else 1)]["metrics"] for v in models}
            path = plot_samples(ds.test, models, fig_dir / f"samples_{d}.png",
                                title=f"{d}: data vs samples", metrics=chosen)
            figs.append((path, f"{d}: test data vs samples of each method (draw 0, S = {top_s})"))
    _verdict_table(rep, at=1)  # first, after the set-up paragraph
    rep.heading("Figures")
    for path, caption in figs:
        rep.figure(path, caption)
    if failed:
        rep.heading("Failed jobs")
        rep.table(["job", "error"], [[Job(**r["job"]).describe(), r["error"]] for r in failed])
    md, _ = rep.write(out)
    if failed:  # the report is written; say on the terminal that its numbers are incomplete
        raise IncompleteSweep(
            f"{len(failed)} of {len(records)} jobs failed (first: {Job(**failed[0]['job']).describe()}: "
            f"{failed[0]['error']}); {md} lists them all; run the same command again to retry them", md)
    return md


def _announce(prof: Profile, jobs: list[Job], out: Path, n_jobs: int, cache_dir: str | None) -> None:
    """Say, before a profile starts, how many jobs it runs and about how long it will take."""
    todo = [j for j in jobs if load_record(out, j) is None]
    print(f"reproduce: profile '{prof.name}': {len(jobs)} jobs ({len(jobs) - len(todo)} already "
          f"done), R = {prof.restarts} restarts trained together per job", file=sys.stderr, flush=True)
    if todo:
        seconds, _ = estimate_seconds(todo, n_jobs, cache_dir)
        print(f"reproduce: estimated wall-clock {seconds / 3600:.1f} h ({seconds / 60:.0f} min) on "
              f"--jobs {n_jobs}, from one measured epoch of each variant and S", file=sys.stderr,
              flush=True)


def _sizes(prof: Profile) -> dict[str, int]:
    return {k: prof.train.get(k, v) for k, v in (("n_train", 1000), ("n_val", 500), ("n_test", 2000))}


def _kl_table(rep: Report, summary, prof: Profile, variants: list[str]) -> None:
    rep.heading("Test KL to the ground truth (nats, mean ± std over draws)")
    rows = []
    for d in prof.datasets:
        for v in variants:
            if variant(v).uses_samples:
                rows.append([d, v] + [_fmt(summary.get((d, v, s))) for s in prof.samples])
            else:
                rows.append([d, v] + [_fmt(summary.get((d, v, 1)))] * len(prof.samples))
    rep.table(["data", "method"] + [f"S={s}" for s in prof.samples], rows)


MIN_EPOCHS = 100  # a claim about trained models is judged only with this many epochs …
MIN_RUNS = 2  # … and at least this many restarts × draws per cell (the paper: 500 and 100)


def below_budget(prof: Profile) -> str | None:
    """Why ``prof`` is too small to judge a claim about trained models, or ``None``."""
    epochs, runs = int(prof.train.get("epochs", 500)), prof.restarts * prof.draws
    if epochs < MIN_EPOCHS or runs < MIN_RUNS:
        return (f"{epochs} epochs and R·D = {runs}; a claim about trained models is judged from "
                f"{MIN_EPOCHS} epochs and R·D ≥ {MIN_RUNS}")
    return None


def _verdict(fraction: float, budget: str | None = None) -> str:
    """The verdict on a claim from the fraction of cells where it held; "not judged (why)" when
    the runs were below the budget that can test it (:func:`below_budget`)."""
    if budget is not None:
        return f"not judged ({budget})"
    return "reproduced" if fraction == 1.0 else "partly reproduced" if fraction >= 0.5 else "not reproduced"


def _verdict_table(rep: Report, at: int) -> None:
    """Insert at block ``at`` a table of every claim's verdict, read from its section."""
    rows, claim = [], ""
    for block in rep.blocks:
        if block[0] == "h":
            claim = block[2]
        elif block[0] == "p" and "Verdict: " in block[1]:
            rows.append([claim, block[1].split("Verdict: ")[-1].rstrip(".")])
    rep.blocks[at:at] = [("h", 2, "Verdicts"), ("table", ["claim", "verdict"], rows)]


def claim_a(rep: Report, summary, prof: Profile) -> None:
    rep.heading("(a) MAPA beats VAE and IWAE in test KL, except on clusters")
    wins, total, lines = 0, 0, []
    for d in prof.datasets:
        vae = summary.get((d, "vae", 1))
        for s in prof.samples:
            mapa, iwae = summary.get((d, "mapa-k10", s)), summary.get((d, "iwae", s))
            if mapa is None or iwae is None or vae is None:
                continue
            win = mapa["mean"] < min(iwae["mean"], vae["mean"])
            lines.append([d, str(s), f"{mapa['mean']:.3f}", f"{iwae['mean']:.3f}", f"{vae['mean']:.3f}",
                          "yes" if win else "no"])
            if d != "clusters":
                wins += win
                total += 1
    rep.table(["data", "S", "MAPA (k=10%)", "IWAE", "VAE", "MAPA lowest"], lines)
    frac = wins / total if total else 0.0
    rep.paragraph(f"Measured: MAPA has the lowest test KL in {wins} of {total} (data set, S) cells "
                  f"outside clusters. Verdict: {_verdict(frac, below_budget(prof))}.")


def claim_b(rep: Report, summary, prof: Profile) -> None:
    rep.heading("(b) MAPA ≈ MAPA-GT; MAPA-naive is much worse")
    close = worse = total = 0
    rows = []
    for d in prof.datasets:
        for s in prof.samples:
            m, gt, nv = (summary.get((d, v, s)) for v in ("mapa-k10", "mapa-gt", "mapa-naive"))
            if m is None or gt is None or nv is None:
                continue
            total += 1
            is_close = abs(m["mean"] - gt["mean"]) <= max(0.05, 0.25 * gt["mean"])
            is_worse = nv["mean"] > m["mean"] + max(0.05, 0.25 * m["mean"])
            close += is_close
            worse += is_worse
            rows.append([d, str(s), f"{m['mean']:.3f}", f"{gt['mean']:.3f}", f"{nv['mean']:.3f}",
                         "yes" if is_close else "no", "yes" if is_worse else "no"])
    rep.table(["data", "S", "MAPA", "MAPA-GT", "MAPA-naive", "MAPA ≈ GT", "naive much worse"], rows)
    frac = min(close, worse) / total if total else 0.0
    rep.paragraph(f"Measured: MAPA within max(0.05, 25 %) of MAPA-GT in {close}/{total} cells; "
                  f"MAPA-naive worse by more than that in {worse}/{total}. "
                  f"Verdict: {_verdict(frac, below_budget(prof))}.")


def claim_c(rep: Report, passes, prof: Profile, large=None) -> None:
    """Claim (c) from :func:`measure_passes` at N = 1000 (``passes``, the verdict: the paper's
    scale) and, when measured, at ``N = LARGE_N`` (``large``), the same table with its own N."""
    rep.heading("(c) MAPA at S = 200 needs the passes of IWAE at S = 50 (decoder) or 100 (both)")
    rows, held = [], {}
    for size, table in ((1000, passes), (LARGE_N, large or {})):
        ok = total = 0
        for d in prof.datasets:
            m, i50 = table.get((d, "mapa", 200)), table.get((d, "iwae", 50))
            i100 = table.get((d, "iwae", 100))
            if m is None or i50 is None or i100 is None:
                continue
            r_dec = m["decoder"] / i50["decoder"]
            r_both = m["encoder+decoder"] / i100["encoder+decoder"]
            ok, total = ok + (r_dec <= 1 and r_both <= 1), total + 1
            rows.append([d, str(int(m.get("n", size))), f"{m['decoder']:.2f}",
                         f"{i50['decoder']:.0f}", f"{r_dec:.3f}", f"{m['encoder+decoder']:.2f}",
                         f"{i100['encoder+decoder']:.0f}", f"{r_both:.3f}"])
        held[size] = (ok, total)
    rep.table(["data", "N", "MAPA(200) dec", "IWAE(50) dec", "ratio", "MAPA(200) enc+dec",
               "IWAE(100) enc+dec", "ratio"], rows)
    cfg = TrainConfig()
    (ok, total), (ok_l, total_l) = held[1000], held[LARGE_N]
    at_large = (f"At N = {LARGE_N} both ratios ≤ 1 on {ok_l}/{total_l} data sets (at N = 1000 a "
                "batch of 100 touches at most all N atoms, 10 passes per point, whatever S; at "
                f"N = {LARGE_N} its points' k + S atoms overlap far less)." if total_l else
                f"N = {LARGE_N} is not measured in this profile (its posterior table takes seconds "
                "per data set); `mapa-vae reproduce --profile quick` measures it.")
    verdict = f"{_verdict(ok / total if total else 0.0)} at N = 1000"
    if total_l:
        verdict += f"; {_verdict(ok_l / total_l)} at N = {LARGE_N}"
    rep.paragraph("Passes per point per step with batch 100, measured over 20 batches of each data "
                  f"set's first draw, MAPA with the default --tail {cfg.tail} and --batching "
                  f"{cfg.batching}. At N = 1000 (the paper's scale) both ratios ≤ 1 on {ok}/{total} "
                  f"data sets. {at_large} Verdict: {verdict}.")


def _posteriors(ds: Dataset) -> tuple[MapaPosterior, MapaPosterior]:
    assert ds.truth is not None and ds.z_train is not None
    mapa = compute_posterior(ds.train, GaussianKernel(ds.truth.noise_var))
    exact = ground_truth_posterior(ds.train, ds.z_train, ds.truth.decoder)
    return mapa, exact


def _points(ds: Dataset, count: int = 4) -> list[int]:
    """Training points spread along the latent: the quantiles of the true codes."""
    assert ds.z_train is not None
    order = ds.z_train[:, 0].argsort()
    return [int(order[int(q * (len(order) - 1))]) for q in torch.linspace(0.1, 0.9, count)]


def claim_d(rep: Report, datasets: dict[str, Dataset], figs, fig_dir: Path) -> None:
    rep.heading("(d) q(i | n) tracks the true posterior")
    rows, ok = [], 0
    for d, ds in datasets.items():
        mapa, exact = _posteriors(ds)
        kl_mapa = posterior_kl(exact, mapa)
        kl_unif = posterior_kl(exact, uniform_posterior(ds.train.shape[0]))
        ok += kl_mapa < 0.5 * kl_unif
        rows.append([d, f"{kl_mapa:.3f}", f"{kl_unif:.3f}", f"{kl_mapa / kl_unif:.3f}"])
        assert ds.truth is not None and ds.z_train is not None
        panel = PosteriorPanel("ground truth", ds.truth.decoder, ds.z_train, exact, mapa)
        figs.append((plot_posteriors(ds.train, _points(ds), [panel], fig_dir / f"posterior_{d}.png",
                                     title=f"{d}: posteriors of four training points"),
                     f"{d}: true p(z|x), empiricalized p(i|x)·N and MAPA q(i|n)·N against the true "
                     "codes (Fig. 6–10)"))
    rep.table(["data", "KL[p(i|x_n) ‖ q_MAPA]", "KL[p(i|x_n) ‖ uniform]", "ratio"], rows)
    rep.paragraph(f"Mean over training points, nats. MAPA's KL is below half of uniform's on "
                  f"{ok}/{len(rows)} data sets. Verdict: {_verdict(ok / len(rows) if rows else 0.0)}.")


def claim_e(rep: Report, datasets: dict[str, Dataset], best, out: Path, figs, fig_dir: Path,
            budget: str | None = None) -> None:
    rep.heading("(e) q(i | n) tracks the posterior of two decoders with the same p(x) equally well")
    rows, ok = [], 0
    for d in ("absolute-value", "circle"):
        r = best.get((d, 0, "vae", 1))
        if d not in datasets or r is None or not (out / "models" / r["key"] / "model.pt").exists():
            continue
        ds = datasets[d]
        assert ds.truth is not None and ds.z_train is not None
        vae = load_run(out / "models" / r["key"]).model.double()
        with torch.no_grad():
            codes = vae.encoder(ds.train).mean  # the variant's codes: its encoder means
        mapa, exact_gt = _posteriors(ds)
        exact_vae = ground_truth_posterior(ds.train, codes, vae.decoder)
        kl_gt, kl_vae = posterior_kl(exact_gt, mapa), posterior_kl(exact_vae, mapa)
        ratio = kl_vae / kl_gt
        ok += 0.5 <= ratio <= 2.0
        rows.append([d, f"{r['metrics']['test_kl']:.3f}", f"{kl_gt:.3f}", f"{kl_vae:.3f}", f"{ratio:.2f}"])
        panels = [PosteriorPanel("variant 1: ground truth", ds.truth.decoder, ds.z_train, exact_gt, mapa),
                  PosteriorPanel("variant 2: VAE-learned", vae.decoder, codes, exact_vae, mapa)]
        figs.append((plot_posteriors(ds.train, _points(ds), panels, fig_dir / f"nonidentifiability_{d}.png",
                                     title=f"{d}: one MAPA posterior, two decoders"),
                     f"{d}: MAPA against the posteriors of the ground truth and of a VAE-learned decoder "
                     "(Fig. 11–12)"))
    rep.table(["data", "VAE variant's test KL", "KL[p_GT(i|x) ‖ q]", "KL[p_VAE(i|x) ‖ q]", "ratio"], rows)
    rep.paragraph("Equally well means the ratio lies in [0.5, 2]; the VAE variant must itself fit p(x) "
                  f"(its test KL is shown). Holds on {ok}/{len(rows)}. "
                  f"Verdict: {_verdict(ok / len(rows) if rows else 0.0, budget)}.")


LEARNED = ("mapa-learned-nvil", "mapa-learned-vimco")  # against the fixed kernel, mapa-k10


def learned_proposals(rep: Report, datasets: dict[str, Dataset], best, out: Path, prof: Profile,
                      fixed: str = "mapa-k10") -> None:
    """The learned-proposal test: MAPA's fixed kernel ``q(i | n)`` against NVIL- and VIMCO-trained
    ``q_φ(i | x_n)`` (:mod:`~mapa_vae.inference.learned_proposal`) at the same ``k`` and ``S``
    (so the same decoder passes): test KL, ``KL[p(i | x_n) ‖ q]`` against the ground truth's
    posterior on the training points (draw 0, largest ``S``), decoder passes and wall-clock."""
    learned = [v for v in LEARNED if v in prof.variants]
    if not learned or fixed not in prof.variants:
        return
    rep.heading("Does a learned index proposal beat MAPA's fixed one?")
    top_s = max(prof.samples)
    rows, wins_kl, wins_post, cells = [], 0, 0, 0
    for d, ds in datasets.items():
        ref = best.get((d, 0, fixed, top_s))
        if ref is None:
            continue
        kernel, exact = _posteriors(ds)
        ref_post = posterior_kl(exact, kernel)
        rows.append([d, fixed, f"{ref['metrics']['test_kl']:.3f}", f"{ref_post:.3f}",
                     f"{ref['metrics']['passes_per_point_per_step']['decoder']:.1f}",
                     f"{ref['metrics']['train_seconds']:.1f}"])
        for v in learned:
            r = best.get((d, 0, v, top_s))
            run_dir = out / "models" / r["key"] if r is not None else None
            if r is None or run_dir is None or not (run_dir / "trained.pt").exists():
                rows.append([d, v, "–", "–", "–", "–"])
                continue
            run = load_run(run_dir, "trained")
            cfg = run.config
            table = POSTERIORS["kernel"](run.model, ds.train, cfg, None)
            model = run.model.double()
            objective = LearnedMAPA(table, ds.train.double(), cfg.mapa_k, cfg.samples,
                                    POSTERIORS[cfg.posterior].signal)
            post = posterior_kl(exact, objective.table(model))
            m = r["metrics"]
            cells += 1
            wins_kl += m["test_kl"] < ref["metrics"]["test_kl"]
            wins_post += post < ref_post
            rows.append([d, v, f"{m['test_kl']:.3f}", f"{post:.3f}",
                         f"{m['passes_per_point_per_step']['decoder']:.1f}",
                         f"{m['train_seconds']:.1f}"])
    rep.table(["data", "proposal", "test KL", "KL[p(i|x_n) ‖ q]", "decoder passes / point / step",
               "train seconds"], rows)
    budget = below_budget(prof)
    counts = (f"lower test KL in {wins_kl}/{cells} (data, proposal) cells, closer to p(i|x) in "
              f"{wins_post}/{cells}")
    if cells == 0:
        answer = "not judged (no learned-proposal run finished)"
    elif budget is not None:
        answer = f"not judged ({budget}); as measured: {counts}"
    else:
        frac = wins_kl / cells
        answer = ("yes" if frac == 1.0 else "partly" if frac >= 0.5 else "no") + f": {counts}"
    rep.paragraph(
        f"Same k and S = {top_s} for every row, so the same decoder passes per step (the learned "
        "proposal's scorer sees pairs of data points, not the decoder, and is not counted). "
        "q_φ = (1 − ε) · re-ranked kernel candidates + ε / N (ε = 0.05): the floor keeps the "
        "support full, and also keeps KL[p ‖ q] finite where the kernel's tail is too thin. "
        "KL[p(i|x_n) ‖ q] uses the ground truth's posterior on draw 0's training points (nats, "
        f"mean over points). Verdict: {answer}.")
