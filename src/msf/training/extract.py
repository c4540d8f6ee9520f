"""``msf extract``: encode the training data once into a latent cache (:mod:`msf.training.latent_cache`,
which writes and reads it).

Each process of a torchrun job encodes every ``world``-th shard; a shard counts as done once
its ``.json`` record exists and its files have the recorded sizes, so a re-run resumes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from msf.config import Config, validate
from msf.training.data import ImageDataset, TrainingData, load_dataset
from msf.training.distributed import close_world, init_world
from msf.training.latent_cache import DTYPE, DTYPES, SHARD_SIZE, CacheError, write_cache

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from msf.training.imagefolder import ImageFolder


def extract(
    cfg: Config,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = SHARD_SIZE,
    batch_size: int = 64,
    dtype: str = DTYPE,
    device: str | None = None,
    progress: bool = True,
    data: TrainingData | ImageDataset | ImageFolder | Dataset | None = None,
) -> Path:
    """Encode ``cfg.train.data`` into a latent cache at ``out_dir``; resumes where it stopped."""
    validate(cfg)
    if dtype not in DTYPES:
        raise CacheError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    world = init_world(device)
    try:
        data = TrainingData(load_dataset(cfg.train.data, cfg.model.image_size, cfg.train.strict_data)
                            if data is None else data, cfg.model.image_size)
        if data.kind == "latents":
            raise CacheError(f"train.data={cfg.train.data}: already a latent cache")
        return write_cache(cfg, out_dir, world, data, shard_size=shard_size, batch_size=batch_size,
                           dtype=dtype, progress=progress)
    finally:
        close_world(world)
