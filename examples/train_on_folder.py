"""Train MSF on your own images: FOLDER/<class name>/*.png|jpg|..., then sample a grid.

    python examples/train_on_folder.py path/to/folder --out runs/mine [--minutes 10] [--tiny]
"""

import argparse
from pathlib import Path

from msf.config import apply_overrides
from msf.interfaces.viz import save_sample_grid
from msf.presets import preset
from msf.training.train import train

p = argparse.ArgumentParser()
p.add_argument("folder")
p.add_argument("--out", default="runs/mine")
p.add_argument("--minutes", type=float, default=10)
p.add_argument("--tiny", action="store_true", help="a few steps of a tiny model (for the tests)")
args = p.parse_args()

# the demo preset (32 px); the class names come from the folder
classes = sum(1 for d in Path(args.folder).iterdir() if d.is_dir())
cfg = apply_overrides(preset("tiny" if args.tiny else "demo"), [
    f"train.data={args.folder}", f"train.out_dir={args.out}", "model.class_names=null",
    f"model.num_classes={classes}", *(["train.steps=3"] if args.tiny else [])])
result = train(cfg, max_seconds=args.minutes * 60, overwrite=True)
pipe = result.pipeline
labels = [c for c in range(pipe.config.num_classes) for _ in range(4)]
images = pipe.sample(labels, seed=0)
print("grid:", save_sample_grid(images, labels, pipe.config.class_names, f"{args.out}/grid.png"))
print("model:", result.model_dir)
