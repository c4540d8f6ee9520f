"""This CPU's row of docs/benchmarks.md's precision table: what ``auto`` resolves to, bf16 and fp32
matrix-product rates, and the demo's training steps in a time cap at ``auto``, fp32 and bf16.

    python benchmarks/precision_by_cpu.py                  # this CPU
    python benchmarks/precision_by_cpu.py --cap 60 --skip-bf16-demo
    # an AVX2-only CPU on an AVX-512 one: ATen's and oneDNN's kernels capped at AVX2
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/precision_by_cpu.py

The demo runs go one after the other (``demo-plus``, as ``make demo`` trains it, nothing saved).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from timing import machine  # benchmarks/timing.py, beside this script

from msf.config import apply_overrides
from msf.precision import native_bf16, resolve_precision
from msf.presets import preset
from msf.training.train import train


def matmul_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - t0) / 1e9


def demo_steps(precision: str, cap: float) -> tuple[int, float]:
    cfg = apply_overrides(preset("demo-plus"), [f"train.precision={precision}", "train.tensorboard=false"])
    warnings.filterwarnings("ignore", message="the time cap")  # the cap is the point here
    r = train(cfg, device="cpu", progress=False, save=False, max_seconds=cap)
    return r.steps, r.images_per_second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap", type=float, default=60.0, help="seconds of demo training per precision")
    ap.add_argument("--skip-bf16-demo", action="store_true", help="where bf16 is emulated it crawls")
    args = ap.parse_args()
    native, why = native_bf16("cpu")
    auto = resolve_precision("auto", "cpu", say=False)
    print(f"# precision on this CPU: {machine()}, {time.strftime('%Y-%m-%d')}\n")
    print(f"- capability {torch.backends.cpu.get_cpu_capability()}; native bf16: {native} ({why}); "
          f"auto -> {auto}")
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16, seconds=2.0)
    print(f"- 1024^3 matrix product: fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s "
          f"(bf16 / fp32 {bf16 / fp32:.3g}x)\n")
    print(f"| demo-plus, {args.cap:g} s cap | steps | images/s |\n|---|---|---|")
    for p in ["auto", "fp32"] + ([] if args.skip_bf16_demo else ["bf16"]):
        steps, rate = demo_steps(p, args.cap)
        print(f"| {p}{f' ({auto})' if p == 'auto' else ''} | {steps} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
