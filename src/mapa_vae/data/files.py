"""A user's data from a ``.npy`` or ``.csv`` file, checked on the way in.

Every problem is one line naming the file and, where it can, the row and column: a missing or
unreadable file, a header in the wrong place, a non-number, a NaN or infinity, a value too large
for float32, a ragged row, too few columns.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

from ..errors import MapaError

__all__ = ["check_array", "load_array", "parse_number"]


FLOAT32_MAX = float(np.finfo(np.float32).max)



_TOO_LARGE = f"is too large: models train in float32, |x| <= {FLOAT32_MAX:.3g}"



def load_array(path: str | Path, expected_dim: int | None = None, min_rows: int = 2) -> np.ndarray:
    """Read a 2-D float array from ``.npy`` or ``.csv`` and check it (see :func:`check_array`).

    A CSV may have one header row of non-numeric names; every other cell must be a number. Its
    separator (``,``, ``;`` or tab) is detected; decimal commas are refused with a hint.
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
    return check_array(arr, str(path), expected_dim, min_rows)



def _read_csv(path: Path) -> np.ndarray:
    # utf-8-sig: a byte-order mark (Excel writes one) must not turn the first row into a "header"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise MapaError(f"{path}: not UTF-8 text (byte {e.start}); save the CSV as UTF-8") from None
    delimiter = _delimiter(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows = [row for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as e:
        raise MapaError(f"{path}: row {reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        raise MapaError(f"{path}: file has no data rows")
    start = 0
    if _is_header(rows[0]):
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
                values[r - start - 1, c] = parse_number(cell)
            except ValueError:
                msg = f"{path}: row {r}, column {c + 1}: {cell.strip()!r} is not a number"
                raise MapaError(msg + (_cell_hint(cell) or _hint(delimiter.join(row)))) from None
            if not np.isfinite(values[r - start - 1, c]):  # name the cell as the file counts it
                raise MapaError(f"{path}: non-finite value {cell.strip()!r} at row {r}, column {c + 1}")
            if abs(values[r - start - 1, c]) > FLOAT32_MAX:
                raise MapaError(f"{path}: value {cell.strip()!r} at row {r}, column {c + 1} {_TOO_LARGE}")
    return values



_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                     r"|[+-]?(?:nan|inf|infinity)", re.IGNORECASE)


def parse_number(cell: str) -> float:
    """A CSV cell as a float, strictly: ASCII decimal notation only (``-1.5``, ``2e-3``, and
    ``nan`` / ``inf``, which the caller then refuses by name). Python's :func:`float` would also
    read ``12_0`` as 120 and the full-width ``１`` as 1; those raise :class:`ValueError` here.

    >>> parse_number(" -1.5e2 ")
    -150.0
    >>> parse_number("12_0")
    Traceback (most recent call last):
    ...
    ValueError: not a decimal number: '12_0'
    """
    text = cell.strip()
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"not a decimal number: {cell!r}")
    return float(text)


def _cell_hint(cell: str) -> str:
    """Why one cell does not parse, where it can be told from the cell alone."""
    text = cell.strip()
    if re.fullmatch(r"[+-]?0[xXoObB][0-9a-fA-F_]+", text):
        return "; hexadecimal, octal and binary literals are not read: write the decimal value"
    if "_" in text and re.fullmatch(r"[+-]?[0-9_.eE+-]+", text):
        return "; digit separators (_) are not read: write 1200 not 1_200"
    if any(not ch.isascii() for ch in text):
        return "; only the ASCII digits 0-9 are read (not full-width or other scripts' digits)"
    return ""


DELIMITERS = (",", ";", "\t")


def _delimiter(text: str, lines: int = 20) -> str:
    """The separator of a CSV: the first of ``,``, ``;``, tab that splits its first ``lines``
    non-blank lines into the same number (> 1) of numeric cells (a first line may be a header);
    ``,`` when none does (one column, or a problem the parser then names)."""
    head = [line for line in text.splitlines() if line.strip()][:lines]
    for d in DELIMITERS:
        try:
            rows = list(csv.reader(head, delimiter=d))
        except csv.Error:  # e.g. a field over the size limit: the parser names the row
            return ","
        if rows and _is_header(rows[0]):
            rows = rows[1:]  # a header
        if rows and len({len(r) for r in rows}) == 1 and len(rows[0]) > 1 and all(map(_is_numeric_row, rows)):
            return d
    return ","


def _hint(line: str) -> str:
    """Why a row may not parse: decimal commas, or separators mixed within the file."""
    if re.search(r"\d,\d+\s*(;|\t|$)", line) and (";" in line or "\t" in line or line.count(",") == 1):
        return "; decimal commas are not supported, write 1.08 not 1,08"
    if sum(d in line for d in DELIMITERS) > 1:
        return "; separate values by one of , ; or tab, the same on every row"
    return ""


def _is_header(row: list[str]) -> bool:
    """A first row of names: no cell a number, and none starting like one (``0x10`` or ``1st``
    are a data row that does not parse, which the parser then names)."""
    return not _is_numeric_row(row) and not any(re.match(r"\s*[+-]?\.?[0-9]", c) for c in row)


def _is_numeric_row(row: list[str]) -> bool:
    try:
        [float(c) for c in row]
    except ValueError:
        return False
    return True



def check_array(arr: np.ndarray, where: str, expected_dim: int | None = None,
                min_rows: int = 2) -> np.ndarray:
    """Return ``arr`` as a C-contiguous float64 ``(n, D)`` array or raise a one-line error.

    Refuses non-numeric dtypes, a rank other than 2, no rows or columns, fewer than
    ``min_rows`` rows, NaN or ±inf or values beyond float32's range (naming the first bad row
    and column), and a ``D`` other than ``expected_dim``. Integer and boolean data are converted
    to float.
    """
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise MapaError(f"{where}: data must be numeric, found dtype {arr.dtype}")
    if arr.ndim != 2:
        raise MapaError(f"{where}: expected a 2-D array (points × features), found shape {arr.shape}")
    if arr.shape[1] == 0:
        raise MapaError(f"{where}: data has zero columns")
    if arr.shape[0] < min_rows:  # training needs two; scoring one point is fine
        raise MapaError(f"{where}: data has {arr.shape[0]} row(s); at least {min_rows} are needed")
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

