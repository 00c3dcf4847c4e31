"""The main job: methods side by side on one data set (by default MAPA, VAE and IWAE).

:func:`compare` trains each method with the same data, seed, epochs, ``S`` and every other
config field (MAPA's ``k`` is 10 % of ``S`` unless given), prints a table of test KL to the
ground truth, wall-clock and network passes, and writes ``comparison.json``, ``comparison.md``
and ``samples.png`` (the data beside each model's samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..methods.base import Architecture
from ..storage import atomic_write, write_json
from ..training.loop import TrainResult, train
from .samples_plot import plot_samples

__all__ = ["compare", "format_table"]


METHOD_ORDER = ("mapa", "vae", "iwae")


def compare(data: str = "figure-8", out: str | Path = "runs/compare", epochs: int = 500,
            samples: int = 100, seed: int = 0, progress: bool = True,
            methods: Sequence[str] = METHOD_ORDER, **overrides: Any) -> dict[str, dict[str, Any]]:
    """Train each of ``methods`` (registry names) on ``data`` with the same settings
    (``overrides``: any other :class:`TrainConfig` field); return their metrics by method."""
    out = Path(out)
    configs = [TrainConfig(data=data, method=method, samples=samples, epochs=epochs, seed=seed,
                           **overrides) for method in methods]  # every config checked first
    results: dict[str, TrainResult] = {}
    for cfg in configs:
        method = cfg.method
        results[method] = train(cfg, out / method, progress=progress, overwrite=True)
        if progress:
            print(f"{method}: test KL {results[method].metrics.get('test_kl', float('nan')):.4f}",
                  flush=True)
    metrics = {m: r.metrics for m, r in results.items()}
    table = format_table(metrics)
    print(table)
    print(f"runs in {out}/<method>/; table, metrics and samples.png in {out}/")
    write_json(out / "comparison.json", metrics)
    with atomic_write(out / "comparison.md") as f:
        f.write((f"# {data}: {' vs '.join(methods)} (S = {samples}, {epochs} epochs)\n\n" + table
                 + "\n").encode())
    first = next(iter(results.values()))
    shape = Architecture.from_config(first.config, first.data.dim).image_shape  # images: grids
    plot_samples(first.data.test, {m: r.model for m, r in results.items()}, out / "samples.png",
                 title=f"{data}: test data vs samples", metrics=metrics, image_shape=shape)
    return metrics



def format_table(metrics: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: test KL (± s.e.), test log-lik, train time, passes per point per step."""
    rows = [
        "| method | S | k | test KL (nats, lower is better) | test log-lik | train s | s/epoch "
        "| dec passes/pt | enc+dec passes/pt |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in metrics.items():
        passes = r["passes_per_point_per_step"]
        kl = f"{r['test_kl']:.4f} ± {r['test_kl_stderr']:.4f}" if "test_kl" in r else "n/a"
        rows.append(
            f"| {m} | {'-' if r['samples'] is None else r['samples']} "
            f"| {'-' if r['k'] is None else r['k']} "
            f"| {kl} | {r['test_log_lik']:.4f} | {r['train_seconds']:.1f} "
            f"| {r['seconds_per_epoch']:.3f} | {passes['decoder']:.2f} "
            f"| {passes['encoder+decoder']:.2f} |"
        )
    return "\n".join(rows)

