"""The reproduction's figures, each the counterpart of one of the paper's (PNG, matplotlib).

- :func:`plot_kl_vs_samples`: test KL against S per data set and method, mean ± spread over
  draws (Fig. 2a / 3);
- :func:`plot_passes`: network passes per point per step against S, decoder only and
  encoder + decoder (Fig. 2b / 4 / 5);
- :func:`plot_posteriors`: for a few ``x``, the true posterior ``p(z | x)``, the empiricalized
  true posterior ``p(i | x)`` (Eq. 7) and MAPA's ``q(i | n)`` against the codes, the latter two
  scaled by ``N`` (Fig. 6–10 and, with a second decoder, Fig. 11–12);
- data against each method's samples: :func:`mapa_vae.experiments.plot_samples`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..inference.posterior import MapaPosterior
from ..models.latent import Decoder
from ..storage import atomic_write
from .sweep import variant

__all__ = ["PosteriorPanel", "plot_kl_vs_samples", "plot_passes", "plot_posteriors"]

COLORS = {"vae": "tab:gray", "iwae": "tab:orange", "iwae-dreg": "tab:brown", "mapa-k10": "tab:blue",
          "mapa-k90": "tab:cyan", "mapa-gt": "tab:red", "mapa-naive": "tab:purple",
          "mapa": "tab:blue"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)
    _pyplot().close(fig)
    return path


def _s_axis(ax, grid: Sequence[int]) -> None:
    """A log-scaled S axis labelled at the grid values only."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(list(grid), [str(g) for g in grid])
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_kl_vs_samples(summary: Mapping[tuple[str, str, int], Mapping[str, float]],
                       path: str | Path) -> Path:
    """``summary[(data, variant, S)] = {"mean", "std"}`` of the test KL over draws."""
    plt = _pyplot()
    datasets = sorted({d for d, _, _ in summary}, key=list(dict.fromkeys(d for d, _, _ in summary)).index)
    variants = list(dict.fromkeys(v for _, v, _ in summary))
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.6 * len(datasets), 3.4), squeeze=False,
                             constrained_layout=True)
    grid = sorted({s for _, v, s in summary if variant(v).uses_samples}) or [1]
    for ax, data in zip(axes[0], datasets, strict=True):
        for v in variants:
            pts = sorted((s, r) for (d, vv, s), r in summary.items() if d == data and vv == v)
            if not pts:
                continue
            if not variant(v).uses_samples:  # S-independent: a band across the grid
                r = pts[0][1]
                ax.axhline(r["mean"], color=COLORS.get(v), label=v, ls="--")
                ax.axhspan(r["mean"] - r["std"], r["mean"] + r["std"], color=COLORS.get(v), alpha=0.15)
                continue
            s = [p[0] for p in pts]
            m = [p[1]["mean"] for p in pts]
            e = [p[1]["std"] for p in pts]
            ax.errorbar(s, m, yerr=e, marker="o", ms=4, capsize=3, label=v, color=COLORS.get(v))
        _s_axis(ax, grid)
        _kl_axis(ax)
        ax.set_title(data)
        ax.set_xlabel("S")
    axes[0][0].set_ylabel("test KL[p_GT ‖ p] (nats, lower is better)")
    _legend_outside(fig, axes)
    return _save(fig, path)


def _kl_axis(ax) -> None:
    """A symmetric-log KL axis (KL estimates can dip below 0) labelled at 1-2-5 values; a range
    too narrow to hold two such labels is shown on a linear axis instead."""
    from matplotlib.ticker import FuncFormatter, SymmetricalLogLocator

    low, high = ax.get_ylim()
    ax.set_yscale("symlog", linthresh=0.01)
    ax.yaxis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=0.01, subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylim(low, high)
    if sum(low <= t <= high for t in ax.get_yticks()) < 2:
        ax.set_yscale("linear")
        ax.set_ylim(low, high)


def _legend_outside(fig, axes) -> None:
    """One legend for the figure, below the panels, where it covers no data."""
    handles: dict[str, object] = {}
    for ax in (a for row in axes for a in row):
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncol=min(len(handles), 4 if len(axes[0]) > 1 else 1), fontsize=8)


