"""Many processes with torch.distributed: ``torchrun --nproc_per_node N -m msf train ...``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; we start the process group (NCCL
on CUDA, gloo on the CPU) and give each process its device. A plain ``python``
run is a world of one and touches nothing in torch.distributed. Also here: what
training runs its networks as (DDP or FSDP2, compiled), gathering FSDP's shards, and
turning Ctrl-C / SIGTERM into a stop at a step boundary.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from msf.config import ConfigError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from msf.config import Config, TrainConfig
    from msf.method.pipeline import MSFPipeline


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


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a request to stop at the next step boundary.

    A second Ctrl-C interrupts at once (the last checkpoint stays intact). Each process sees its own
    signals; the training step agrees on a stop over all of them (:func:`any_rank`).
    """

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        print(f"\n[msf] {name}: saving a checkpoint at the end of this step, then stopping "
              "(Ctrl-C again to abort now)", flush=True)

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for sig, old in self._old.items():
                signal.signal(sig, old)


def full_state() -> StateDictOptions:
    """Options for whole (unsharded) state dicts on the CPU, gathered from FSDP's shards: what a
    checkpoint file and the model directory hold. (Imported here on use: torch's module takes 0.5 s.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(net: nn.Module, precision: str = "fp32") -> None:
    """FSDP2: shard each transformer block, then the rest of the network.

    With ``precision="bf16"`` the weights are gathered in bf16 (half the traffic; autocast
    would round them to bf16 for its matrix products anyway) and the gradients are reduced
    in fp32. Inputs are not cast, so the times and the residual stream stay as autocast
    leaves them.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    for block in net.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(net, mp_policy=mp)


def shard_scales(networks: Sequence[nn.Module], emas: Sequence[nn.Module], scales: list[int], precision: str,
                 world: World) -> None:
    """FSDP2 over the trained scales' networks and their EMA copies (``train.fsdp``)."""
    if not world.distributed:
        raise ConfigError("train.fsdp=true needs several processes: launch with torchrun")
    for k in scales:
        shard(networks[k], precision)
        shard(emas[k])  # never runs forward: its weights stay fp32


def wrap(net: nn.Module, tc: TrainConfig, world: World) -> nn.Module:
    """What the step calls for a scale's network: DDP across processes (FSDP shards in place), compiled."""
    if world.distributed and not tc.fsdp:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[world.device.index] if world.device.type == "cuda" else None,
            gradient_as_bucket_view=True)  # the gradients live in the buckets: one copy, not two
    # static shapes: the scales' networks share DiT.forward, so the second scale's other token grid would
    # otherwise recompile it with symbolic sizes; this way each scale compiles once, for its own sizes
    return torch.compile(net, dynamic=False) if tc.compile else net


def gathered(ema: MSFPipeline, cfg: Config, world: World) -> MSFPipeline | None:
    """The EMA pipeline with whole (unsharded) weights, on the main process; None elsewhere.

    Without FSDP that is ``ema`` itself; with FSDP the shards are gathered (collective).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from msf.method.pipeline import MSFPipeline

    if not cfg.train.fsdp:
        return ema if world.is_main else None
    states = [get_model_state_dict(s, options=full_state()) for s in ema.networks]
    if not world.is_main:
        return None
    plain = MSFPipeline(cfg.model, autoencoder=ema.autoencoder)
    for net, st in zip(plain.networks, states):
        net.load_state_dict(st)
    return plain.to(world.device).requires_grad_(False).eval()
