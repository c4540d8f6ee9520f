"""The real training loop (``msf.training.train``) eager against ``train.compile=true``:
images/s per log window.

A compiled run's first window carries the compilation (each scale's network once: seconds for the demo
on a CPU, about half a minute per network at the paper's sizes on a GPU); the steady rate is the median
of the windows after ``--skip``. The two runs go one after the other in one process, never side by side;
compare the ratio, not the rates, across machines.

    python benchmarks/compile_loop.py --preset demo --steps 240 --log-every 20
    python benchmarks/compile_loop.py --preset demo-paper-ratio --paper-networks --device cuda \\
        --batch 128 --steps 100 --log-every 10
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from timing import machine  # benchmarks/timing.py, beside this script

from msf.config import apply_overrides
from msf.presets import preset
from msf.training.train import train

# the paper's networks (144 and 256 tokens at patch 2) on demo-paper-ratio's 24 -> 32 px emoji
PAPER_NETWORKS = ["model.scales.0.width=1152", "model.scales.0.depth=18", "model.scales.0.heads=16",
                  "model.scales.0.patch_size=2", "model.scales.1.width=1280", "model.scales.1.depth=10",
                  "model.scales.1.heads=16", "model.scales.1.patch_size=2"]


def window_rates(log: Path) -> list[tuple[int, float]]:
    """(step, images/s) of each log line of a run's log.txt."""
    found = re.findall(r"^step (\d+) .*images_per_second=([0-9.e+-]+)", log.read_text(), re.M)
    return [(int(s), float(r)) for s, r in found]


def run(mode: str, args: argparse.Namespace, out: Path) -> tuple[list[tuple[int, float]], float]:
    torch._dynamo.reset()
    cfg = apply_overrides(preset(args.preset), [
        f"train.steps={args.steps}", f"train.log_every={args.log_every}", "train.tensorboard=false",
        f"train.out_dir={out / mode}", f"train.compile={mode == 'compiled'}", "train.ckpt_every=0",
        *([f"train.batch_size={args.batch}"] if args.batch else []),
        *(PAPER_NETWORKS if args.paper_networks else []), *args.overrides])
    t0 = time.perf_counter()
    train(cfg, device=args.device, progress=False, overwrite=True)
    return window_rates(out / mode / "log.txt"), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--batch", type=int, default=0, help="train.batch_size (0: the preset's)")
    ap.add_argument("--skip", type=int, default=2, help="windows left out of the steady rate")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--paper-networks", action="store_true", help="the paper's network sizes on the preset")
    ap.add_argument("overrides", nargs="*", help="key=value, as msf train takes them")
    args = ap.parse_args()
    print(f"# the training loop, eager against compiled: preset {args.preset}"
          f"{' with the paper networks' if args.paper_networks else ''}, {args.steps} steps, "
          f"windows of {args.log_every}, {machine()}, {time.strftime('%Y-%m-%d')}\n")
    steady = {}
    with tempfile.TemporaryDirectory(prefix="msf-compile-") as d:
        print("| mode | run s | first window img/s | steady img/s (median of windows after the first "
              f"{args.skip}) | every window |\n|---|---|---|---|---|")
        for mode in ("eager", "compiled"):
            rates, seconds = run(mode, args, Path(d))
            steady[mode] = statistics.median(r for _, r in rates[args.skip:])
            print(f"| {mode} | {seconds:.1f} | {rates[0][1]:.1f} | {steady[mode]:.1f} | "
                  f"{', '.join(f'{r:.0f}' for _, r in rates)} |", flush=True)
    print(f"\ncompiled / eager, steady: {steady['compiled'] / steady['eager']:.2f}x")


if __name__ == "__main__":
    main()
