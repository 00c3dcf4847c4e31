"""The data beside each model's samples, as one row of scatter plots (first two coordinates).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..storage import atomic_write

__all__ = ["plot_samples"]


def plot_samples(data: torch.Tensor, models: dict[str, Any], path: str | Path,
                 title: str = "", metrics: dict[str, dict[str, Any]] | None = None,
                 n: int = 2000, seed: int = 0, image_shape: tuple[int, ...] | None = None) -> Path:
    """Scatter the data beside ``n`` samples of each model (first two coordinates); PNG.

    With ``image_shape`` ``(C, H, W)`` the rows are images: each panel shows a grid of the first
    16 instead of a scatter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("data", data)]
    torch.manual_seed(seed)
    panels += [(name, m.sample(16 if image_shape else n)) for name, m in models.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4),
                             sharex=image_shape is None, sharey=image_shape is None,
                             constrained_layout=True)
    for ax, (name, points) in zip(axes, panels, strict=True):
        x = points.detach().cpu().numpy()
        if image_shape is not None:
            ax.imshow(_grid(x[:16], image_shape), cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_axis_off()
        else:
            ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4,
                       color="tab:blue" if name == "data" else "tab:red")
        label = name
        if metrics and name in metrics and "test_kl" in metrics[name]:
            label += f"\nKL = {metrics[name]['test_kl']:.3f}"
        ax.set_title(label, fontsize=10)
        if image_shape is None:
            ax.set_aspect("equal", adjustable="box")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path



def _grid(rows: Any, image_shape: tuple[int, ...], side: int = 4) -> Any:
    """A ``side × side`` mosaic ``(side·H, side·W[, C])`` of flattened ``(C, H, W)`` images."""
    import numpy as np

    c, h, w = image_shape
    imgs = np.zeros((side * side, c, h, w))
    imgs[: len(rows)] = rows.reshape(-1, c, h, w).clip(0.0, 1.0)
    mosaic = imgs.reshape(side, side, c, h, w).transpose(0, 3, 1, 4, 2).reshape(side * h, side * w, c)
    return mosaic[..., 0] if c == 1 else mosaic
