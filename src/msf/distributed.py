"""Many processes with torch.distributed: ``torchrun --nproc_per_node N -m msf train ...``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; we start the process group (NCCL
on CUDA, gloo on the CPU) and give each process its device. A plain ``python``
run is a world of one and touches nothing in torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: str | None = None) -> World:
    """Start the process group if torchrun launched us; pick this process's device.

    ``device`` is "cpu", "cuda" or None (CUDA when available).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        dev = torch.device("cuda", local_rank if size > 1 else torch.device(device or "cuda").index or 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return World(rank=rank, size=size, local_rank=local_rank, device=dev)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def mean_over_ranks(values: torch.Tensor, world: World) -> torch.Tensor:
    """Average a tensor over processes (for logging; gradients are averaged by DDP)."""
    if world.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= world.size
    return values


def any_rank(flag: bool, world: World) -> bool:
    """True on every process if ``flag`` is True on any (e.g. a Ctrl-C seen by one rank)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
