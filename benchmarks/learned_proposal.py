"""Does a learned index proposal beat MAPA's fixed one? (the thesis test)

Runs MAPA with its kernel ``q(i | n)`` (``mapa-k10``) and with NVIL- and VIMCO-trained
``q_φ(i | x_n)`` (``mapa-learned-nvil``, ``mapa-learned-vimco``) on the five ground-truth data
sets at the same ``k`` and ``S``, through the reproduction's own job runner, and writes the
reproduction's section (:func:`mapa_vae.experiments.reproduce.learned_proposals`) as
``DIR/report.md`` plus the records as JSON. ``reproduce --profile quick|paper`` writes the same
section at its own budget.

Every run states its knobs: the 3×50 tanh networks, L = 1, batch 100, Adam 1e-3, float32.

    python benchmarks/learned_proposal.py --out runs/learned --epochs 200 --n-train 500 --jobs 2
    python benchmarks/learned_proposal.py --tiny --json /tmp/learned.json   # seconds: the CI smoke test
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from harness import STATED, parser, start, write_records

from mapa_vae.data.dataset import make_ground_truth_data
from mapa_vae.data.groundtruth import GROUND_TRUTHS
from mapa_vae.experiments.report import Report
from mapa_vae.experiments.reproduce import learned_proposals, select_best
from mapa_vae.experiments.sweep import Profile, make_jobs, run_jobs

VARIANTS = ("mapa-k10", "mapa-learned-nvil", "mapa-learned-vimco")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", type=Path, default=None,
                   help="job store and report folder (default: a temporary folder)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--samples", type=int, default=10, help="S (k = 10 %% of S)")
    p.add_argument("--seeds", type=int, default=1, help="restarts (best by validation)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--data", nargs="+", default=list(GROUND_TRUTHS))
    args = p.parse_args()
    n_val, n_test, test_grid = 250, 1000, 2**14
    if args.tiny:
        args.epochs, args.n_train, args.data, args.jobs = 1, 100, ["circle"], 1
        n_val, n_test, test_grid = 50, 100, 2**10
    info = start(args)
    train: dict[str, Any] = {
        "epochs": args.epochs, "n_train": args.n_train, "n_val": n_val, "n_test": n_test,
        "eval_every": 10, "test_grid": test_grid, "batch_size": 100, "lr": 1e-3, "hidden": (50, 50, 50),
        "activation": "tanh", "latent_dim": 1, "threads": args.threads, "dtype": "float32"}
    prof = Profile("learned", tuple(args.data), (args.samples,), restarts=args.seeds, draws=1,
                   variants=VARIANTS, train=train)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        jobs = make_jobs(prof)
        records = run_jobs(jobs, out, args.jobs, save_models=jobs)
        best = select_best(records)
        datasets = {d: make_ground_truth_data(d, args.n_train, n_val, n_test, seed=0) for d in prof.datasets}
        rep = Report(f"Learned index proposals: {args.epochs} epochs, N = {args.n_train}, S = "
                     f"{args.samples}, {args.seeds} seed(s)")
        learned_proposals(rep, datasets, best, out, prof)
        md, _ = rep.write(out)
        print(md.read_text())
    rows = [{"data": r["job"]["data"], "variant": r["job"]["variant"], "status": r["status"],
             **({k: r["metrics"][k] for k in ("test_kl", "train_seconds", "passes_per_point_per_step",
                                               "val_log_lik")} if r["status"] == "done" else
                {"error": r.get("error")})} for r in records]
    knobs = {**{k: list(v) if isinstance(v, tuple) else v for k, v in train.items()},
             "samples": args.samples, "k_fraction": 0.1, "restarts": args.seeds, "seed": 0,
             "variants": list(VARIANTS), "data": args.data}
    assert set(STATED) - {"method"} <= set(knobs), "state every knob this benchmark measures"
    if args.json is None and args.out is not None:
        args.json = args.out / "learned_proposals.json"
    write_records(args.json, "learned_proposal", info, knobs, rows)


if __name__ == "__main__":
    main()
