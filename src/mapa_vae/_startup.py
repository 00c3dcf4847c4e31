"""A Ctrl-C while the package is still importing (torch takes seconds) is one line, not a
54-line traceback of import machinery.

Imported first by the package's ``__init__``, before anything heavy: it wraps
:func:`sys.excepthook` so that an unhandled exception raised while a ``mapa_vae`` module was
executing its top level prints ``mapa-vae: interrupted while starting`` when it is a
:class:`KeyboardInterrupt`, or when Ctrl-C was pressed during the imports (some extension
modules turn the interrupt into an ``ImportError`` or a ``ValueError`` of their own). Every
other exception goes to the hook there was before. Until :func:`imported` is called at the end of
the package's imports, SIGINT is handled as Python's default handler does (raise
:class:`KeyboardInterrupt`), noting that it came. Once the command is running,
:func:`mapa_vae.cli.main` catches interrupts itself.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

__all__ = ["imported", "install"]

# Only small modules until the hook is in place (not typing: it imports re and enum): a Ctrl-C
# may come while this very module imports.
_PACKAGE = os.path.dirname(os.path.realpath(__file__))
_interrupted = False  # Ctrl-C came while the package was importing


def _note_interrupt(signum: int, frame: object) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def _while_importing(tb: TracebackType | None) -> bool:
    """Whether the traceback passes through the top level of one of this package's modules."""
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "<module>" and os.path.realpath(code.co_filename).startswith(_PACKAGE):
            return True
        tb = tb.tb_next
    return False


def install() -> None:
    """Wrap :func:`sys.excepthook` (once) as the module docstring says."""
    previous = sys.excepthook
    if getattr(previous, "_mapa_vae", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if (issubclass(kind, KeyboardInterrupt) or _interrupted) and _while_importing(tb):
            print("mapa-vae: interrupted while starting", file=sys.stderr, flush=True)
            os._exit(130)  # as the shell reports a Ctrl-C; nothing was written yet
        previous(kind, value, tb)

    hook._mapa_vae = True  # type: ignore[attr-defined]
    sys.excepthook = hook
    import signal

    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _note_interrupt)
    except ValueError:  # not the main thread: the interrupt is not ours to handle
        pass


def imported() -> None:
    """The package's imports are done: give SIGINT back to Python's default handler, and raise
    the :class:`KeyboardInterrupt` that an import swallowed (a bare ``except:`` in a dependency)."""
    import signal

    if signal.getsignal(signal.SIGINT) is _note_interrupt:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _interrupted:
        raise KeyboardInterrupt


install()
