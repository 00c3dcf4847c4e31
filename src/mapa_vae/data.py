"""Data: train / validation / test splits of a ground-truth data set or of a user's file.

Built-in data sets are drawn from their ground-truth model (:mod:`mapa_vae.groundtruth`) with
one seed, in the order train, validation, test, and carry their true latent codes. A user's
data comes from a ``.npy`` or ``.csv`` file and is checked on the way in: every problem is one
line naming the file and, where it can, the row and column.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .groundtruth import GROUND_TRUTHS, GroundTruth, ground_truth
from .storage import MapaError

__all__ = ["Dataset", "check_array", "load_array", "load_dataset", "make_ground_truth_data"]

FLOAT32_MAX = float(np.finfo(np.float32).max)
_TOO_LARGE = f"is too large: models train in float32, |x| <= {FLOAT32_MAX:.3g}"


@dataclass
class Dataset:
    """Splits ``(n, D)`` in float64; ``truth`` and the true codes ``z_*`` when known."""

    name: str
    train: Tensor
    val: Tensor
    test: Tensor
    truth: GroundTruth | None = None
    z_train: Tensor | None = None
    z_val: Tensor | None = None
    z_test: Tensor | None = None
    order: Tensor | None = None  # a user's file: the file row of each row of train, val, test

    @property
    def dim(self) -> int:
        return self.train.shape[1]

    def unsplit(self) -> Tensor | None:
        """A user's file in its own row order (so errors can name its rows), else None."""
        if self.order is None:
            return None
        x = torch.empty((self.order.shape[0], self.dim), dtype=self.train.dtype)
        x[self.order] = torch.cat([self.train, self.val, self.test])
        return x


def make_ground_truth_data(
    name: str, n_train: int = 1000, n_val: int = 500, n_test: int = 2000, seed: int = 0,
    surrogate: bool = True,
) -> Dataset:
    """Draw the splits of a built-in data set from its ground truth, reproducibly from ``seed``."""
    truth = ground_truth(name, surrogate=surrogate)
    g = torch.Generator().manual_seed(seed)
    (x_tr, z_tr), (x_va, z_va), (x_te, z_te) = (truth.sample(n, g) for n in (n_train, n_val, n_test))
    return Dataset(name, x_tr, x_va, x_te, truth, z_tr, z_va, z_te)


