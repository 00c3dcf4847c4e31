"""Training: one readable loop, resumable checkpoints, runs rebuilt from their folder,
and data-parallel training under torchrun.
"""

from __future__ import annotations

from .batching import (
    local_batches,
    random_batches,
)
from .distributed import (
    Parallel,
    init_parallel,
    resolve_device,
)
from .loop import (
    TrainResult,
    evaluate_final,
    train,
)
from .runs import (
    Run,
    load_run,
)

__all__ = [
    "Parallel",
    "Run",
    "TrainResult",
    "evaluate_final",
    "init_parallel",
    "load_run",
    "local_batches",
    "random_batches",
    "resolve_device",
    "train",
]
