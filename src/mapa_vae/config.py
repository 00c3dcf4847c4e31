"""The training config: the one place where every knob, its default and its help are written.

:class:`TrainConfig` is a dataclass whose fields are declared with :func:`knob`: each carries its
help text, and where it is a choice, the registry (:mod:`mapa_vae.registry`) its names come
from, and where it is a number, the range it must lie in. Everything else is generated from it:
the ``train`` command's flags (:func:`mapa_vae.cli.add_config_arguments`), the validation of a
config built in Python, from flags or from a hand-edited ``config.json`` (one schema for all
three), and the sweep's jobs. A run saves its config as ``config.json`` so that ``evaluate`` and
``sample`` rebuild the model from the folder alone.

>>> cfg = TrainConfig(data="circle", method="vae", epochs=10)
>>> cfg.epochs, cfg.mapa_k
(10, 10)
>>> TrainConfig(epochs=0)
Traceback (most recent call last):
...
mapa_vae.errors.MapaError: epochs (--epochs) must be at least 1, got 0
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MapaError
from .registry import (
    ACTIVATIONS,
    BATCHINGS,
    CODE_PRIORS,
    ENGINES,
    ESTIMATORS,
    LIKELIHOODS,
    METHODS,
    NETWORKS,
    POSTERIORS,
    PRIOR_FITS,
    TAILS,
    Registry,
    choices,
)

__all__ = ["ADDED_LATER", "DEVICES", "DTYPES", "TrainConfig", "default_cache_dir", "field_type",
           "flag_name", "knob"]

DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "float64")
_NEW = object()  # a knob that was there from the first release: no old-run value


def default_cache_dir() -> Path:
    """``$MAPA_VAE_CACHE`` or ``~/.cache/mapa-vae``."""
    return Path(os.environ.get("MAPA_VAE_CACHE", Path.home() / ".cache" / "mapa-vae")).expanduser()


def knob(default: Any, help: str, *, choices: Registry[Any] | tuple[str, ...] | None = None,
         low: float | None = None, high: float | None = None, open_low: bool = False,
         open_high: bool = False, short: str | None = None, metavar: str | tuple[str, ...] | None = None,
         cli: bool = True, old: Any = _NEW) -> Any:
    """A config field: its default, help, choices (a registry or a tuple) and range.

    ``low`` / ``high`` bound numbers (and every element of a tuple), closed unless ``open_low``
    / ``open_high``; ``cli=False`` keeps a field out of the ``train`` flags (free-form notes).

    ``old``: a knob added after runs were first written declares here the value those runs had
    (the behaviour before the knob existed). A stored config without the knob is read with it,
    and :func:`~mapa_vae.training.checkpoint.config_json` leaves the knob out at it, so older run
    folders and checkpoints stay readable (:data:`ADDED_LATER` collects them). Every knob added
    from now on declares one (CONTRIBUTING.md, "Add a knob").
    """
    meta = {"help": help, "choices": choices, "low": low, "high": high, "open_low": open_low,
            "open_high": open_high, "short": short, "metavar": metavar, "cli": cli}
    if old is not _NEW:
        meta["old"] = old
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    """The command-line flag of config field ``name``: ``batch_size`` → ``--batch-size``."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as ``config.json`` so a run can be rebuilt from it."""

    # --- what to train, on what
    data: str = knob("figure-8", "a built-in data set or a .npy / .csv file of points")
    method: str = knob("mapa", "the inference method", choices=METHODS)
    samples: int = knob(100, "S: importance samples (IWAE) or tail draws (MAPA)", low=0, short="-S")
    k: int | None = knob(None, "MAPA's top-k; none = 10 % of S (at least 1)", low=1)
    epochs: int = knob(500, "training epochs (the paper's protocol: 500)", low=1)
    batch_size: int = knob(100, "points per gradient step", low=1)
    lr: float = knob(1e-3, "Adam learning rate", low=0.0, open_low=True)
    seed: int = knob(0, "initialization, batching and sampling seed (any non-negative integer)",
                     low=0)
    restarts: int = knob(3, "R: independently initialized copies trained together (copy r seeded "
                         "from (seed, r), so no two seeds share a copy); the best by validation is "
                         "kept (docs/results.md \"Restarts\")", low=1, short="-R", old=1)
    data_seed: int = knob(0, "which draw of a built-in data set, or of a file's split (any "
                          "non-negative integer)", low=0)
    n_train: int | None = knob(None, "training points: a built-in curve or generated image set "
                               "draws this many (none = 1000); a file or fixed-size set takes a "
                               "random subset of its training split (none = all of it)", low=1)
    n_val: int | None = knob(None, "validation points, likewise (none = 500 drawn, or all)", low=1)
    n_test: int | None = knob(None, "test points, likewise (none = 2000 drawn, or all)", low=1)
    # --- the model
    likelihood: str | None = knob(None, "observation model; none = the data set's own (gaussian "
                                  "for a file)", choices=LIKELIHOODS)
    noise_var: float | None = knob(None, "Gaussian noise variance σ²; none = the data set's own "
                                   "(required for a file)", low=0.0, open_low=True)
    rho: float = knob(0.9, "Bernoulli kernel softening", low=0.5, high=1.0, open_low=True,
                      open_high=True)
    kernel_perplexity: float | None = knob(None, "MAPA on binary data: set the kernel's rho so that "
                                           "q(i|n) has this median perplexity (none: --rho)",
                                           low=1.0, open_low=True, old=None)
    latent_dim: int = knob(1, "latent dimension L", low=1)
    hidden: tuple[int, ...] = knob((50, 50, 50), "MLP widths (conv: of the fully connected head)",
                                   low=1)
    activation: str = knob("tanh", "hidden-layer nonlinearity", choices=ACTIVATIONS)
    network: str = knob("mlp", "encoder/decoder family (conv: for images)", choices=NETWORKS)
    channels: tuple[int, ...] = knob((32, 64), "conv: channels of the stride-2 layers", low=1)
    image_shape: tuple[int, ...] | None = knob(None, "conv on your own file: the (C, H, W) of each "
                                               "flattened row", low=1, metavar=("C", "H", "W"))
    # --- MAPA's posterior and the estimators
    posterior: str = knob("kernel", "MAPA's q(i|n)", choices=POSTERIORS)
    posterior_engine: str = knob("auto", "how MAPA's top-K table is built", choices=ENGINES)
    top_k: int | None = knob(None, "neighbours stored per point in MAPA's table; none = all up to "
                             "2048 points, else 512", low=1)
    estimator: str = knob("naive", "IWAE's encoder gradient estimator", choices=ESTIMATORS)
    # --- sigmoid belief networks (--method sbn)
    layers: tuple[int, ...] = knob((200,), "SBN: Bernoulli units per stochastic layer, bottom first, "
                                   "top last (e.g. 200 200 200)", low=1)
    sbn_hidden: tuple[int, ...] | None = knob(None, "SBN: widths of a deterministic MLP (--activation) "
                                              "inside every conditional; none = linear (classic SBN)",
                                              low=1)
    tail: str = knob("per-point", "MAPA's S tail draws: each point's own, or one proposal shared "
                     "by the batch (passes grow with the batch's unique atoms)", choices=TAILS)
    batching: str = knob("random", "an epoch's batches: a random permutation, or points near each "
                         "other (random projection tree; fewer unique atoms per MAPA batch)",
                         choices=BATCHINGS)
    # --- the VAE-DGP's Gaussian-process decoder (--method vae-dgp)
    gp_layers: int = knob(1, "vae-dgp: GP layers in the decoder (2: through a hidden GP layer)",
                          low=1, high=2)
    inducing: int = knob(32, "vae-dgp: inducing points M per GP (cost O(N M²) per epoch)", low=1)
    learn_noise: bool = knob(False, "vae-dgp: learn the Gaussian noise variance (from the data "
                             "set's σ²) instead of fixing it")
    # --- validation, evaluation
    eval_every: int = knob(10, "epochs between validation scores and checkpoints", low=1)
    val_grid: int = knob(2**12, "quadrature points for validation (1-D latent)", low=2)
    test_grid: int = knob(2**16, "quadrature points for the final test (1-D latent)", low=2)
    # --- MAPA's prior after training
    prior_fit: str = knob("map", "MAPA, L = 1: how the N(0, 1) prior is fitted", choices=PRIOR_FITS)
    prior_steps: int = knob(4000, "--prior-fit refit: full-batch steps per new network", low=1)
    code_prior: str = knob("flow", "MAPA, L > 1: the prior fitted to the codes", choices=CODE_PRIORS)
    code_prior_steps: int = knob(2000, "flow: Adam steps (early stopping); mixture: EM iterations",
                                 low=1)
    prior_components: int = knob(10, "mixture code prior: Gaussian components", low=1)
    flow_transforms: int = knob(2, "flow code prior: spline layers", low=1)
    flow_hidden: tuple[int, ...] = knob((64, 64), "flow code prior: hypernetwork widths", low=1)
    kde_bandwidth: float | None = knob(None, "kde code prior: the bandwidth h of N(z; z_n, h² I); "
                                       "none = fitted on held-out codes", low=0.0, open_low=True,
                                       old=None)
    # --- where and how it runs
    cache_dir: str | None = knob(None, "MAPA posterior cache; none = $MAPA_VAE_CACHE or "
                                 "~/.cache/mapa-vae")
    device: str = knob("cpu", "where to train (auto: cuda if available); under torchrun each "
                       "process uses its local GPU", choices=DEVICES)
    threads: int = knob(1, "torch CPU threads (1 is fastest for the small MLPs here and does not "
                        "contend on a busy machine; 0 leaves torch's own setting)", low=0)
    dtype: str = knob("float32", "training precision (float64: for exact comparisons)",
                      choices=DTYPES, old="float32")
    tensorboard: str | None = knob(None, "also log the learning curves to this TensorBoard folder "
                                   "(needs the extra: pip install 'mapa-vae[tensorboard]')",
                                   metavar="DIR", old=None)
    extra: dict[str, Any] = knob({}, "free-form notes kept with the run", cli=False)

    def __post_init__(self) -> None:
        if isinstance(self.data, Path):  # the Python API may name a file by its path
            self.data = str(self.data)
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_field(f, getattr(self, f.name)))
        _check_together(self)

    @property
    def mapa_k(self) -> int:
        """MAPA's ``k``: as given, else 10 % of ``S`` (at least 1), the paper's smaller setting."""
        return self.k if self.k is not None else max(1, round(0.1 * self.samples))

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    @classmethod
    def from_dict(cls, d: Any, where: str = "config") -> TrainConfig:
        """A config from a JSON object: unknown keys and wrong types are one-line errors."""
        if not isinstance(d, dict):
            raise MapaError(f"{where}: expected a JSON object of config keys, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise MapaError(f"{where}: unknown config keys: {', '.join(sorted(unknown))}")
        try:
            return cls(**{**ADDED_LATER, **d})
        except MapaError as e:
            raise MapaError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ADDED_LATER: dict[str, Any] = {f.name: f.metadata["old"] for f in dataclasses.fields(TrainConfig)
                               if "old" in f.metadata}
"""Knobs added after runs were first written, at the value those runs had (each declared by
``knob(..., old=value)`` beside its default): a stored config without one of them is read with
this value, and :func:`~mapa_vae.training.checkpoint.config_json` leaves them out at it, so older
run folders and checkpoints stay readable."""


# ----------------------------------------------------------------------------- validation

_HINTS: dict[str, Any] = {}


def field_type(f: dataclasses.Field[Any]) -> tuple[Any, bool]:
    """A config field's type without ``None``, and whether ``None`` is allowed."""
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(TrainConfig))
    tp = _HINTS[f.name]
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], len(inner) < len(args)
    return tp, False


