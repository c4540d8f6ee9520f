"""Many processes with torch.distributed: ``torchrun --nproc_per_node N -m msf train ...``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; we start the process group (NCCL
on CUDA, gloo on the CPU) and give each process its device. A plain ``python``
run is a world of one and touches nothing in torch.distributed.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

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
    if device is not None and device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device {device!r}: msf runs on 'cpu' or 'cuda' (or 'cuda:N'); other devices "
                         "(mps, xpu) are not supported yet")
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda}); use --device cpu")
    if device is None and not use_cuda and gpu_present():
        raise ValueError(
            f"an NVIDIA GPU is present ({gpu_present()}) but this torch cannot use it (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}): check the driver with nvidia-smi "
            "and the wheel's CUDA version, or pass --device cpu to run on the CPU anyway")
    if use_cuda:
        dev = torch.device("cuda", local_rank if size > 1 else torch.device(device or "cuda").index or 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        # rank 0 works alone for long stretches (checkpoint writes, sample grids, sweep metrics): the
        # others wait in the next collective longer than NCCL's default 10 minutes
        minutes = float(os.environ.get("MSF_DIST_TIMEOUT_MINUTES", "60"))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=minutes),
                                device_id=dev if use_cuda else None)
    return World(rank=rank, size=size, local_rank=local_rank, device=dev)


def gpu_present() -> str | None:
    """The device file of an NVIDIA GPU the kernel knows about, whatever torch makes of it
    (None when ``CUDA_VISIBLE_DEVICES`` hides every GPU on purpose)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return None
    return next((p for p in ("/dev/nvidia0", "/proc/driver/nvidia/version") if os.path.exists(p)), None)


def describe(device: torch.device) -> str:
    """One line naming where the work runs, for the start of a run."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{device} ({p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability "
                f"{p.major}.{p.minor}; torch {torch.__version__}, CUDA {torch.version.cuda})")
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'' if n == 1 else 's'}; torch {torch.__version__})"


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        gc.collect()  # sharded tensors in reference cycles would outlive the group and abort the exit
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


def any_rank(flags: Sequence[bool | torch.Tensor], world: World) -> list[bool]:
    """Each flag, True on every process if it is True on any (a NaN loss, a Ctrl-C seen by one
    rank, one rank's time limit). One all-reduce and one wait on the host for all of them."""
    t = torch.stack([torch.as_tensor(f, dtype=torch.float32).to(world.device).reshape(()) for f in flags])
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]
