"""A run's learning curves: ``curves.png`` and, optionally, a TensorBoard log.

Both read the per-epoch records of ``history.json``. A record is
``{"epoch", "train_bound", "val_log_lik" (validation epochs only), "train_bound_per_copy": [R
floats], "val_log_lik_per_copy": [R floats]}``: the training bound is the epoch's mean bound per
point (the objective's value, e.g. the ELBO, IWAE or MAPA bound of the paper's eq. (5)), the
validation score the method's selection score on held-out points. Older runs wrote
``train_bound`` (and ``val_log_lik``) as a float for one copy or a list over the R copies; both
are read (:func:`per_copy`).

>>> per_copy({"epoch": 3, "train_bound": [-1.0, -2.0]}, "train_bound")
[-1.0, -2.0]
>>> per_copy({"epoch": 3, "train_bound": -1.5, "train_bound_per_copy": [-1.5]}, "train_bound")
[-1.5]
>>> per_copy({"epoch": 3, "train_bound": -1.5}, "val_log_lik") is None
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from ..errors import MapaError
from ..storage import atomic_write

__all__ = ["SERIES", "TensorBoardLog", "check_tensorboard", "per_copy", "write_curves"]

SERIES = {"train_bound": "training bound (nats per point)",
          "val_log_lik": "validation score (nats per point)"}
"""The two curves drawn and logged: history key → axis label."""


def per_copy(record: dict[str, Any], key: str) -> list[float] | None:
    """The values of series ``key`` in one history record, one per copy; ``None`` if absent.

    Reads ``key + "_per_copy"`` first, then ``key`` as a float (one copy) or a list (R copies);
    a ``null`` (a non-finite value in strict JSON) reads as NaN.
    """
    value = record.get(f"{key}_per_copy", record.get(key))
    if value is None:
        return None
    values = value if isinstance(value, (list, tuple)) else [value]
    return [math.nan if v is None else float(v) for v in values]


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[list[float]]]:
    """Epochs where ``key`` was recorded and its values there, ``(epochs, copies × epochs)``."""
    epochs: list[int] = []
    rows: list[list[float]] = []
    for i, record in enumerate(history):
        values = per_copy(record, key)
        if values is None:
            continue
        epochs.append(int(record.get("epoch", i + 1)))
        rows.append(values)
    copies = max((len(r) for r in rows), default=0)
    by_copy = [[r[c] if c < len(r) else math.nan for r in rows] for c in range(copies)]
    return epochs, by_copy


def write_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Draw the training bound and the validation score per epoch, one line per copy, to ``path``.

    Two panels share the epoch axis; with R > 1 copies each copy has its own line (``copy r``).
    Written atomically (a PNG, through matplotlib's Agg backend: no display needed). An empty
    history draws empty panels.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    try:
        for ax, (key, label) in zip(axes, SERIES.items(), strict=True):
            epochs, by_copy = _series(history, key)
            for c, values in enumerate(by_copy):
                name = f"copy {c}" if len(by_copy) > 1 else None
                ax.plot(epochs, values, marker="." if len(epochs) < 30 else None, label=name)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if len(by_copy) > 1:
                ax.legend(fontsize="small")
            if not epochs:
                ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        axes[-1].set_xlabel("epoch")
        fig.tight_layout()
        buffer = BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())


def check_tensorboard(log_dir: str | Path) -> Path:
    """Refuse, before any work, a TensorBoard folder that cannot be used: the optional
    ``tensorboard`` package missing, or ``log_dir`` a file or under one. Creates nothing."""
    from importlib.util import find_spec

    if find_spec("tensorboard") is None:
        raise MapaError(f"--tensorboard {log_dir}: the tensorboard package is not installed; install "
                        "the extra: pip install 'mapa-vae[tensorboard]'")
    log_dir = Path(log_dir)
    for p in (log_dir, *log_dir.parents):
        if p.exists():
            if not p.is_dir():
                what = "is an existing file" if p == log_dir else f"lies under the file {p}"
                raise MapaError(f"--tensorboard {log_dir}: {what}; give a directory")
            break
    return log_dir


class TensorBoardLog:
    """The same curves as :func:`write_curves`, logged epoch by epoch to a TensorBoard folder.

    Scalars ``train_bound`` and ``val_log_lik`` (the chosen value of the record) and, per copy,
    ``train_bound/copy_r`` and ``val_log_lik/copy_r``, each at step ``epoch``. Needs the optional
    ``tensorboard`` package (``pip install 'mapa-vae[tensorboard]'``); without it, or with a
    folder that cannot be written, the constructor raises a one-line :class:`MapaError`.
    """

    def __init__(self, log_dir: str | Path) -> None:
        log_dir = check_tensorboard(log_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # found but broken (e.g. a protobuf it cannot use)
            raise MapaError(
                f"--tensorboard {log_dir}: the tensorboard package is not installed; install the "
                "extra: pip install 'mapa-vae[tensorboard]'"
            ) from None
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MapaError(f"--tensorboard {log_dir}: cannot write there ({e.strerror})") from None
        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Log one history record (see the module docstring) at its epoch."""
        step = int(record["epoch"])
        for key in SERIES:
            values = per_copy(record, key)
            if values is None:
                continue
            chosen = record.get(key)
            if isinstance(chosen, (int, float)) and not isinstance(chosen, bool):
                self._writer.add_scalar(key, float(chosen), step)
            elif len(values) == 1:
                self._writer.add_scalar(key, values[0], step)
            if len(values) > 1:
                for c, v in enumerate(values):
                    self._writer.add_scalar(f"{key}/copy_{c}", v, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
