"""Learning curves: curves.png from new- and old-format histories, and the TensorBoard log."""

from __future__ import annotations

import math
import sys

import matplotlib.image as mpimg
import pytest

from mapa_vae.errors import MapaError
from mapa_vae.training.curves import TensorBoardLog, _series, write_curves

NEW = [
    {"epoch": 1, "train_bound": -3.0, "train_bound_per_copy": [-3.0, -4.0]},
    {"epoch": 2, "train_bound": -2.0, "train_bound_per_copy": [-2.0, -3.5], "val_log_lik": -2.5,
     "val_log_lik_per_copy": [-2.5, -3.9]},
]
OLD_ONE = [{"epoch": 1, "train_bound": -3.0}, {"epoch": 2, "train_bound": -2.0, "val_log_lik": -2.2}]
OLD_MANY = [{"epoch": 1, "train_bound": [-3.0, -4.0]},
            {"epoch": 2, "train_bound": [-2.0, None], "val_log_lik": [-2.5, -3.9]}]


def test_series_reads_every_format() -> None:
    assert _series(NEW, "train_bound") == ([1, 2], [[-3.0, -2.0], [-4.0, -3.5]])
    assert _series(NEW, "val_log_lik") == ([2], [[-2.5], [-3.9]])
    assert _series(OLD_ONE, "train_bound") == ([1, 2], [[-3.0, -2.0]])
    assert _series(OLD_ONE, "val_log_lik") == ([2], [[-2.2]])
    epochs, (a, b) = _series(OLD_MANY, "train_bound")
    assert epochs == [1, 2] and a == [-3.0, -2.0] and b[0] == -4.0 and math.isnan(b[1])


@pytest.mark.parametrize("history", [NEW, OLD_ONE, OLD_MANY, []])
def test_write_curves_draws_a_png(tmp_path, history) -> None:
    path = tmp_path / "sub" / "curves.png"
    write_curves(history, path)
    image = mpimg.imread(path)
    assert image.shape[:2] == (600, 700)  # 7 × 6 inches at 100 dpi
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temp file left


def test_tensorboard_logs_every_copy(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TensorBoardLog(tmp_path / "tb") as log:
        for record in NEW:
            log.log_epoch(record)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"train_bound", "val_log_lik", "train_bound/copy_0", "train_bound/copy_1",
                    "val_log_lik/copy_0", "val_log_lik/copy_1"}
    assert [(e.step, e.value) for e in acc.Scalars("train_bound/copy_1")] == [(1, -4.0), (2, -3.5)]
    assert [(e.step, e.value) for e in acc.Scalars("val_log_lik")] == [(2, -2.5)]


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(MapaError, match=r"tensorboard.*pip install 'mapa-vae\[tensorboard\]'"):
        TensorBoardLog(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def test_tensorboard_refuses_a_file(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    (tmp_path / "f").write_text("x")
    with pytest.raises(MapaError, match="existing file"):
        TensorBoardLog(tmp_path / "f")
