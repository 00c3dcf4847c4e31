"""The package's one error type: a problem with the user's input, said in one line.

The command line prints it as ``mapa-vae: error: …`` and exits with status 2; the Python API
raises it, so callers catch one type for every bad file, value or name.
"""

from __future__ import annotations

__all__ = ["MapaError"]


class MapaError(ValueError):
    """A problem with the user's input, reported as one line (the CLI exits with code 2)."""
