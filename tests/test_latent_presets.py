"""The latent-space presets run offline from a fresh checkout: the autoencoder they name is shipped in the
package with the scale they declare, and they train and sample through it at the paper's proportions."""

import json

import numpy as np
import pytest
import torch

from msf.config import apply_overrides
from msf.method.autoencoder import shipped_autoencoders
from msf.method.pipeline import MSFPipeline
from msf.presets import preset
from msf.training.data import load_builtin
from msf.training.train import train

LATENT = ("latent-demo", "dit-latent-demo")


@pytest.mark.parametrize("name", LATENT)
def test_the_preset_declares_the_scale_measured_and_stored_with_the_shipped_autoencoder(name):
    ae = preset(name).model.autoencoder
    stored = json.loads((shipped_autoencoders() / ae.path / "config.json").read_text())
    assert ae.scaling_factor == stored["scaling_factor"]
    assert ae.channels == stored["latent_channels"]
    assert ae.factor == 2 ** (len(stored["block_out_channels"]) - 1)


def test_latent_demo_has_the_papers_proportions_and_demo64_the_same_tokens_in_pixels():
    latent, pixels, dit = preset("latent-demo").model, preset("demo64").model, preset("dit-latent-demo").model
    assert latent.image_sizes == pixels.image_sizes == [48, 64] and dit.image_sizes == [64]
    assert latent.base_mode == "image"
    tokens = [[(s.image_size // m.autoencoder.factor // s.patch_size) ** 2 for s in m.scales]
              for m in (latent, pixels, dit)]
    assert tokens == [[36, 64], [36, 64], [64]]


@pytest.mark.parametrize("name", LATENT)
def test_a_latent_preset_trains_and_samples_64px_images_through_the_shipped_autoencoder(name, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setenv("MSF_CACHE_DIR", str(tmp_path / "cache"))
    data = load_builtin("emoji64")
    pick = np.arange(0, len(data.images), 60)
    np.savez(tmp_path / "few.npz", images=data.images[pick], labels=data.labels[pick])
    cfg = apply_overrides(preset(name), [
        "model.scales.*.depth=1", "model.scales.*.width=32", "model.scales.*.heads=2", "train.steps=2",
        "train.batch_size=4", "train.precision=fp32", "train.tensorboard=false",
        f"train.data={tmp_path / 'few.npz'}", f"train.out_dir={tmp_path / 'run'}"])
    result = train(cfg, progress=False)
    assert all(np.isfinite(loss) for h in result.history.values() for _, loss in h)
    pipe = MSFPipeline.from_pretrained(result.model_dir)
    assert pipe.autoencoder.scaling_factor == cfg.model.autoencoder.scaling_factor
    images = pipe.sample(torch.tensor([0, 3]), generator=torch.Generator().manual_seed(0), steps=2)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    assert images.std() > 0.01  # decoded through the trained autoencoder, not a constant
