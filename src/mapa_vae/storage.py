"""Files that must never be half-written, and tensors that must never run code when read.

Everything mapa-vae writes (posterior caches, checkpoints, metrics, surrogate weights) goes
through :func:`atomic_write`: the bytes land in a temporary file in the same folder, are
flushed to disk, and only then renamed over the target, so a crash leaves either the old file
or the new one, never a torn one. Tensors are read with ``torch.load(weights_only=True)`` and
arrays with ``np.load(allow_pickle=False)``: loading never executes pickled code.

A process killed (SIGKILL, power loss) while writing can leave its temp file behind: a hidden
``.<name>.<random>.mapa-vae.tmp`` beside the target. Nothing ever reads one; the next successful
write in that folder deletes such files once they are :data:`STALE_TEMP_SECONDS` old.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle  # only for its exception type: nothing here unpickles
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .errors import MapaError

__all__ = [
    "STALE_TEMP_SECONDS",
    "TEMP_SUFFIX",
    "array_digest",
    "atomic_write",
    "load_tensors",
    "read_json",
    "remove_stale_temps",
    "save_tensors",
    "strict_json",
    "write_json",
]


_UMASK = os.umask(0)
os.umask(_UMASK)

TEMP_SUFFIX = ".mapa-vae.tmp"
STALE_TEMP_SECONDS = 3600.0  # a temp file untouched this long belongs to a dead writer


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Open a binary temp file beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temp file is removed and ``path`` is left as it was. After a success,
    stale temp files of killed writers in the same folder are removed (:func:`remove_stale_temps`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:  # an output path the user cannot write to: say which, in one line
        raise MapaError(f"{path}: cannot write there ({e.strerror or type(e).__name__})") from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # disk full on write: name the file
            e.filename = str(path)
        raise
    remove_stale_temps(path.parent)


def remove_stale_temps(folder: str | Path, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete the temp files of :func:`atomic_write` in ``folder`` untouched for ``max_age`` s.

    Only a writer killed mid-write leaves one; a live writer keeps its file fresh and finishes
    within seconds. Other files, hidden or not, are never touched. Returns what was deleted.
    """
    cutoff = time.time() - max_age
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # gone already (another cleaner) or not ours to delete
            continue
    return removed


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None``, so strict parsers read it.

    In a dict, a replaced value ``key`` gains a sibling ``key_nonfinite`` saying what it was:

    >>> strict_json({"kl": float("inf"), "ok": 1.5, "h": [float("nan")]})
    {'kl': None, 'kl_nonfinite': 'inf', 'ok': 1.5, 'h': [None]}
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        out: dict[Any, Any] = {}
        for k, v in obj.items():
            out[k] = strict_json(v)
            if isinstance(v, float) and not math.isfinite(v):
                out[f"{k}_nonfinite"] = "nan" if math.isnan(v) else "inf" if v > 0 else "-inf"
        return out
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON (non-finite floats as ``null``, see
    :func:`strict_json`), atomically."""
    text = json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False)
    with atomic_write(path) as f:
        f.write((text + "\n").encode())


def read_json(path: str | Path) -> Any:
    """Read a JSON file, naming the file in the error if it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MapaError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise MapaError(f"{path}: not valid JSON ({e.msg}: line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise MapaError(f"{path}: not valid JSON (byte {e.start} is not UTF-8)") from None


def save_tensors(path: str | Path, tensors: Mapping[str, Any]) -> None:
    """Save a (nested) dict of tensors and plain values with ``torch.save``, atomically."""
    buffer = io.BytesIO()
    torch.save(dict(tensors), buffer)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())


def load_tensors(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load what :func:`save_tensors` wrote, refusing anything but tensors and plain values."""
    path = Path(path)
    if not path.is_file():
        raise MapaError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler met a global or opcode
        raise MapaError(
            f"{path}: refused: it holds Python objects, not only tensors and plain values, and "
            f"unpickling them could run code ({_unpickler_detail(str(e))})"
        ) from None
    except Exception as e:  # torch raises many types for corrupt or truncated files
        text = _ANSI.sub("", str(e)).strip()
        first = text.splitlines()[0].split(". ")[0][:200] if text else type(e).__name__
        raise MapaError(f"{path}: not a readable tensor file; corrupt or truncated? ({first})") from None
    if not isinstance(obj, dict):
        raise MapaError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _unpickler_detail(message: str) -> str:
    """The one useful line of torch's weights-only refusal, e.g. ``Unsupported global: GLOBAL os.system``."""
    text = _ANSI.sub("", message)
    _, found, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in rest.splitlines() if line.strip()] if found else []
    if not lines:
        return "not a weights-only file"
    return lines[0].split(" was not an allowed global")[0].rstrip(".")


def array_digest(*arrays: np.ndarray | torch.Tensor, extra: Mapping[str, Any] | None = None) -> str:
    """SHA-256 over the canonical bytes, shape and dtype of each array, plus ``extra`` as JSON.

    Canonical means C-contiguous and little-endian, so the same values give the same digest
    whatever their memory layout.

    >>> a = np.arange(6.0).reshape(2, 3)
    >>> array_digest(a) == array_digest(np.asfortranarray(a))
    True
    >>> array_digest(a) == array_digest(a.astype(np.float32))
    False
    """
    h = hashlib.sha256()
    for a in arrays:
        arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        arr = np.ascontiguousarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        h.update(json.dumps([list(arr.shape), arr.dtype.str]).encode())
        h.update(arr.tobytes())
    if extra is not None:
        h.update(json.dumps(dict(extra), sort_keys=True, default=str).encode())
    return h.hexdigest()
