"""Before and after, in one run: msf's training loop and sampler timed from two source trees.

Each measurement runs in a fresh process whose ``msf`` is imported from the given tree's
``src`` (``git worktree add /tmp/before <commit>`` makes one), interleaved A, B, A, B, ...
so that the machine's drift hits both alike. Inside the process only the timed call counts
(imports and set-up are left out):

* ``train``: ``msf.training.train.train`` on the built-in data for ``--steps`` steps of ``--preset``
  (its data, factorization, per-scale losses, backward, AdamW, EMA, logging), seconds per step
  after the first ``--warmup`` steps;
* ``sample``: ``MSFPipeline.sample`` of ``--batch`` images at the preset's sampler settings.

    python benchmarks/trees.py /tmp/before/src src --preset demo --steps 30 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from timing import machine  # benchmarks/timing.py, beside this script

TRAIN = """
import sys, tempfile, time
import torch
import msf.training.train as mt
from msf.config import apply_overrides
from msf.presets import preset
steps, warmup = int(sys.argv[2]), int(sys.argv[3])
cfg = apply_overrides(preset(sys.argv[1]), [f"train.steps={steps}", "train.tensorboard=false",
                      "train.log_every=10", "train.out_dir=" + tempfile.mkdtemp()])
times = []
real = mt.iterate_batches
def timed(*a, **k):  # the time at which each step's batch is asked for marks a step boundary
    for item in real(*a, **k):
        times.append(time.perf_counter())
        yield item
mt.iterate_batches = timed
mt.train(cfg, progress=False, save=False)
times.append(time.perf_counter())
print((times[-1] - times[warmup]) / (steps - warmup))
"""

SAMPLE = """
import sys, time
import torch
from msf.presets import preset
from msf.method.pipeline import MSFPipeline
torch.manual_seed(0)
pipe = MSFPipeline(preset(sys.argv[1]).model)
for p in pipe.parameters():
    p.data.add_(0.02 * torch.randn_like(p))
labels = [i % pipe.config.num_classes for i in range(int(sys.argv[2]))]
pipe.sample(labels[:2])  # warm-up
t0 = time.perf_counter()
pipe.sample(labels, precision="bf16")
print(time.perf_counter() - t0)
"""


def measure(tree: str, what: str, args) -> float:
    code, argv = (TRAIN, [args.preset, str(args.steps), str(args.warmup)]) if what == "train" else \
        (SAMPLE, [args.preset, str(args.batch)])
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
    r = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{tree} ({what}) failed:\n{r.stderr[-2000:]}")
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs=2, help="two source folders, each holding msf/ (e.g. a worktree's src)")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16, help="images per sample call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--what", default="train,sample")
    args = ap.parse_args()
    print(f"# {machine()}")
    a, b = args.trees
    for what in args.what.split(","):
        times = {a: [], b: []}
        for _ in range(args.repeats):
            for tree in (a, b):
                times[tree].append(measure(tree, what, args))
        unit = "s/step" if what == "train" else f"s per {args.batch} samples"
        ratios = [y / x for x, y in zip(times[a], times[b])]
        print(f"\n{what} ({args.preset}), {unit}, {args.repeats} interleaved repeats")
        print("| tree | median | min | max |\n|---|---|---|---|")
        for tree in (a, b):
            t = times[tree]
            print(f"| {tree} | {statistics.median(t):.4f} | {min(t):.4f} | {max(t):.4f} |")
        print(f"B / A per repeat: {', '.join(f'{r:.3f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
