"""The latent cache: encode a data set once, train on it many times (made by ``msf extract``,
:mod:`msf.training.extract`; read here).

For every image, and for its horizontal mirror, we store what training would
otherwise compute from the pixels each step: the target ``z = E(x)`` and, in the
``image`` base mode, the base ``E(resize_image(x, s_0))`` (Algorithm 1's inputs).

Layout of a cache directory::

    manifest.json              format, model fields it was made for, shards, classes
    shard_00000.z.npy          (count, 2, C, N, N)    [:, 0] as is, [:, 1] mirrored
    shard_00000.base.npy       (count, 2, C, n0, n0)  (image base mode only)
    shard_00000.labels.npy     (count,) int64
    shard_00000.json           written last: the shard is complete; byte sizes

A shard is a contiguous range of examples; under torchrun each process encodes
every ``world``-th shard. Files are written to a temporary name and renamed, and
a shard counts as done only once its ``.json`` exists, so an interrupted
extraction re-run skips the finished shards. Reading memory-maps the ``.npy``
files (plain numpy, no pickles) after checking every file's size against its
record: a truncated shard is a clear error, not garbage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from msf.config import Config, to_dict

FORMAT = "msf-latent-cache"
VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}


class CacheError(ValueError):
    """A latent cache is missing, incomplete, damaged or made for another model."""


def cache_key(cfg: Config) -> dict:
    """The model fields a cache depends on: it can train any model that agrees on these."""
    m = cfg.model
    return {
        "autoencoder": to_dict(m.autoencoder),
        "image_sizes": [m.image_sizes[0], m.image_size],
        "base_mode": m.base_mode,
    }


class LatentCache:
    """A latent cache opened for training: memory-mapped shards, verified on open."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        file = self.path / "manifest.json"
        if not file.is_file():
            raise CacheError(f"{file}: missing; is {self.path} a latent cache made by `msf extract`?")
        try:
            m = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{file}: not valid JSON ({e})") from None
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise CacheError(f"{file}: not a version-{VERSION} msf latent cache")
        self.manifest = m
        self.class_names: list[str] = list(m["class_names"])
        self.z, self.base, labels, self.starts = [], [], [], []
        for name in m["shards"]:
            marker = self.path / f"{name}.json"
            if not marker.is_file():
                raise CacheError(f"{marker}: missing; the shard is incomplete, run extract again")
            rec = json.loads(marker.read_text())
            for f, size in rec["files"].items():
                p = self.path / f
                actual = p.stat().st_size if p.is_file() else None
                if actual != size:
                    raise CacheError(f"{p}: {'missing' if actual is None else f'{actual} bytes'}, "
                                     f"expected {size} bytes (truncated or damaged); delete "
                                     f"{marker.name} and run extract again to rebuild it")
            try:
                self.z.append(np.load(self.path / f"{name}.z.npy", mmap_mode="r", allow_pickle=False))
                has_base = (self.path / f"{name}.base.npy").is_file()
                self.base.append(np.load(self.path / f"{name}.base.npy", mmap_mode="r",
                                         allow_pickle=False) if has_base else None)
                labels.append(np.load(self.path / f"{name}.labels.npy", allow_pickle=False))
            except ValueError as e:
                raise CacheError(f"{self.path / name}: unreadable shard ({e})") from None
            if len(self.z[-1]) != rec["count"] or len(labels[-1]) != rec["count"]:
                raise CacheError(f"{self.path / name}: holds {len(self.z[-1])} examples, "
                                 f"its record says {rec['count']}")
            self.starts.append(rec["start"])
        self.labels = torch.from_numpy(np.concatenate(labels)).long()
        self.shard_size = int(m["shard_size"])
        if len(self.labels) != m["num_examples"]:
            raise CacheError(f"{file}: {len(self.labels)} examples in shards, "
                             f"manifest says {m['num_examples']}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check_model(self, cfg: Config) -> None:
        """The cache must have been made for this autoencoder, these sizes and this base mode."""
        want, have = cache_key(cfg), self.manifest["model"]
        for key in want:
            if want[key] != have[key]:
                raise CacheError(f"{self.path}: made for {key}={have[key]!r}, "
                                 f"this model needs {want[key]!r}; run msf extract for it")

    def get(self, indices: Tensor, flips: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(z, base)`` float32 tensors of the examples, mirrored where ``flips`` is True."""
        idx = indices.numpy()
        shard, row = idx // self.shard_size, idx % self.shard_size
        variant = flips.numpy().astype(np.int64)
        z = np.stack([self.z[s][r, v] for s, r, v in zip(shard, row, variant)])
        base = None
        if self.base[0] is not None:
            base = torch.from_numpy(np.stack([self.base[s][r, v] for s, r, v in
                                              zip(shard, row, variant)]).astype(np.float32))
        return torch.from_numpy(z.astype(np.float32)), base
