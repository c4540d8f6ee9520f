"""``msf extract``: encode the training data once into a latent cache (:mod:`msf.training.latent_cache`).

Each process of a torchrun job encodes every ``world``-th shard; a shard counts as done once
its ``.json`` record exists and its files have the recorded sizes, so a re-run resumes.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from msf.config import Config, validate
from msf.files import atomic_write_numpy, atomic_write_text
from msf.training.data import ImageDataset, TrainingData, load_dataset
from msf.training.distributed import barrier, close_world, init_world
from msf.training.latent_cache import DTYPES, FORMAT, VERSION, CacheError, cache_key

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from msf.training.imagefolder import ImageFolder


def _write_npy(path: Path, array: np.ndarray) -> int:
    return atomic_write_numpy(path, np.save, array, allow_pickle=False).stat().st_size


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
    data: TrainingData | ImageDataset | ImageFolder | Dataset | None = None,
) -> Path:
    """Encode ``cfg.train.data`` into a latent cache at ``out_dir``; resumes where it stopped."""
    validate(cfg)
    if dtype not in DTYPES:
        raise CacheError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    from msf.method.pipeline import MSFPipeline

    world = init_world(device)
    try:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = TrainingData(load_dataset(cfg.train.data, cfg.model.image_size, cfg.train.strict_data)
                            if data is None else data, cfg.model.image_size)
        if data.kind == "latents":
            raise CacheError(f"train.data={cfg.train.data}: already a latent cache")
        n = len(data)
        _claim(out, {"model": cache_key(cfg), "dtype": dtype, "shard_size": shard_size, "num_examples": n,
                     "class_names": data.class_names}, world)
        pipe = MSFPipeline(cfg.model).to(world.device)
        shards = math.ceil(n / shard_size)
        mine = [s for s in range(world.rank, shards, world.size) if not _shard_done(out, s)]
        bar = tqdm(total=sum(min(shard_size, n - s * shard_size) for s in mine),
                   disable=not progress, desc=f"extract (rank {world.rank})", unit="img")
        bad: list[str] = []
        for s in mine:
            bad += _encode_shard(pipe, data, out, s, range(s * shard_size, min(n, (s + 1) * shard_size)),
                                 batch_size, DTYPES[dtype], world.device, bar)
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


def _claim(out: Path, settings: dict, world) -> None:
    """Shards are reused only by an extraction with the same settings: ``extract.json`` records them
    on the first run; a re-run with others (another autoencoder, size, dtype, data) is refused."""
    record = out / "extract.json"
    if record.is_file():
        old = json.loads(record.read_text())
        diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise CacheError(f"{out}: holds shards extracted with other settings ({'; '.join(diff)}); "
                             "use another --out, or delete the folder to start over")
    elif any(out.glob("shard_*.json")):
        raise CacheError(f"{out}: holds shards of an extraction that recorded no settings; "
                         "use another --out, or delete the folder to start over")
    barrier(world)
    if world.is_main and not record.is_file():
        atomic_write_text(record, json.dumps(settings, indent=2))
    barrier(world)


def _encode_shard(pipe, data: TrainingData, out: Path, s: int, rows: range, batch_size: int, dtype,
                  device, bar) -> list[str]:
    """Encode examples ``rows`` (and their mirrors) into shard ``s``; its ``.json`` record last.
    Returns the files that could not be decoded."""
    zs, bases, labels, bad = [], [], [], []
    for b in range(rows.start, rows.stop, batch_size):
        idx = torch.arange(b, min(rows.stop, b + batch_size))
        x, y, unreadable = data.batch(idx, torch.zeros(len(idx), dtype=torch.bool))
        bad += unreadable
        x = x.to(device)
        pairs = [pipe.encode(x), pipe.encode(x.flip(-1))]
        zs.append(torch.stack([pairs[0][0], pairs[1][0]], 1).float().cpu().numpy())
        if pairs[0][1] is not None:
            bases.append(torch.stack([pairs[0][1], pairs[1][1]], 1).float().cpu().numpy())
        labels.append(y.numpy().astype(np.int64))
        bar.update(len(idx))
    name = f"shard_{s:05d}"
    files = {f"{name}.z.npy": _write_npy(out / f"{name}.z.npy", np.concatenate(zs).astype(dtype))}
    if bases:
        files[f"{name}.base.npy"] = _write_npy(out / f"{name}.base.npy", np.concatenate(bases).astype(dtype))
    files[f"{name}.labels.npy"] = _write_npy(out / f"{name}.labels.npy", np.concatenate(labels))
    record = {"start": rows.start, "count": len(rows), "files": files}
    atomic_write_text(out / f"{name}.json", json.dumps(record))
    return bad
