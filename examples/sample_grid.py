"""Draw a labelled grid from any model: a model directory, a run directory, a checkpoint, a shipped
model's name or a hub id.

    python examples/sample_grid.py runs/demo --classes 0,3 --per-class 8 --out grid.png
"""

import argparse

from msf.interfaces.load import load_pipeline
from msf.interfaces.viz import save_sample_grid
from msf.method.pipeline import progress_bar

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--classes", default="0,1")
p.add_argument("--per-class", type=int, default=8)
p.add_argument("--steps", type=int, default=None, help="network evaluations per scale (default: the model's)")
p.add_argument("--out", default="grid.png")
args = p.parse_args()

pipe = load_pipeline(args.model)  # EMA weights; weights="raw" for a checkpoint's raw ones
labels = [int(c) for c in args.classes.split(",") for _ in range(args.per_class)]
images = pipe.sample(labels, steps=args.steps, seed=0, batch_size=64, callback=progress_bar())
print("grid:", save_sample_grid(images, labels, pipe.config.class_names, args.out))
