"""train.latent_cache: a model with a trained autoencoder encodes its images once into a latent cache
and trains from it (``auto``, the default), with a tiny randomly initialised AutoencoderKL (f = 2)."""

import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from helpers import HANG

from msf.config import ConfigError, apply_overrides
from msf.method.autoencoder import SDAutoencoder
from msf.presets import preset
from msf.training import latent_cache
from msf.training.data import (
    TrainingData,
    data_identity,
    load_builtin,
    load_dataset,
    open_training_data,
    prepare_data,
)
from msf.training.extract import extract
from msf.training.latent_cache import CacheError, LatentCache, auto_dir
from msf.training.train import train


def _save_vae(path, seed: int):
    torch.manual_seed(seed)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16, scaling_factor=0.5,
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """36 emoji at 16 px, 4 of each of the 9 classes, as an .npz."""
    d = prepare_data(load_builtin(), 16)
    pick = torch.cat([torch.nonzero(d.labels == c)[:4, 0] for c in range(9)])
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, images=d.images[pick].numpy(), labels=d.labels[pick].numpy(),
             class_names=np.array(d.class_names))
    return path


@pytest.fixture
def vae(tmp_path):
    return _save_vae(tmp_path / "vae", 0)


@pytest.fixture
def counts(monkeypatch, tmp_path):
    """The auto caches go under tmp_path/cache; counts which shards are encoded (cache folder, shard)
    and how many images the autoencoder encodes, in extraction or in training steps."""
    monkeypatch.setenv("MSF_CACHE_DIR", str(tmp_path / "cache"))
    shards, images = [], []
    encode_shard, encode = latent_cache._encode_shard, SDAutoencoder.encode

    def counting_shard(pipe, data, out, s, *args):
        shards.append((out.name, s))
        return encode_shard(pipe, data, out, s, *args)

    def counting_encode(self, x):
        images.append(len(x))
        return encode(self, x)

    monkeypatch.setattr(latent_cache, "_encode_shard", counting_shard)
    monkeypatch.setattr(SDAutoencoder, "encode", counting_encode)
    return shards, images


def _cfg(tmp_path, vae, data, *extra):
    return apply_overrides(preset("tiny"), [
        "model.autoencoder.kind=sd-vae", f"model.autoencoder.path={vae}", "model.autoencoder.channels=4",
        "model.autoencoder.factor=2", "model.autoencoder.scaling_factor=0.5", f"train.data={data}",
        "train.steps=2", "train.batch_size=8", "train.tensorboard=false", f"train.out_dir={tmp_path / 'run'}",
        *extra,
    ])


def _where(cfg, small):
    """Where auto keeps the cache of ``small`` for ``cfg``'s model."""
    return auto_dir(cfg, *data_identity(str(small), TrainingData(load_dataset(str(small)), 16).source))


class _Torchvision:
    """A torchvision-style data set: ``(image, label)`` items, float (3, H, W) images in [0, 1]."""

    def __init__(self):
        d = prepare_data(load_builtin(), 16)
        self.images, self.targets, self.classes = d.images[:36], d.labels[:36].tolist(), d.class_names
        self.targets[-9:] = range(9)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i].permute(2, 0, 1).float() / 255, self.targets[i]


def _auto_caches(tmp_path) -> list:
    root = tmp_path / "cache" / "latents"
    return sorted(root.iterdir()) if root.is_dir() else []


def _stamps(folder) -> dict:
    return {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}


def test_auto_makes_the_cache_once_and_trains_from_it(tmp_path, vae, small, counts):
    shards, images = counts
    first = train(_cfg(tmp_path, vae, small), progress=False, save=False)
    (cache,) = _auto_caches(tmp_path)
    assert cache.name.startswith("small-") and (cache / "manifest.json").is_file()
    assert shards == [(cache.name, 0)] and len(LatentCache(cache)) == 36
    stamps, encoded = _stamps(cache), sum(images)
    assert encoded == 36 * 2 * 2  # each image and its mirror, at 16 px and at the base's 8 px: nothing more
    again = train(_cfg(tmp_path, vae, small), progress=False, save=False)
    assert _auto_caches(tmp_path) == [cache] and shards == [(cache.name, 0)] and _stamps(cache) == stamps
    assert sum(images) == encoded  # neither encoded again nor encoded in the steps: read from the cache
    assert again.history == first.history


