"""KID at the sizes msf compare scores (1,000 samples against the 935 held-out emoji, d = 2048): the
kernel matrices computed once and each subset a block of them, against three m x m x d products per
subset (torch-fidelity's way, msf's path for sets too large to hold the kernels). Both in one run,
alternating, the best of a few; the values must agree to rounding.

    python benchmarks/kid.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from timing import machine  # benchmarks/timing.py, beside this script

import msf.evaluation.distances as distances


def timed(n1: int, n2: int, limit: int, repeats: int, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    distances.KERNEL_LIMIT = limit
    best, value = float("inf"), float("nan")
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = distances.kid(x[:n1], y[:n2])[0]
        best = min(best, time.perf_counter() - t0)
    return best, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000x935,2000x935", help="samples x reference, comma-separated")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    default = distances.KERNEL_LIMIT
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    x = rng.normal(size=(max(s[0] for s in sizes), 2048)).astype(np.float32)
    y = (rng.normal(size=(max(s[1] for s in sizes), 2048)) + 0.1).astype(np.float32)
    print(machine())
    print("| samples | reference | per subset s | kernels once s | speed-up | relative difference |")
    print("|---|---|---|---|---|---|")
    for n1, n2 in sizes:
        slow, a = timed(n1, n2, 0, args.repeats, x, y)
        fast, b = timed(n1, n2, default, args.repeats, x, y)
        print(f"| {n1} | {n2} | {slow:.2f} | {fast:.2f} | {slow / fast:.1f}x | {abs(a - b) / abs(a):.1e} |")
    distances.KERNEL_LIMIT = default


if __name__ == "__main__":
    main()
