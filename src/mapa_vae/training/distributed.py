"""Devices and data-parallel training with PyTorch's own distributed engine.

Launched by ``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` in the environment), every
process holds the whole model and the same global batch order; each takes its contiguous share
of every global batch, scores it, and the gradients are summed across processes with one
``all_reduce`` per step. Each process's loss is its share of the *global* mean, so the summed
gradient is exactly the gradient of the global batch's mean bound, what one process would
compute (this is DDP's gradient averaging; the objectives call the encoder and decoder
directly, so the reduction is done here rather than through a ``DistributedDataParallel``
wrapper's forward). Decisions to skip a step are agreed by all processes, so the replicas never
diverge. Only rank 0 writes files and shows progress. Without ``torchrun`` it is a no-op.

    torchrun --nproc_per_node=4 -m mapa_vae.cli train --data sprites --device cuda ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import DEVICES
from ..errors import MapaError

__all__ = ["Parallel", "init_parallel", "resolve_device"]



def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` (the process's local GPU under torchrun) or ``auto`` (cuda if present)."""
    if name not in DEVICES:
        raise MapaError(f"unknown device {name!r}; choose from {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise MapaError("--device cuda: no CUDA device is available (torch was built "
                            f"{'with' if torch.backends.cuda.is_built() else 'without'} CUDA)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass
class Parallel:
    """This process's place in a data-parallel group (``world = 1``: a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, index: Tensor) -> Tensor:
        """This process's contiguous share of a global batch of indices."""
        if self.world == 1:
            return index
        return index.tensor_split(self.world)[self.rank]

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on every process."""
        if self.world == 1:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=device)
        dist.all_reduce(t)
        return bool(t.item() == 0)

    def sum_scalar(self, value: float) -> float:
        """``value`` summed over processes (for logging)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def sum_gradients(self, module: torch.nn.Module) -> None:
        """Sum every gradient across processes (each loss is already its share of the mean)."""
        if self.world == 1:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_parallel(device: str) -> Parallel:
    """Join the process group ``torchrun`` set up (gloo on CPU, nccl on GPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Parallel()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if resolve_device(device, local_rank).type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return Parallel(rank, world, local_rank)
