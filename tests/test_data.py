import numpy as np
import pytest
import torch

from msf.data import BatchSampler, load_builtin, load_dataset, to_model_range, to_uint8


def test_builtin_emoji_dataset():
    d = load_builtin()
    assert d.images.dtype == torch.uint8 and d.images.shape[1:] == (32, 32, 3)
    assert d.num_classes == 9 and len(d) == len(d.labels) > 1800
    counts = torch.bincount(d.labels, minlength=9)
    assert counts.min() >= 80 and counts.max() <= 5 * counts.min()
    # Colour images: the channels differ (not grayscale), the background is white.
    x = d.images.float()
    assert (x[..., 0] - x[..., 2]).abs().mean() > 10
    assert (x[:, 0, 0] > 240).all(dim=-1).float().mean() > 0.8


def test_uint8_round_trip():
    d = load_builtin()
    assert torch.equal(to_uint8(to_model_range(d.images[:5])), d.images[:5])


def test_balanced_sampler_sees_classes_equally():
    d = load_builtin()
    s = BatchSampler(d, 512, balance_classes=True, seed=0)
    seen = torch.cat([s.next()[1] for _ in range(20)])
    freq = torch.bincount(seen, minlength=9).float() / len(seen)
    assert (freq - 1 / 9).abs().max() < 0.025
    s = BatchSampler(d, 512, balance_classes=False, seed=0)
    seen = torch.cat([s.next()[1] for _ in range(20)])
    assert torch.bincount(seen, minlength=9)[1] > 2 * torch.bincount(seen, minlength=9)[5]


def test_npz_dataset_and_bad_data(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.array([0, 1, 2, 1]))
    d = load_dataset(str(p))
    assert d.num_classes == 3 and d.image_size == 8
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4))
    with pytest.raises(ValueError, match="bad.npz: 'images' must be uint8"):
        load_dataset(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="expected 'emoji'"):
        load_dataset(str(tmp_path / "missing"))
