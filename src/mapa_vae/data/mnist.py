"""The standard statically binarized MNIST (Salakhutdinov & Murray 2008), from the user's file.

The file is a NumPy ``.npz`` without pickles: ``train``, ``valid``, ``test`` ``(N, 98)`` uint8,
each row 784 binary pixels packed by ``np.packbits(axis=1)`` (28 × 28, row-major), and optional
``*_labels`` ``(N,)``. Its own 50 000 / 10 000 / 10 000 split is used as it is: nothing is
shuffled, subsampled or downloaded. Pass it as ``--data PATH.npz`` (with ``--likelihood
bernoulli``); :func:`~mapa_vae.data.load_dataset` dispatches ``.npz`` files here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import MapaError
from .dataset import Dataset

__all__ = ["MNIST_PIXELS", "load_binarized_mnist"]

MNIST_PIXELS = 28 * 28
_SPLITS = ("train", "valid", "test")


def _unpack(path: Path, data: np.lib.npyio.NpzFile, key: str) -> torch.Tensor:
    if key not in data:
        raise MapaError(f"{path}: no {key!r} array (a binarized MNIST file has {', '.join(_SPLITS)})")
    packed = data[key]
    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] * 8 < MNIST_PIXELS:
        raise MapaError(f"{path}: {key!r} must be uint8 (N, 98) packed bits, got {packed.dtype} "
                        f"{packed.shape}")
    bits = np.unpackbits(packed, axis=1)[:, :MNIST_PIXELS]
    return torch.from_numpy(bits.astype(np.float64))


def load_binarized_mnist(path: str | Path) -> Dataset:
    """The file's train / valid / test splits as ``(N, 784)`` float64 in {0, 1}; codes: labels.

    >>> import tempfile, os
    >>> rows = np.packbits(np.eye(3, 784, dtype=np.uint8), axis=1)
    >>> f = os.path.join(tempfile.mkdtemp(), "m.npz")
    >>> np.savez(f, train=rows, valid=rows[:1], test=rows[:2])
    >>> ds = load_binarized_mnist(f)
    >>> tuple(ds.train.shape), float(ds.train.sum()), ds.z_train is None
    ((3, 784), 3.0, True)
    """
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise MapaError(f"{path}: not a readable .npz file ({e})") from None
    with data:
        train, val, test = (_unpack(path, data, k) for k in _SPLITS)
        labels = [torch.from_numpy(data[f"{k}_labels"].astype(np.int64))[:, None]
                  if f"{k}_labels" in data else None for k in _SPLITS]
    return Dataset(path.stem, train, val, test, None, *labels)
