"""The package's one error type: a problem with the user's input, said in one line.

The command line prints it as ``mapa-vae: error: …`` and exits with status 2; the Python API
raises it, so callers catch one type for every bad file, value or name.
"""

from __future__ import annotations

__all__ = ["MapaError", "NoUsableModel"]


class MapaError(ValueError):
    """A problem with the user's input, reported as one line (the CLI exits with code 2)."""


class NoUsableModel(MapaError):
    """Training finished without a usable model (nearly every step skipped as non-finite, no
    finite validation score, or a model scoring far below a decoder that outputs zero).

    The run directory is still written (metrics with the reason, history, the best checkpoint);
    ``result`` holds the :class:`~mapa_vae.training.TrainResult` when there is one. The command
    line prints the reason as one line and exits with status 3.
    """

    exit_code = 3

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result
