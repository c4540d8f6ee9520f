"""The latent cache: encode a data set once, train on it many times (``msf extract``).

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
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from msf.config import Config, to_dict, validate
from msf.data import ImageDataset, load_dataset, prepare_data, to_model_range
from msf.distributed import barrier, close_world, init_world

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


def _write_npy(path: Path, array: np.ndarray) -> int:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def _shard_done(out: Path, s: int) -> bool:
    marker = out / f"shard_{s:05d}.json"
    if not marker.is_file():
        return False
    try:
        rec = json.loads(marker.read_text())
        return all((out / f).is_file() and (out / f).stat().st_size == size
                   for f, size in rec["files"].items())
    except (json.JSONDecodeError, KeyError, OSError):
        return False


def extract(
    cfg: Config,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 10_000,
    batch_size: int = 64,
    dtype: str = "float16",
    device: str | None = None,
    progress: bool = True,
    data=None,
) -> Path:
    """Encode ``cfg.train.data`` into a latent cache at ``out_dir``; resumes where it stopped."""
    validate(cfg)
    if dtype not in DTYPES:
        raise CacheError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    from msf.pipeline import MSFPipeline

    world = init_world(device)
    try:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = load_dataset(cfg.train.data, cfg.model.image_size, cfg.train.strict_data) \
            if data is None else data
        if isinstance(data, ImageDataset):
            data = prepare_data(data, cfg.model.image_size)
        pipe = MSFPipeline(cfg.model).to(world.device)
        n = len(data)
        shards = math.ceil(n / shard_size)
        mine = [s for s in range(world.rank, shards, world.size) if not _shard_done(out, s)]
        bar = tqdm(total=sum(min(shard_size, n - s * shard_size) for s in mine),
                   disable=not progress, desc=f"extract (rank {world.rank})", unit="img")
        bad: list[str] = []
        for s in mine:
            lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
            zs, bases, labels = [], [], []
            for b in range(lo, hi, batch_size):
                idx = list(range(b, min(hi, b + batch_size)))
                if isinstance(data, ImageDataset):
                    images, y = data.images[idx], data.labels[idx]
                else:
                    items = [data[i] for i in idx]
                    images = torch.stack([it[0] for it in items])
                    y = torch.tensor([it[1] for it in items])
                    bad += [it[2] for it in items if it[2]]
                x = to_model_range(images).to(world.device)
                pairs = [pipe.encode(x), pipe.encode(x.flip(-1))]
                zs.append(torch.stack([pairs[0][0], pairs[1][0]], 1).float().cpu().numpy())
                if pairs[0][1] is not None:
                    bases.append(torch.stack([pairs[0][1], pairs[1][1]], 1).float().cpu().numpy())
                labels.append(y.numpy().astype(np.int64))
                bar.update(len(idx))
            files = {}
            name = f"shard_{s:05d}"
            files[f"{name}.z.npy"] = _write_npy(out / f"{name}.z.npy",
                                                np.concatenate(zs).astype(DTYPES[dtype]))
            if bases:
                files[f"{name}.base.npy"] = _write_npy(out / f"{name}.base.npy",
                                                       np.concatenate(bases).astype(DTYPES[dtype]))
            files[f"{name}.labels.npy"] = _write_npy(out / f"{name}.labels.npy", np.concatenate(labels))
            marker = out / f"{name}.json"
            tmp = marker.with_name(f".{marker.name}.tmp")
            tmp.write_text(json.dumps({"start": lo, "count": hi - lo, "files": files}))
            os.replace(tmp, marker)
        bar.close()
        if bad:
            warnings.warn(f"{len(bad)} unreadable images were replaced by their neighbours; "
                          f"first: {bad[:5]}", stacklevel=2)
        barrier(world)
        if world.is_main:
            missing = [s for s in range(shards) if not _shard_done(out, s)]
            if missing:
                raise CacheError(f"{out}: shards {missing[:5]} are not complete; run extract again")
            manifest = {
                "format": FORMAT, "version": VERSION, "num_examples": n, "shard_size": shard_size,
                "shards": [f"shard_{s:05d}" for s in range(shards)], "dtype": dtype,
                "class_names": list(data.class_names), "model": cache_key(cfg),
            }
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        barrier(world)
        return out
    finally:
        close_world(world)


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
