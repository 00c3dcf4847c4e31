"""Registries: one named table per kind of interchangeable part.

Every choice a user can make by name (a method, a likelihood, an estimator, a posterior, a code
prior, a posterior engine, …) is an entry in one :class:`Registry`. The training config names
the registry each of its choice fields comes from, so the command-line flags, their ``--help``,
the config validation, the reproduction's variant table and the parametrized tests all read the
same table: adding a part is one class plus one ``register`` call, and it appears everywhere.
An entry's name is written once: ``register(entry)`` reads the entry's own ``name`` attribute
(a class attribute of a method, a likelihood, an :class:`Estimator`), ``@register("name")``
names a function, and lists of names (the estimators a method accepts, say) are read back from
the registry (:meth:`Registry.names` with ``where=``), never written again beside it.

The registries live here, below every other module, so that any module can fill one without
importing the modules that read it; importing :mod:`mapa_vae` fills them all.

>>> COLORS = Registry("colour")
>>> @COLORS.register("red")
... def red() -> str:
...     return "#f00"
>>> COLORS["red"](), list(COLORS)
('#f00', ['red'])
>>> COLORS["blue"]
Traceback (most recent call last):
...
mapa_vae.errors.MapaError: unknown colour 'blue'; choose from red
>>> class Green:
...     name = "green"
>>> COLORS.register(Green) is Green, COLORS.names()
(True, ('red', 'green'))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import MapaError

__all__ = [
    "ACTIVATIONS",
    "BATCHINGS",
    "CODE_PRIORS",
    "ENGINES",
    "ESTIMATORS",
    "LIKELIHOODS",
    "METHODS",
    "NETWORKS",
    "POSTERIORS",
    "PRIOR_FITS",
    "TAILS",
    "Estimator",
    "Registry",
    "estimators_of",
]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, in registration order; unknown names are one-line errors."""

    def __init__(self, kind: str, description: str = "") -> None:
        self.kind = kind
        self.description = description
        self._entries: dict[str, T] = {}

    def register(self, name: str | T, entry: T | None = None) -> Any:
        """``register(entry)`` under the entry's own ``name`` attribute (the one place the name
        is written); ``register(name, entry)`` or ``@register(name)`` above a function (or an
        entry without a ``name``).

        Registering a name twice is an error unless it is the same entry (a module imported
        again); :meth:`unregister` first to replace one.
        """
        if not isinstance(name, str):  # register(entry): its own name
            entry, own = name, getattr(name, "name", None)
            if not isinstance(own, str):
                raise MapaError(f"a {self.kind} registered without a name needs a string class "
                                f"attribute 'name', got {type(entry).__name__}")
            name = own
        if entry is None:
            def decorator(obj: T) -> T:
                self.register(name, obj)
                return obj

            return decorator
        old = self._entries.get(name)
        if old is not None and old is not entry and not _same_definition(old, entry):
            raise MapaError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove ``name`` (tests register toy entries and remove them again)."""
        return self._entries.pop(name)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise MapaError(f"unknown {self.kind} {name!r}; choose from {', '.join(self)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def names(self, where: Callable[[T], bool] | None = None) -> tuple[str, ...]:
        """Every name, in registration order; with ``where``, those whose entry it accepts."""
        return tuple(k for k, v in self._entries.items() if where is None or where(v))

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self)})"


# Filled by the modules named beside each; values are typed there (importing the types here
# would make this module depend on the ones that fill it).
METHODS: Registry[Any] = Registry("method", "inference methods (mapa_vae.methods)")
LIKELIHOODS: Registry[Any] = Registry("likelihood", "observation models (mapa_vae.models.likelihoods)")
ACTIVATIONS: Registry[Any] = Registry("activation", "network nonlinearities (mapa_vae.models.networks)")
NETWORKS: Registry[Any] = Registry("network", "encoder/decoder families (mapa_vae.models.networks)")
ESTIMATORS: Registry[Estimator] = Registry("estimator", "gradient estimators (mapa_vae.inference.objectives, "
                                           ".score_function)")
POSTERIORS: Registry[Any] = Registry("posterior", "MAPA's q(i|n) (mapa_vae.methods.mapa)")
ENGINES: Registry[Any] = Registry("posterior engine", "top-K table builders (mapa_vae.inference.engines)")
PRIOR_FITS: Registry[Any] = Registry("prior fit", "MAPA's 1-D copula prior (mapa_vae.models.copula)")
CODE_PRIORS: Registry[Any] = Registry("code prior", "MAPA's priors for L > 1 (mapa_vae.models.code_priors)")
TAILS: Registry[Any] = Registry("tail proposal", "MAPA's tail draws (mapa_vae.inference.tails)")
BATCHINGS: Registry[Any] = Registry("batching", "an epoch's batch order (mapa_vae.training.batching)")


@dataclass(frozen=True)
class Estimator:
    """An :data:`ESTIMATORS` entry: a gradient estimator of one family of objectives.

    ``family`` names the objectives that take it (``"iwae"``: the reparameterized IWAE bound;
    ``"score-function"``: the SBN's discrete latents); ``objective`` is the class it builds
    where the estimator is a class of its own; ``proposal_signal`` marks a learning signal that
    MAPA's learned index proposal can also use."""

    name: str
    family: str
    description: str
    objective: Any = None
    proposal_signal: bool = False


def estimators_of(family: str) -> tuple[str, ...]:
    """The :data:`ESTIMATORS` of ``family``, in registration order (the first is its default)."""
    return ESTIMATORS.names(where=lambda e: e.family == family)


def _same_definition(old: Any, new: Any) -> bool:
    """Whether ``new`` is ``old``'s definition executed again (a module imported a second time,
    as pytest's doctest collection under ``--import-mode=importlib`` does): same qualified name
    and defining module, or equal plain values."""
    name = getattr(new, "__qualname__", None)
    if name is None:
        return bool(old == new) and type(old) is type(new)
    mod_old, mod_new = getattr(old, "__module__", ""), getattr(new, "__module__", "")
    return (name == getattr(old, "__qualname__", None)
            and (mod_old.endswith(mod_new) or mod_new.endswith(mod_old)))


def choices(registry: Registry[Any] | tuple[str, ...]) -> tuple[str, ...]:
    """The names a choice field accepts, from a registry or a fixed tuple."""
    return registry.names() if isinstance(registry, Registry) else tuple(registry)