def load_dataset(
    source: str, n_train: int = 1000, n_val: int = 500, n_test: int = 2000, seed: int = 0
) -> Dataset:
    """A built-in data set by name, or a user's ``.npy`` / ``.csv`` file split at random.

    A file is shuffled with ``seed`` and split 80 / 10 / 10 into train, validation and test.
    """
    if source in GROUND_TRUTHS:
        return make_ground_truth_data(source, n_train, n_val, n_test, seed)
    from .images import IMAGE_DATASETS, load_image_dataset  # images.py imports this module

    if source in IMAGE_DATASETS:
        return load_image_dataset(source, n_train, n_val, n_test, seed)
    path = Path(source)
    if path.suffix.lower() not in {".npy", ".csv"} or not path.exists():
        raise MapaError(
            f"{source!r} is neither a built-in data set ({', '.join([*GROUND_TRUTHS, *IMAGE_DATASETS])}) "
            "nor an existing .npy or .csv file"
        )
    x = torch.from_numpy(load_array(path))
    if x.shape[0] < 10:
        raise MapaError(f"{path}: {x.shape[0]} rows is too few to split into train/val/test (need 10)")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_va = n_te = max(1, x.shape[0] // 10)
    va, te, tr = perm[:n_va], perm[n_va : n_va + n_te], perm[n_va + n_te :]
    return Dataset(path.stem, x[tr], x[va], x[te], order=torch.cat([tr, va, te]))


def load_array(path: str | Path, expected_dim: int | None = None) -> np.ndarray:
    """Read a 2-D float array from ``.npy`` or ``.csv`` and check it (see :func:`check_array`).

    A CSV may have one header row of non-numeric names; every other cell must be a number.
    Never unpickles: object arrays in a ``.npy`` are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise MapaError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise MapaError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        with path.open("rb") as fh:
            if fh.read(6) != b"\x93NUMPY":
                raise MapaError(f"{path}: not a .npy file (no NumPy header); write it with numpy.save")
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            if "allow_pickle" in str(e) or "Object arrays" in str(e):
                raise MapaError(f"{path}: holds Python objects (object dtype); save numbers only") from None
            raise MapaError(f"{path}: not a valid .npy file ({e})") from None
        except Exception as e:
            raise MapaError(f"{path}: not a valid .npy file ({type(e).__name__})") from None
    elif suffix == ".csv":
        arr = _read_csv(path)
    else:
        raise MapaError(f"{path}: unsupported file type {suffix!r}; use .npy or .csv")
    return check_array(arr, str(path), expected_dim)


def _read_csv(path: Path) -> np.ndarray:
    # utf-8-sig: a byte-order mark (Excel writes one) must not turn the first row into a "header"
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            rows = [row for row in reader if any(cell.strip() for cell in row)]
        except UnicodeDecodeError as e:
            raise MapaError(f"{path}: not UTF-8 text (byte {e.start}); save the CSV as UTF-8") from None
        except csv.Error as e:
            raise MapaError(f"{path}: row {reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        raise MapaError(f"{path}: file has no data rows")
    start = 0
    if not _is_numeric_row(rows[0]):
        start = 1  # a header
        if len(rows) == 1:
            raise MapaError(f"{path}: only a header row, no data")
    width = len(rows[start])
    values = np.empty((len(rows) - start, width), dtype=np.float64)
    for r, row in enumerate(rows[start:], start=start + 1):
        if len(row) != width:
            raise MapaError(f"{path}: row {r} has {len(row)} columns, expected {width}")
        for c, cell in enumerate(row):
            try:
                values[r - start - 1, c] = float(cell)
            except ValueError:
                msg = f"{path}: row {r}, column {c + 1}: {cell.strip()!r} is not a number"
                raise MapaError(msg) from None
            if not np.isfinite(values[r - start - 1, c]):  # name the cell as the file counts it
                raise MapaError(f"{path}: non-finite value {cell.strip()!r} at row {r}, column {c + 1}")
            if abs(values[r - start - 1, c]) > FLOAT32_MAX:
                raise MapaError(f"{path}: value {cell.strip()!r} at row {r}, column {c + 1} {_TOO_LARGE}")
    return values


def _is_numeric_row(row: list[str]) -> bool:
    try:
        [float(c) for c in row]
    except ValueError:
        return False
    return True


def check_array(arr: np.ndarray, where: str, expected_dim: int | None = None) -> np.ndarray:
    """Return ``arr`` as a C-contiguous float64 ``(n, D)`` array or raise a one-line error.

    Refuses non-numeric dtypes, a rank other than 2, no rows or columns, fewer than two rows,
    NaN or ±inf or values beyond float32's range (naming the first bad row and column), and a
    ``D`` other than ``expected_dim``. Integer and boolean data are converted to float.
    """
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise MapaError(f"{where}: data must be numeric, found dtype {arr.dtype}")
    if arr.ndim != 2:
        raise MapaError(f"{where}: expected a 2-D array (points × features), found shape {arr.shape}")
    if arr.shape[1] == 0:
        raise MapaError(f"{where}: data has zero columns")
    if arr.shape[0] < 2:
        raise MapaError(f"{where}: data has {arr.shape[0]} row(s); at least 2 are needed")
    if np.iscomplexobj(arr):
        raise MapaError(f"{where}: complex values are not supported")
    out = np.array(arr, dtype=np.float64, order="C", copy=True)  # also detaches read-only memmaps
    bad = ~np.isfinite(out)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise MapaError(f"{where}: non-finite value {out[row, col]} at row {row}, column {col}")
    big = np.abs(out) > FLOAT32_MAX
    if big.any():
        row, col = (int(v) for v in np.argwhere(big)[0])
        raise MapaError(f"{where}: value {out[row, col]:g} at row {row}, column {col} {_TOO_LARGE}")
    if expected_dim is not None and out.shape[1] != expected_dim:
        raise MapaError(f"{where}: data has {out.shape[1]} features, the model expects {expected_dim}")
    return out
