"""Methods: each composes a model, an objective, a validation score and a finalization step,
and is one entry in :data:`~mapa_vae.registry.METHODS`.

Importing this package imports every module in it (:func:`pkgutil.iter_modules`), so a new
method is one new module here, with its class and its ``METHODS.register(TheMethod())`` line;
nothing else is edited to make it known (CONTRIBUTING.md, "Add a method").
"""

from __future__ import annotations

import importlib
import pkgutil

from ..registry import METHODS
from .base import Architecture, Method
from .gaussian import GaussianEncoderMethod, IWAEMethod, VAEMethod
from .mapa import MapaMethod
from .sbn import SBNMethod
from .vae_dgp import VAEDGPMethod

__all__ = ["METHODS", "Architecture", "GaussianEncoderMethod", "IWAEMethod", "MapaMethod", "Method",
           "SBNMethod", "VAEDGPMethod", "VAEMethod"]

for _module in pkgutil.iter_modules(__path__):  # every method module registers its own entry
    importlib.import_module(f"{__name__}.{_module.name}")
