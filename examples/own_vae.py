"""Train with an autoencoder of your own: anything with encode, decode, channels and factor.

Here a stand-in "VAE" that averages 2 x 2 pixels (factor 2, 3 channels); yours would wrap a trained
network. The config describes its shape (model.autoencoder.channels and factor) so that the scales'
latent sizes come out right; the object itself is passed to train().

    python examples/own_vae.py --out runs/own_vae [--tiny]
"""

import argparse

import torch.nn.functional as F

from msf.config import apply_overrides
from msf.method.autoencoder import Autoencoder
from msf.method.pipeline import MSFPipeline
from msf.presets import preset
from msf.training.train import train


class AvgPoolAutoencoder(Autoencoder):
    channels, factor, scaling_factor = 3, 2, 1.0

    def encode(self, x):
        return F.avg_pool2d(x, 2)

    def decode(self, z):
        return F.interpolate(z, scale_factor=2, mode="nearest").clamp(-1, 1)


p = argparse.ArgumentParser()
p.add_argument("--out", default="runs/own_vae")
p.add_argument("--tiny", action="store_true")
args = p.parse_args()

cfg = apply_overrides(preset("tiny" if args.tiny else "demo"), [
    "model.autoencoder.factor=2", f"train.out_dir={args.out}", *(["train.steps=3"] if args.tiny else [])])
result = train(cfg, autoencoder=AvgPoolAutoencoder(), overwrite=True)
# a model trained with your autoencoder loads with it
pipe = MSFPipeline.from_pretrained(result.model_dir, autoencoder=AvgPoolAutoencoder())
print("latent sizes:", pipe.config.latent_sizes, "samples:", tuple(pipe.sample([0, 1], steps=2).shape))
