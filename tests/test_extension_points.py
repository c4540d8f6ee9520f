"""train(cfg, data=, autoencoder=, networks=): data, an autoencoder and networks of one's own, and
torchvision-style datasets."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import datasets

from msf.config import ScaleConfig
from msf.method.models import DiT
from msf.method.pipeline import MSFPipeline
from msf.presets import preset
from msf.training.data import TorchvisionData, TrainingData
from msf.training.imagefolder import ImageFolder
from msf.training.train import train


def test_a_torchvision_dataset_reads_as_msfs_own_loader(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (tmp_path / c).mkdir()
        for i in range(3):
            a = rng.integers(0, 255, (24, 20, 4), dtype=np.uint8)  # RGBA, not square: cropped, on white
            Image.fromarray(a, "RGBA").save(tmp_path / c / f"{i}.png")
    ours = ImageFolder(tmp_path, 16)
    theirs = TrainingData(datasets.ImageFolder(tmp_path), 16).source
    assert isinstance(theirs, TorchvisionData) and theirs.class_names == ours.class_names == ["cats", "dogs"]
    assert theirs.labels.tolist() == ours.labels.tolist()
    for i in range(6):
        np.testing.assert_array_equal(theirs[i][0].numpy(), ours[i][0].numpy())

    class Tensors(torch.utils.data.Dataset):  # ToTensor's output, no targets, no classes
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((3, 16, 16), i / 4), i % 2

    data = TorchvisionData(Tensors(), 16)
    assert data.labels.tolist() == [0, 1, 0, 1] and data.class_names == ["0", "1"]
    assert data[2][0].dtype == torch.uint8 and int(data[2][0][0, 0, 0]) == 128
    with pytest.raises(ValueError, match=r"Tensors\[0\]: an image tensor must be \(3, 32, 32\), got"):
        TorchvisionData(Tensors(), 32)[0]


class Counting(nn.Module):
    """A network of one's own: a DiT behind a wrapper that counts its calls."""

    def __init__(self, *args, **kw):
        super().__init__()
        self.inner, self.calls = DiT(*args, **kw), 0

    def forward(self, x, t, y, prior=None):
        self.calls += 1
        return self.inner(x, t, y, prior)


def test_own_networks_and_autoencoder_are_trained_and_load_back(tmp_path):
    cfg = preset("tiny")
    cfg.train.steps, cfg.train.out_dir = 3, str(tmp_path / "run")
    m = cfg.model

    def nets():
        small = ScaleConfig(image_size=8, depth=1, width=16, heads=2)
        return [Counting(small, input_size=n, channels=3, num_classes=m.num_classes,
                         prior_channels=3 if k else 0) for k, n in enumerate(m.latent_sizes)]

    mine = nets()
    result = train(cfg, networks=mine, progress=False)
    trained = result.pipeline.networks
    assert all(isinstance(n, Counting) for n in trained) and mine[0].calls == 0  # copied, not mutated
    weight = trained[0].inner.final_layer.linear.weight
    assert not torch.equal(weight, mine[0].inner.final_layer.linear.weight)
    loaded = MSFPipeline.from_pretrained(result.model_dir, networks=nets())
    torch.testing.assert_close(loaded.sample([0, 1], steps=2), result.pipeline.sample([0, 1], steps=2))
    with pytest.raises(ValueError, match="networks: 1 given, the config has 2 scales"):
        MSFPipeline(m, networks=nets()[:1])

    class FourChannels(nn.Module):
        channels, factor = 4, 1

    with pytest.raises(ValueError, match="has 4 latent channels, the config 3: set model.autoencoder"):
        MSFPipeline(m, autoencoder=FourChannels())