def plot_passes(passes: Mapping[tuple[str, str, int], Mapping[str, float]], path: str | Path) -> Path:
    """``passes[(data, method, S)] = {"decoder", "encoder+decoder"}`` per point per step."""
    plt = _pyplot()
    datasets = list(dict.fromkeys(d for d, _, _ in passes))
    fig, axes = plt.subplots(2, len(datasets), figsize=(3.4 * len(datasets), 5.6), squeeze=False,
                             constrained_layout=True)
    for col, data in enumerate(datasets):
        for row, kind in enumerate(("decoder", "encoder+decoder")):
            ax = axes[row][col]
            for method in dict.fromkeys(m for d, m, _ in passes if d == data):
                pts = sorted((s, r[kind]) for (d, m, s), r in passes.items() if d == data and m == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=method,
                        color=COLORS.get(method))
            _s_axis(ax, sorted({s for d, _, s in passes if d == data}))
            ax.set_yscale("log")
            ax.set_title(f"{data}: {kind}", fontsize=9)
            ax.set_xlabel("S")
        axes[0][col].legend(fontsize=7)
    axes[0][0].set_ylabel("passes / point / step")
    axes[1][0].set_ylabel("passes / point / step")
    return _save(fig, path)


class PosteriorPanel:
    """One model's view of the posteriors of chosen points ``x_n`` (training points).

    ``decoder``: the generative model ``p(x | f(z))`` with a ``N(0, 1)`` prior; ``codes``: its
    code for every training point ``(N, 1)``; ``exact``: its empiricalized posterior (Eq. 7);
    ``mapa``: the kernel posterior (the same for any decoder: it never sees one).
    """

    def __init__(self, title: str, decoder: Decoder, codes: Tensor, exact: MapaPosterior,
                 mapa: MapaPosterior) -> None:
        self.title, self.decoder, self.codes, self.exact, self.mapa = title, decoder, codes, exact, mapa

    @torch.no_grad()
    def continuous(self, x: Tensor, z: Tensor) -> Tensor:
        """``log p(z | x)`` on a grid ``z`` ``(G,)`` for one point ``x`` ``(D,)``."""
        log_prior = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
        log_joint = self.decoder(z[:, None].to(x.dtype)).log_prob(x) + log_prior
        dz = z[1] - z[0]
        return log_joint - (torch.logsumexp(log_joint, 0) + torch.log(dz))

    def dense_row(self, post: MapaPosterior, n: int) -> Tensor:
        row = torch.full((post.n_points,), -math.inf, dtype=post.log_q.dtype)
        return row.scatter_(0, post.index[n], post.log_q[n])


def plot_posteriors(x: Tensor, points: Sequence[int], panels: Sequence[PosteriorPanel],
                    path: str | Path, title: str = "") -> Path:
    """Rows: points ``x_n``; columns: panels (e.g. ground truth and a VAE-learned variant)."""
    plt = _pyplot()
    n_atoms = x.shape[0]
    fig, axes = plt.subplots(len(points), len(panels), figsize=(4.2 * len(panels), 2.3 * len(points)),
                             squeeze=False, constrained_layout=True)
    for col, panel in enumerate(panels):
        codes = panel.codes[:, 0].double()
        lo, hi = float(codes.min()) - 0.5, float(codes.max()) + 0.5
        z = torch.linspace(lo, hi, 4000, dtype=torch.float64)
        for row, n in enumerate(points):
            ax = axes[row][col]
            ax.plot(z, panel.continuous(x[n].double(), z), color="black", lw=1, label="true p(z|x)")
            scale = math.log(n_atoms)
            ax.scatter(codes, panel.dense_row(panel.exact, n) + scale, s=5, color="tab:red",
                       label="empiricalized p(i|x)·N (Eq. 7)")
            ax.scatter(codes, panel.dense_row(panel.mapa, n) + scale, s=5, color="tab:blue", alpha=0.6,
                       label="MAPA q(i|n)·N (Eq. 8)")
            ax.axvline(float(codes[n]), color="gray", lw=0.5, ls=":")
            ax.set_ylim(-25, None)
            if row == 0:
                ax.set_title(panel.title, fontsize=10)
            if col == 0:
                ax.set_ylabel(f"x = ({x[n, 0]:.2f}, {x[n, 1]:.2f})\nlog density", fontsize=8)
    axes[-1][0].set_xlabel("z (the model's codes)")
    _legend_outside(fig, axes)
    fig.suptitle(title)
    return _save(fig, path)