def test_images_passed_in_memory_share_the_cache_of_their_file(tmp_path, vae, small, counts):
    """msf compare passes the data set it loaded once; a moved copy of the file is the same data."""
    shards, _ = counts
    open_training_data(_cfg(tmp_path, vae, small))
    (cache,) = _auto_caches(tmp_path)
    assert open_training_data(_cfg(tmp_path, vae, small), load_dataset(str(small))).kind == "latents"
    shutil.copy(small, tmp_path / "small.npz")
    assert open_training_data(_cfg(tmp_path, vae, tmp_path / "small.npz")).kind == "latents"
    assert _auto_caches(tmp_path) == [cache] and shards == [(cache.name, 0)]
    # other images (one pixel changed) are other data
    d = np.load(small)
    images = d["images"].copy()
    images[0, 0, 0, 0] ^= 1
    np.savez(tmp_path / "small.npz", images=images, labels=d["labels"], class_names=d["class_names"])
    open_training_data(_cfg(tmp_path, vae, tmp_path / "small.npz"))
    assert len(_auto_caches(tmp_path)) == 2 and len(shards) == 2


def test_the_auto_cache_trains_as_an_extracted_one(tmp_path, vae, small, counts):
    auto = train(_cfg(tmp_path, vae, small), progress=False, save=False)
    out = extract(_cfg(tmp_path, vae, small), tmp_path / "extracted", progress=False)
    extracted = train(_cfg(tmp_path, vae, out), progress=False, save=False)
    assert auto.history == extracted.history
    for a, b in zip(auto.pipeline.networks.parameters(), extracted.pipeline.networks.parameters()):
        assert torch.equal(a, b)
    # and not as the images do: the steps encode those (in float32; the cache holds float16)
    pixels = train(_cfg(tmp_path, vae, small, "train.latent_cache=off"), progress=False, save=False)
    assert pixels.history != auto.history


def test_off_and_pixel_space_make_no_cache(tmp_path, vae, small, counts):
    shards, images = counts
    train(_cfg(tmp_path, vae, small, "train.latent_cache=off"), progress=False, save=False)
    assert _auto_caches(tmp_path) == [] and shards == []
    assert sum(images) == 2 * 8 * 2  # two steps of 8 images, each at 16 px and at the base's 8 px
    pixel = ["train.steps=1", f"train.data={small}", "train.tensorboard=false"]
    for where in ("auto", str(tmp_path / "mine")):
        data = open_training_data(apply_overrides(preset("tiny"), [*pixel, f"train.latent_cache={where}"]))
        assert data.kind == "memory"
    assert _auto_caches(tmp_path) == [] and not (tmp_path / "mine").exists() and shards == []


def test_a_cache_ruled_out_trains_from_the_images(tmp_path, vae, small, counts, capsys):
    shards, images = counts
    posterior = _cfg(tmp_path, vae, small, "model.autoencoder.sample_posterior=true")
    data = open_training_data(posterior, progress=True)
    assert data.kind == "memory" and _auto_caches(tmp_path) == [] and shards == []
    err = capsys.readouterr().err
    assert err.count("[msf]") == 1 and "sample_posterior=true" in err and "from the images" in err
    a = train(posterior, progress=False, save=False)
    b = train(_cfg(tmp_path, vae, small, "model.autoencoder.sample_posterior=true", "train.latent_cache=off"),
              progress=False, save=False)
    assert a.history == b.history and _auto_caches(tmp_path) == [] and shards == []
    # a data set passed as an object msf cannot key a cache by (neither in memory nor a folder)
    assert open_training_data(_cfg(tmp_path, vae, small), _Torchvision(), progress=True).kind == "files"
    assert _auto_caches(tmp_path) == [] and "nothing to key a cache by" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"train.latent_cache=.*mine: model.autoencoder.sample_posterior"):
        open_training_data(_cfg(tmp_path, vae, small, "model.autoencoder.sample_posterior=true",
                                f"train.latent_cache={tmp_path / 'mine'}"))


def test_another_autoencoder_makes_another_cache(tmp_path, vae, small, counts):
    shards, _ = counts
    open_training_data(_cfg(tmp_path, vae, small))
    (first,) = _auto_caches(tmp_path)
    time.sleep(0.01)
    _save_vae(vae, 1)  # trained again in place: the same config, other weights
    open_training_data(_cfg(tmp_path, vae, small))
    second = [c for c in _auto_caches(tmp_path) if c != first]
    assert len(second) == 1 and shards == [(first.name, 0), (second[0].name, 0)]
    a, b = LatentCache(first), LatentCache(second[0])
    assert not np.array_equal(a.z[0], b.z[0])
    shutil.copytree(vae, tmp_path / "vae2")  # the same weights elsewhere, other sizes: other folders
    cfgs = [_cfg(tmp_path, tmp_path / "vae2", small), _cfg(tmp_path, vae, small, "model.base_mode=latent")]
    assert len({_where(c, small) for c in [*cfgs, _cfg(tmp_path, vae, small)]}) == 3
    assert _where(_cfg(tmp_path, vae, small), small) == second[0]


