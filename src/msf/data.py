"""Datasets: the built-in emoji set, and in-memory batching for small data.

The built-in set ships with the package (``msf/data/emoji32.npz``): 1,870 emoji
from Noto Color Emoji at 32 x 32, labelled by their 9 Unicode groups; see
``msf/data/README.md`` for how it was made and its licences.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass
class ImageDataset:
    images: Tensor  # uint8 (N, H, W, 3)
    labels: Tensor  # int64 (N,)
    class_names: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def builtin_path(name: str = "emoji32") -> Path:
    return Path(str(resources.files("msf") / "data" / f"{name}.npz"))


def load_builtin(name: str = "emoji32") -> ImageDataset:
    """The built-in labelled colour dataset (offline, shipped with the package)."""
    path = builtin_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the built-in dataset {name!r} is missing from the install")
    with np.load(path, allow_pickle=False) as d:
        return ImageDataset(
            images=torch.from_numpy(d["images"]),
            labels=torch.from_numpy(d["labels"]).long(),
            class_names=[str(c) for c in d["class_names"]],
        )


def load_dataset(spec: str) -> ImageDataset:
    """``"emoji"`` (built-in) or a ``.npz`` file with ``images`` (N,H,W,3 uint8) and ``labels``."""
    if spec in ("emoji", "emoji32"):
        return load_builtin("emoji32")
    path = Path(spec)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as d:
            for key in ("images", "labels"):
                if key not in d:
                    raise ValueError(f"{path}: missing array {key!r}")
            images, labels = d["images"], d["labels"]
            names = [str(c) for c in d["class_names"]] if "class_names" in d else None
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{path}: 'images' must be uint8 (N, H, W, 3), got {images.shape}")
        n_cls = int(labels.max()) + 1
        return ImageDataset(
            torch.from_numpy(images), torch.from_numpy(labels).long(),
            names or [str(i) for i in range(n_cls)],
        )
    raise ValueError(
        f"data {spec!r}: expected 'emoji' (built-in) or an existing .npz file "
        "(image folders arrive with the training-at-scale work)"
    )


def to_model_range(images: Tensor) -> Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: Tensor) -> Tensor:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu()


class BatchSampler:
    """Endless random batches from an in-memory dataset, with horizontal flips.

    ``balance_classes`` draws each example with probability proportional to
    ``1 / count(class)``, so every class is seen equally often.
    """

    def __init__(
        self, data: ImageDataset, batch_size: int, *, balance_classes: bool = True,
        flip: bool = True, seed: int = 0,
    ):
        self.data = data
        self.batch_size = batch_size
        self.flip = flip
        self.generator = torch.Generator().manual_seed(seed)
        counts = torch.bincount(data.labels, minlength=data.num_classes).float()
        self.weights = (1.0 / counts[data.labels]) if balance_classes else torch.ones(len(data))

    def next(self) -> tuple[Tensor, Tensor]:
        idx = torch.multinomial(self.weights, self.batch_size, replacement=True,
                                generator=self.generator)
        x = to_model_range(self.data.images[idx])
        if self.flip:
            flip = torch.rand(self.batch_size, generator=self.generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, self.data.labels[idx]
