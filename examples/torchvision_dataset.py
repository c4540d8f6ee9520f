"""Train from a torchvision dataset as it is: items (PIL image, label), classes from `classes`.

    python examples/torchvision_dataset.py path/to/class_folders --out runs/tv [--tiny]
"""

import argparse

from torchvision import datasets

from msf.config import apply_overrides
from msf.presets import preset
from msf.training.train import train

p = argparse.ArgumentParser()
p.add_argument("folder")
p.add_argument("--out", default="runs/tv")
p.add_argument("--tiny", action="store_true")
args = p.parse_args()

data = datasets.ImageFolder(args.folder)  # no transform: msf crops and converts as its own loader does
cfg = apply_overrides(preset("tiny" if args.tiny else "demo"), [
    f"train.out_dir={args.out}", "model.class_names=null", f"model.num_classes={len(data.classes)}",
    *(["train.steps=3"] if args.tiny else [])])
result = train(cfg, data=data, overwrite=True)
print("classes:", result.pipeline.config.class_names, "model:", result.model_dir)
