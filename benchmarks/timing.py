"""What the benchmarks share: interleaved timing (on a shared machine, compare things run in
turn) and the line that names the machine a table was measured on."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine() -> str:
    """The CPU's model, its bf16 matrix instructions, threads and load: ratios between models
    depend on them (with AMX, products are fast and the other work weighs more)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    isa = ("AMX" if "amx_bf16" in flags else "AVX512-BF16, no AMX" if "avx512_bf16" in flags
           else "no bf16 instructions" if flags else "bf16 instructions unknown")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{name} ({isa}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"load average {load:.1f}")


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, run in turn ``repeats`` times after one warm-up each.

    The warm-up absorbs compilation and first-call allocation; a long one is reported.
    A function that returns a float has timed itself (to leave its set-up out): that is
    its time.
    """
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        if time.perf_counter() - t0 > 20:
            print(f"(warm-up of {name}: {time.perf_counter() - t0:.0f} s)")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            own = fn()
            times[name].append(own if isinstance(own, float) else time.perf_counter() - t0)
    return times
