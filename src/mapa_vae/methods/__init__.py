"""Methods: each composes a model, an objective, a validation score and a finalization step,
and is one entry in :data:`~mapa_vae.registry.METHODS` (importing this package registers them).
"""

from __future__ import annotations

from ..registry import METHODS
from .base import Architecture, Method
from .gaussian import GaussianEncoderMethod, IWAEMethod, VAEMethod
from .mapa import MapaMethod
from .sbn import SBNMethod
from .vae_dgp import VAEDGPMethod

__all__ = ["METHODS", "Architecture", "GaussianEncoderMethod", "IWAEMethod", "MapaMethod", "Method",
           "SBNMethod", "VAEDGPMethod", "VAEMethod"]
