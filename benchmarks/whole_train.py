"""The whole ``mapa-vae train``, MAPA's default against IWAE(S), one after the other on one data set.

The first ``--n-train`` training images of a binarized-MNIST ``.npz`` (``--data``), with the first
``--n-val`` validation and ``--n-test`` test images as its own split, are written to a temporary
``.npz``; then ``mapa-vae train`` runs on it as a subprocess, once for MAPA with its own defaults
for images (S and k as the method picks them, the flow prior fitted, the final evaluation) and
once for IWAE with ``--iwae-samples`` draws, each in a fresh process. The networks and the seed
are stated on both command lines (``--latent-dim``, ``--hidden``, ``--activation``, ``--seed``,
``--restarts``, ``--threads``, ``--dtype``, ``--epochs``), IWAE's optimizer on its own
(``--iwae-batch-size``, ``--iwae-lr``); MAPA's S, k, batch and learning rate are the method's
image defaults unless ``--mapa-samples`` / ``--mapa-k`` / ``--mapa-batch-size`` / ``--mapa-lr``
set them, and every run's resolved configuration is recorded beside its numbers (and the values
MAPA used are printed), so a default that changes later shows in the JSON. For each run:

- CPU seconds (user + system of the child, from ``os.wait4``) and wall seconds;
- peak resident memory: the child's ``ru_maxrss`` from ``os.wait4`` (exact, that process only),
  and per phase the peak of ``VmRSS`` sampled every ``--interval`` seconds, the phases told apart
  by the lines the run prints as it enters them (:data:`PHASES`);
- CPU seconds per phase: the child's user + system time (``/proc/PID/stat``) read as each phase's
  line arrives, the last phase ending with the ``os.wait4`` total;
- the run's own phase times from its ``metrics.json`` (``train_seconds``, ``prior_seconds``,
  ``eval_seconds``: wall seconds inside the run) and its test log-likelihood with its errors.

Then both final models' evaluations are timed again in this process, taking turns ``--turns``
times (``evaluate_final``, the code ``train`` runs: validation and test, CPU seconds of this
process's one thread, the median), which compares them under the same load. Then the ratios
MAPA / IWAE of CPU, wall, peak memory and final-evaluation time (wall inside the run, CPU per
phase, and the turns' median), and MAPA's prior fit over its training time. Wall seconds on a
shared machine are inflated by the load; CPU seconds of one thread are the comparable measure.
Reproduce ``docs/benchmarks/whole-train-mnist10k.json``::

    nice -n 10 python benchmarks/whole_train.py --data ../shared/data/binarized_mnist.npz \\
        --n-train 10000 --n-val 500 --n-test 500 --mapa-epochs 20 --iwae-epochs 10 \\
        --iwae-samples 50 --json docs/benchmarks/whole-train-mnist10k.json

``--tiny`` writes random 0/1 images (200 / 20 / 20) instead of reading ``--data`` and trains
small networks for one epoch: seconds, for CI.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from harness import parser, start, write_mnist_subset, write_records

from mapa_vae.data.loading import load_dataset
from mapa_vae.registry import METHODS
from mapa_vae.training.loop import evaluate_final
from mapa_vae.training.runs import load_run

PHASES = ("until the prior fit", "prior fit", "evaluation and writing")
"""Where a run's resident-memory samples and CPU seconds are counted: before the line announcing
the prior fit (start-up, data, training), until the one announcing the final evaluation, and
after it (the evaluation, then writing the run: its files and the curves' plot, a second or two)."""

_MARKS = {"finalizing the model": 1, "evaluating on": 2}
"""Text of the run's announcement lines (``training/loop.py``) and the phase each one starts."""


class _Watch:
    """Samples a process's ``VmRSS`` every ``interval`` seconds and reads its stderr, noting when
    each phase starts; keeps the last lines of stderr for an error message."""

    def __init__(self, proc: subprocess.Popen[bytes], interval: float) -> None:
        self.proc, self.interval = proc, interval
        self.phase, self.peak = 0, [0] * len(PHASES)  # bytes per phase
        self.cpu_at: list[float | None] = [0.0] + [None] * (len(PHASES) - 1)  # CPU s as each starts
        self.tick = os.sysconf("SC_CLK_TCK")
        self.tail: list[str] = []
        self.threads = [threading.Thread(target=self._sample, daemon=True),
                        threading.Thread(target=self._read, daemon=True)]
        for t in self.threads:
            t.start()

    def _rss(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    def _cpu(self) -> float | None:
        """The process's user + system seconds so far."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / self.tick  # utime, stime
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self) -> None:
        while self.proc.returncode is None:
            rss = self._rss()
            if rss is None:
                return
            self.peak[self.phase] = max(self.peak[self.phase], rss)
            time.sleep(self.interval)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        fd, buf = self.proc.stderr.fileno(), b""
        while chunk := os.read(fd, 65536):
            buf += chunk
            *lines, buf = buf.replace(b"\r", b"\n").split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").strip()
                if not line:
                    continue
                for mark, phase in _MARKS.items():
                    if mark in line and phase > self.phase:
                        self.phase = phase
                        self.cpu_at[phase] = self._cpu()
                if "%|" not in line:  # progress bars are not worth keeping
                    self.tail = [*self.tail[-20:], line]

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=5)


def run_train(argv: list[str], out: Path, interval: float) -> dict[str, Any]:
    """One ``mapa-vae train`` in its own process: its costs (module docstring) and metrics."""
    cmd = [sys.executable, "-m", "mapa_vae", "train", *argv, "--out", str(out)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watch = _Watch(proc, interval)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, whatever ran before it
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    watch.join()
    cpu = usage.ru_utime + usage.ru_stime
    by_phase = {}
    for i, (name, begin) in enumerate(zip(PHASES, watch.cpu_at, strict=True)):
        if begin is not None:  # a phase the run went through (IWAE fits no prior)
            end = next((c for c in watch.cpu_at[i + 1 :] if c is not None), cpu)
            by_phase[name] = end - begin
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n" + "\n".join(watch.tail))
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    keep = ("test_log_lik", "test_log_lik_stderr", "test_log_lik_mc_stderr", "test_log_lik_how",
            "test_empirical_log_lik", "val_log_lik", "train_seconds", "prior_seconds",
            "eval_seconds", "seconds_per_epoch", "samples", "k", "epochs", "prior_fit_steps")
    return {
        "command": "mapa-vae train " + " ".join(argv),
        "cpu_seconds": cpu,
        "cpu_seconds_by_phase": by_phase,
        "user_seconds": usage.ru_utime, "system_seconds": usage.ru_stime,
        "wall_seconds": wall,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports kilobytes
        "peak_rss_bytes_sampled": dict(zip(PHASES, watch.peak, strict=True)),
        "metrics": {k: metrics.get(k) for k in keep},
        "config": config,
    }


def eval_turns(runs: dict[str, Path], npz: Path, turns: int) -> dict[str, list[Any]]:
    """CPU seconds of each run's final evaluation (``evaluate_final``), the runs taking turns,
    and how each turn estimated (the draws K it took)."""
    data = load_dataset(str(npz))
    loaded = {name: load_run(d) for name, d in runs.items()}
    out: dict[str, list[Any]] = {name: [] for name in runs}
    for turn in range(turns):
        for name, run in loaded.items():
            torch.manual_seed(turn)
            t = time.process_time()
            m = evaluate_final(METHODS[run.config.method], run.model, data, run.config.test_grid,
                               progress=False)
            out[name].append((time.process_time() - t, m.get("test_log_lik_how")))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--data", default="../shared/data/binarized_mnist.npz",
                   help="a binarized-MNIST .npz (its first --n-train / --n-val / --n-test images)")
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--mapa-epochs", type=int, default=20)
    p.add_argument("--iwae-epochs", type=int, default=10)
    p.add_argument("--iwae-samples", type=int, default=50, help="IWAE's S")
    p.add_argument("--latent-dim", type=int, default=4)
    p.add_argument("--hidden", type=int, nargs="+", default=[200, 200])
    p.add_argument("--activation", default="tanh")
    p.add_argument("--iwae-batch-size", type=int, default=100)
    p.add_argument("--iwae-lr", type=float, default=1e-3)
    for knob, kind in (("samples", int), ("k", int), ("batch-size", int), ("lr", float)):
        p.add_argument(f"--mapa-{knob}", type=kind, default=None,
                       help=f"MAPA's --{knob} (default: the method's image default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--turns", type=int, default=3,
                   help="times each final evaluation is re-timed, taking turns (0: none; default 3)")
    p.add_argument("--interval", type=float, default=0.05,
                   help="seconds between resident-memory samples (default: 0.05)")
    args = p.parse_args(argv)
    info = start(args)
    if args.tiny:
        args.n_train, args.n_val, args.n_test = 200, 20, 20
        args.mapa_epochs = args.iwae_epochs = 1
        args.iwae_samples, args.hidden, args.latent_dim = 5, [20], 2
        args.turns = min(args.turns, 1)
    for flag in ("n_train", "n_val", "n_test", "mapa_epochs", "iwae_epochs", "iwae_samples"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(args, flag)}: at least 1")
    common = ["--likelihood", "bernoulli", "--latent-dim", str(args.latent_dim),
              "--hidden", *map(str, args.hidden), "--activation", args.activation,
              "--seed", str(args.seed), "--restarts", str(args.restarts),
              "--threads", str(args.threads), "--dtype", args.dtype]
    mapa_knobs = [f for knob in ("samples", "k", "batch_size", "lr")
                  if (v := getattr(args, f"mapa_{knob}")) is not None
                  for f in (f"--{knob.replace('_', '-')}", str(v))]
    knobs = {k: getattr(args, k) for k in (
        "data", "n_train", "n_val", "n_test", "mapa_epochs", "iwae_epochs", "iwae_samples",
        "latent_dim", "hidden", "activation", "iwae_batch_size", "iwae_lr", "mapa_samples", "mapa_k",
        "mapa_batch_size", "mapa_lr", "seed", "restarts", "threads", "dtype", "turns", "interval")}
    if args.tiny:
        knobs["data"] = "random 0/1 images (--tiny)"
    records = []
    with tempfile.TemporaryDirectory(prefix="whole-train-") as tmp:
        npz = Path(tmp) / f"mnist{args.n_train}.npz"
        write_mnist_subset(None if args.tiny else Path(args.data), npz, args.n_train, args.n_val,
                     args.n_test, args.seed)
        runs = {"mapa": ["--method", "mapa", "--epochs", str(args.mapa_epochs), *mapa_knobs],
                f"iwae{args.iwae_samples}": [
                    "--method", "iwae", "--samples", str(args.iwae_samples), "--epochs",
                    str(args.iwae_epochs), "--batch-size", str(args.iwae_batch_size), "--lr",
                    str(args.iwae_lr)]}
        for name, flags in runs.items():
            print(f"{name}: mapa-vae train {' '.join(flags)} ...", flush=True)
            rec = run_train(["--data", str(npz), *flags, *common], Path(tmp) / name, args.interval)
            rec["run"] = name
            m, c = rec["metrics"], rec["config"]
            print(f"  used S {c['samples']}, k {c['k']}, batch {c['batch_size']}, lr {c['lr']:g}",
                  flush=True)
            phases = ", ".join(f"{k} {v:.1f}" for k, v in rec["cpu_seconds_by_phase"].items())
            print(f"  {rec['cpu_seconds']:.1f} CPU s ({phases}), {rec['wall_seconds']:.1f} s wall, peak "
                  f"{rec['peak_rss_bytes'] / 1e9:.2f} GB; train {m['train_seconds']:.1f} s, prior "
                  f"{m['prior_seconds'] or 0.0:.1f} s, evaluation {m['eval_seconds']:.1f} s; test "
                  f"log-lik {m['test_log_lik']:.2f} ± {m['test_log_lik_stderr']:.2f}", flush=True)
            records.append(rec)
        if args.turns:
            turns = eval_turns({r["run"]: Path(tmp) / r["run"] for r in records}, npz, args.turns)
            for rec in records:
                rec["eval_cpu_seconds_turns"] = [c for c, _ in turns[rec["run"]]]
                rec["eval_turns_how"] = [h for _, h in turns[rec["run"]]]
                rec["eval_cpu_seconds_median"] = statistics.median(rec["eval_cpu_seconds_turns"])
                print(f"{rec['run']}: final evaluation {rec['eval_cpu_seconds_median']:.2f} CPU s "
                      f"(median of {args.turns}, taking turns)", flush=True)
    mapa, iwae = records
    ratios = {
        "cpu_seconds": _ratio(mapa["cpu_seconds"], iwae["cpu_seconds"]),
        "wall_seconds": _ratio(mapa["wall_seconds"], iwae["wall_seconds"]),
        "peak_rss": _ratio(mapa["peak_rss_bytes"], iwae["peak_rss_bytes"]),
        "eval_seconds": _ratio(mapa["metrics"]["eval_seconds"], iwae["metrics"]["eval_seconds"]),
        "eval_and_write_cpu_seconds": _ratio(mapa["cpu_seconds_by_phase"].get(PHASES[2]),
                                             iwae["cpu_seconds_by_phase"].get(PHASES[2])),
        "eval_cpu_seconds_median": _ratio(mapa.get("eval_cpu_seconds_median"),
                                          iwae.get("eval_cpu_seconds_median")),
        # CPU of the prior-fit phase over CPU of everything before it (start-up, table, training):
        # the measure that a loaded machine does not inflate; then the same by the run's wall clocks
        "mapa_prior_fit_over_training_cpu": _ratio(mapa["cpu_seconds_by_phase"].get(PHASES[1]),
                                                   mapa["cpu_seconds_by_phase"].get(PHASES[0])),
        "mapa_prior_fit_over_training": _ratio(mapa["metrics"]["prior_seconds"],
                                               mapa["metrics"]["train_seconds"]),
    }
    print("MAPA / IWAE: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items() if v is not None))
    write_records(args.json, "whole_train", info, knobs, records, ratios=ratios)


if __name__ == "__main__":
    main()