def _name(f: dataclasses.Field[Any]) -> str:
    return f"{f.name} ({flag_name(f.name)})" if f.metadata.get("cli", True) else f.name


def _scalar(f: dataclasses.Field[Any], tp: Any, value: Any) -> Any:
    """``value`` as type ``tp`` (int, float, str), checked against the field's range."""
    if tp is bool:
        if not isinstance(value, bool):
            raise MapaError(f"{_name(f)} must be true or false, got {value!r}")
        return value
    kind = {int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, tp) or isinstance(value, bool):
        raise MapaError(f"{_name(f)} must be {kind}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise MapaError(f"{_name(f)} must be a finite number, got {value!r}")
    m = f.metadata
    if tp in (int, float):
        low, high = m.get("low"), m.get("high")
        if low is not None and (value <= low if m.get("open_low") else value < low):
            raise MapaError(f"{_name(f)} must be {'above' if m.get('open_low') else 'at least'} "
                            f"{low:g}, got {value!r}")
        if high is not None and (value >= high if m.get("open_high") else value > high):
            raise MapaError(f"{_name(f)} must be {'below' if m.get('open_high') else 'at most'} "
                            f"{high:g}, got {value!r}")
    if m.get("choices") is not None and value not in choices(m["choices"]):
        kind = m["choices"].kind if isinstance(m["choices"], Registry) else "choice"
        raise MapaError(f"{_name(f)}: unknown {kind} {value!r}; choose from "
                        f"{', '.join(choices(m['choices']))}")
    return value


def _check_field(f: dataclasses.Field[Any], value: Any) -> Any:
    tp, optional = field_type(f)
    if value is None:
        if optional:
            return None
        raise MapaError(f"{_name(f)} must be given, got null")
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or isinstance(value, str):
            raise MapaError(f"{_name(f)} must be a list of integers, got {value!r}")
        if not value:
            raise MapaError(f"{_name(f)} must not be empty")
        if f.name == "image_shape" and len(value) != 3:
            raise MapaError(f"{_name(f)} must be three integers (C, H, W), got {list(value)}")
        return tuple(_scalar(f, typing.get_args(tp)[0], v) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise MapaError(f"{_name(f)} must be a JSON object, got {value!r}")
        return dict(value)
    return _scalar(f, tp, value)


# Below this σ², float32 rounding of the data alone (|x| · 2⁻²⁴ per coordinate) costs thousands of
# nats per point in the Gaussian log-density, and its exponent overflows: nothing can be learned.
MIN_NOISE_VAR = {"float32": 1e-10, "float64": 1e-24}


def _check_together(cfg: TrainConfig) -> None:
    """Checks of one field against another, and of what the run will write, before any work."""
    if not cfg.data.strip():
        raise MapaError("data (--data) is empty; give a built-in data set or a file")
    if cfg.tensorboard is not None and not cfg.tensorboard.strip():
        raise MapaError("tensorboard (--tensorboard) is empty; give a folder")
    if cfg.image_shape is not None and cfg.network != "conv":
        raise MapaError(f"image_shape (--image-shape) only shapes the conv network's input; with "
                        f"--network {cfg.network} it would be ignored: drop it or add --network conv")
    floor = MIN_NOISE_VAR[cfg.dtype]
    if cfg.noise_var is not None and cfg.noise_var < floor:
        raise MapaError(f"noise_var (--noise-var) must be at least {floor:g} in {cfg.dtype} (below "
                        f"it rounding of the data dominates the log-density), got {cfg.noise_var:g}")
    try:
        json.dumps(cfg.extra)
    except (TypeError, ValueError) as e:
        raise MapaError(f"extra: must hold only JSON values (it is written to config.json): {e}") from None
