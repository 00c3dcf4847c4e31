"""``python -m mapa_vae``: the same command line as ``mapa-vae``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
