"""Does a learned index proposal beat MAPA's fixed one? (issue 13, the thesis test)

Runs MAPA with its kernel ``q(i | n)`` (``mapa-k10``) and with NVIL- and VIMCO-trained
``q_φ(i | x_n)`` (``mapa-learned-nvil``, ``mapa-learned-vimco``) on the five ground-truth data
sets at the same ``k`` and ``S``, through the reproduction's own job runner, and writes the
reproduction's section (:func:`mapa_vae.experiments.reproduce.learned_proposals`) as
``DIR/report.md`` plus the records as JSON. ``reproduce --profile quick|paper`` writes the same
section at its own budget.

    python benchmarks/learned_proposal.py --out runs/learned --epochs 200 --n-train 500 --jobs 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mapa_vae.data.dataset import make_ground_truth_data
from mapa_vae.data.groundtruth import GROUND_TRUTHS
from mapa_vae.experiments.report import Report
from mapa_vae.experiments.reproduce import learned_proposals, select_best
from mapa_vae.experiments.sweep import Profile, make_jobs, run_jobs

VARIANTS = ("mapa-k10", "mapa-learned-nvil", "mapa-learned-vimco")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json", type=Path, default=None,
                   help="where to write one record per (data, variant) (default: OUT/learned_proposals.json)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--samples", type=int, default=10, help="S (k = 10 %% of S)")
    p.add_argument("--seeds", type=int, default=1, help="restarts (best by validation)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--data", nargs="+", default=list(GROUND_TRUTHS))
    args = p.parse_args()
    train = {"epochs": args.epochs, "n_train": args.n_train, "n_val": 250, "n_test": 1000,
             "eval_every": 10, "test_grid": 2**14}
    prof = Profile("learned", tuple(args.data), (args.samples,), restarts=args.seeds, draws=1,
                   variants=VARIANTS, train=train)
    jobs = make_jobs(prof)
    records = run_jobs(jobs, args.out, args.jobs, save_models=jobs)
    best = select_best(records)
    datasets = {d: make_ground_truth_data(d, args.n_train, 250, 1000, seed=0) for d in prof.datasets}
    rep = Report(f"Learned index proposals: {args.epochs} epochs, N = {args.n_train}, S = "
                 f"{args.samples}, {args.seeds} seed(s)")
    learned_proposals(rep, datasets, best, args.out, prof)
    md, _ = rep.write(args.out)
    (args.json or args.out / "learned_proposals.json").write_text(json.dumps(
        [{"data": r["job"]["data"], "variant": r["job"]["variant"], "status": r["status"],
          **({k: r["metrics"][k] for k in ("test_kl", "train_seconds", "passes_per_point_per_step",
                                            "val_log_lik")} if r["status"] == "done" else
             {"error": r.get("error")})} for r in records], indent=1))
    print(md.read_text())


if __name__ == "__main__":
    main()
