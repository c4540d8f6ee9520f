"""KID's subset block sums: m x m copies of each subset's kernel blocks (msf before 2026-11-30) against
products with the subsets' indicator vectors (msf.evaluation.distances.kid now), 1,000 samples against 935 and
1,870 references, d = 2048; alternating, the best of 2, in one run. The values must agree to rounding.

    python benchmarks/kid_block_sums.py     # ~15 s on 2 cores
"""

import time

import numpy as np
from timing import machine  # benchmarks/timing.py, beside this script

from msf.evaluation.distances import kid, poly_kernel


def block_copies(f1, f2, subsets=100, m=1000, seed=2020):
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    n1, n2 = len(f1), len(f2)
    m = min(m, n1, n2)
    k11, k22, k12 = poly_kernel(f1, f1), poly_kernel(f2, f2), poly_kernel(f1, f2)
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(subsets):
        i, j = rng.choice(n1, m, replace=False), rng.choice(n2, m, replace=False)
        a, b, c = k11[np.ix_(i, i)], k22[np.ix_(j, j)], k12[np.ix_(i, j)]
        out.append((a.sum() - np.trace(a) + b.sum() - np.trace(b)) / (m * (m - 1)) - 2 * c.sum() / (m * m))
    return float(np.mean(out))


def main() -> None:
    print(machine())
    print("| samples | reference | block copies s | indicator products s | speed-up | relative difference |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n2 in (935, 1870):
        x, y = rng.normal(size=(1000, 2048)), rng.normal(0.05, 1, size=(n2, 2048))
        times: dict[str, list[float]] = {"old": [], "new": []}
        values = {}
        for _ in range(2):
            for name, f in (("old", block_copies), ("new", lambda a, b: kid(a, b)[0])):
                t0 = time.perf_counter()
                values[name] = f(x, y)
                times[name].append(time.perf_counter() - t0)
        old, new = min(times["old"]), min(times["new"])
        diff = abs(values["old"] - values["new"]) / abs(values["old"])
        print(f"| 1000 | {n2} | {old:.2f} | {new:.2f} | {old / new:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
