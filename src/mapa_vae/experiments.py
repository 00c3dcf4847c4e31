"""The main job: MAPA, VAE and IWAE side by side on one built-in data set.

:func:`compare` trains the three methods with the same data, seed, epochs and ``S`` (MAPA's
``k`` is 10 % of ``S``), prints a table of test KL to the ground truth, wall-clock and network
passes, and writes ``comparison.json``, ``comparison.md`` and ``samples.png`` (the data beside
each model's samples).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .storage import atomic_write, write_json
from .training import TrainConfig, TrainResult, train

__all__ = ["compare", "format_table", "plot_samples"]

METHOD_ORDER = ("mapa", "vae", "iwae")


def compare(data: str = "figure-8", out: str | Path = "runs/compare", epochs: int = 500,
            samples: int = 100, seed: int = 0, progress: bool = True,
            **overrides: Any) -> dict[str, dict[str, Any]]:
    """Train MAPA, VAE and IWAE on ``data``; return each run's metrics keyed by method."""
    out = Path(out)
    results: dict[str, TrainResult] = {}
    for method in METHOD_ORDER:
        cfg = TrainConfig(data=data, method=method, samples=samples, epochs=epochs, seed=seed,
                          **overrides)
        results[method] = train(cfg, out / method, progress=progress)
        if progress:
            print(f"{method}: test KL {results[method].metrics.get('test_kl', float('nan')):.4f}",
                  flush=True)
    metrics = {m: r.metrics for m, r in results.items()}
    table = format_table(metrics)
    print(table)
    write_json(out / "comparison.json", metrics)
    with atomic_write(out / "comparison.md") as f:
        f.write((f"# {data}: MAPA vs VAE vs IWAE (S = {samples}, {epochs} epochs)\n\n" + table
                 + "\n").encode())
    first = next(iter(results.values()))
    plot_samples(first.data.test, {m: r.model for m, r in results.items()}, out / "samples.png",
                 title=f"{data}: test data vs samples", metrics=metrics)
    return metrics


def format_table(metrics: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: test KL (± s.e.), test log-lik, train time, passes per point per step."""
    rows = [
        "| method | S | k | test KL (nats) | test log-lik | train s | s/epoch "
        "| dec passes/pt | enc+dec passes/pt |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in metrics.items():
        passes = r["passes_per_point_per_step"]
        kl = f"{r['test_kl']:.4f} ± {r['test_kl_stderr']:.4f}" if "test_kl" in r else "n/a"
        rows.append(
            f"| {m} | {r['samples'] if m != 'vae' else 1} | {r['k'] if r['k'] is not None else '-'} "
            f"| {kl} | {r['test_log_lik']:.4f} | {r['train_seconds']:.1f} "
            f"| {r['seconds_per_epoch']:.3f} | {passes['decoder']:.2f} "
            f"| {passes['encoder+decoder']:.2f} |"
        )
    return "\n".join(rows)


def plot_samples(data: torch.Tensor, models: dict[str, Any], path: str | Path,
                 title: str = "", metrics: dict[str, dict[str, Any]] | None = None,
                 n: int = 2000, seed: int = 0) -> Path:
    """Scatter the data beside ``n`` samples of each model (first two coordinates); PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("data", data)]
    torch.manual_seed(seed)
    panels += [(name, m.sample(n)) for name, m in models.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), sharex=True,
                             sharey=True, constrained_layout=True)
    for ax, (name, points) in zip(axes, panels, strict=True):
        x = points.detach().cpu().numpy()
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, color="tab:blue" if name == "data" else "tab:red")
        label = name
        if metrics and name in metrics and "test_kl" in metrics[name]:
            label += f"\nKL = {metrics[name]['test_kl']:.3f}"
        ax.set_title(label, fontsize=10)
        ax.set_aspect("equal", adjustable="box")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path
