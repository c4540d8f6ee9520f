"""Interleaved timing for the benchmarks: on a shared machine, compare things run in turn."""

from __future__ import annotations

import time
from collections.abc import Callable


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