def test_an_incomplete_cache_is_completed_not_read(tmp_path, vae, small, counts, monkeypatch):
    shards, _ = counts
    monkeypatch.setattr(latent_cache, "SHARD_SIZE", 16)  # 36 examples: 3 shards
    open_training_data(_cfg(tmp_path, vae, small))
    (cache,) = _auto_caches(tmp_path)
    assert shards == [(cache.name, s) for s in range(3)]
    whole = np.array(LatentCache(cache).z[1])
    stamps = _stamps(cache)
    # a shard without its record: its files are not trusted (here: garbage) but made again, alone
    (cache / "shard_00001.json").unlink()
    (cache / "shard_00001.z.npy").write_bytes(b"partial")
    data = open_training_data(_cfg(tmp_path, vae, small))
    assert data.kind == "latents" and shards[3:] == [(cache.name, 1)]
    assert np.array_equal(LatentCache(cache).z[1], whole)
    assert _stamps(cache)["shard_00000.z.npy"] == stamps["shard_00000.z.npy"]
    # an extraction stopped before its manifest: completed, not read as a cache
    (cache / "manifest.json").unlink()
    (cache / "shard_00002.json").unlink()
    assert open_training_data(_cfg(tmp_path, vae, small)).kind == "latents"
    assert shards[4:] == [(cache.name, 2)] and (cache / "manifest.json").is_file()


@pytest.mark.parametrize("other", ["finishes", "dies"])
def test_a_shard_another_process_is_encoding_is_left_to_it(tmp_path, vae, small, counts, monkeypatch, other):
    """Two jobs making one cache: a shard locked by the other is waited for, and encoded here only if
    the other stopped without finishing it."""
    shards, _ = counts
    monkeypatch.setattr(latent_cache, "SHARD_SIZE", 16)
    cfg = _cfg(tmp_path, vae, small)
    ref = extract(cfg, tmp_path / "ref", shard_size=16, progress=False)
    path = _where(cfg, small)
    path.mkdir(parents=True)
    lock = open(path / ".shard_00000.lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)

    def the_other_job():
        try:
            deadline = time.monotonic() + 60
            while not (path / "shard_00002.json").is_file() and time.monotonic() < deadline:
                time.sleep(0.02)
            if other == "finishes":
                for f in ref.glob("shard_00000.*"):
                    shutil.copy(f, path / f.name)
        finally:
            lock.close()  # releases the lock

    job = threading.Thread(target=the_other_job)
    job.start()
    data = open_training_data(cfg)
    job.join()
    mine = [s for name, s in shards if name == path.name]
    assert mine == ([1, 2] if other == "finishes" else [1, 2, 0])
    assert data.kind == "latents" and len(data) == 36
    for a, b in zip(LatentCache(path).z, LatentCache(ref).z):
        assert np.array_equal(a, b)


def test_a_folder_given_is_made_or_checked(tmp_path, vae, small, counts, capsys):
    mine = tmp_path / "mine"
    data = open_training_data(_cfg(tmp_path, vae, small, f"train.latent_cache={mine}"), progress=True)
    assert data.kind == "latents" and (mine / "manifest.json").is_file() and _auto_caches(tmp_path) == []
    err = capsys.readouterr().err
    assert f"once into a latent cache at {mine} " in err and err.count("[msf]") == 1
    open_training_data(_cfg(tmp_path, vae, small, f"train.latent_cache={mine}"), progress=True)
    err = capsys.readouterr().err
    assert f"training from the latent cache at {mine} " in err and err.count("[msf]") == 1
    # a cache there for another model is refused, naming the field
    with pytest.raises(CacheError, match=r"train.latent_cache=.*mine: .*made for base_mode='image'"):
        open_training_data(_cfg(tmp_path, vae, small, f"train.latent_cache={mine}", "model.base_mode=latent"))
    with pytest.raises(ConfigError, match="train.latent_cache must be auto, off or a folder"):
        _cfg(tmp_path, vae, small, "train.latent_cache= ")


def test_torchrun_processes_make_one_auto_cache(tmp_path, vae, small, counts):
    shards, _ = counts
    env = {**os.environ, "MSF_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "msf", "train", "--preset", "tiny", "--quiet", "model.autoencoder.kind=sd-vae",
           f"model.autoencoder.path={vae}", "model.autoencoder.channels=4", "model.autoencoder.factor=2",
           "model.autoencoder.scaling_factor=0.5", f"train.data={small}", "train.steps=1",
           "train.batch_size=8", "train.tensorboard=false", f"train.out_dir={tmp_path / 'ddp'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (cache,) = _auto_caches(tmp_path)
    assert (cache / "manifest.json").is_file()
    assert open_training_data(_cfg(tmp_path, vae, small)).kind == "latents" and shards == []  # reused
