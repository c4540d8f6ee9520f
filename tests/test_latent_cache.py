import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import HANG

from msf.config import apply_overrides
from msf.method.pipeline import MSFPipeline
from msf.presets import preset
from msf.training.data import load_builtin, load_dataset, prepare_data, to_model_range
from msf.training.extract import extract
from msf.training.latent_cache import CacheError, LatentCache
from msf.training.train import train


def _tiny(tmp_path, *extra):
    return apply_overrides(preset("tiny"), ["train.tensorboard=false",
                                            f"train.out_dir={tmp_path / 'run'}", *extra])


def test_cache_holds_what_training_would_compute(tmp_path):
    cfg = _tiny(tmp_path)
    out = extract(cfg, tmp_path / "cache", shard_size=700, dtype="float32", progress=False)
    cache = load_dataset(str(out))
    assert isinstance(cache, LatentCache) and len(cache) == 1870 and cache.num_classes == 9
    assert len(cache.z) == 3  # 1870 examples in shards of 700
    data = prepare_data(load_builtin(), 16)
    pipe = MSFPipeline(cfg.model)
    idx = torch.tensor([0, 699, 700, 1869])
    x = to_model_range(data.images[idx])
    for flip in (False, True):
        z, base = cache.get(idx, torch.full((4,), flip))
        want_z, want_base = pipe.encode(x.flip(-1) if flip else x)
        assert torch.equal(z, want_z) and torch.equal(base, want_base)
    assert torch.equal(cache.labels, data.labels)


def test_training_from_the_cache_equals_training_from_images(tmp_path):
    common = ["train.steps=4", "model.normalize=std"]
    cfg = _tiny(tmp_path, *common)
    extract(cfg, tmp_path / "cache", shard_size=1000, dtype="float32", progress=False)
    from_images = train(cfg, progress=False, save=False)
    cached = _tiny(tmp_path, *common, f"train.data={tmp_path / 'cache'}")
    from_cache = train(cached, progress=False, save=False)
    assert from_cache.pipeline.config.component_std == from_images.pipeline.config.component_std
    # Equal up to float rounding: the resize kernels may round differently with the
    # batch they run in (extraction encodes 64 images at a time, training 16).
    for a, b in zip(from_images.pipeline.parameters(), from_cache.pipeline.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    (step_a, loss_a), = from_cache.history[0]
    (step_b, loss_b), = from_images.history[0]
    assert step_a == step_b == 4 and loss_a == pytest.approx(loss_b, abs=1e-5)


def test_interrupted_extraction_resumes_and_damage_is_reported(tmp_path):
    cfg = _tiny(tmp_path)
    out = extract(cfg, tmp_path / "c", shard_size=500, progress=False)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.npy")}
    # A shard whose completion record is gone counts as unfinished and is rebuilt; others stay.
    (out / "shard_00002.json").unlink()
    (out / "shard_00002.z.npy").write_bytes(b"partial")
    extract(cfg, out, shard_size=500, progress=False)
    now = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.npy")}
    assert now["shard_00000.z.npy"] == stamp["shard_00000.z.npy"]
    assert now["shard_00002.z.npy"] != stamp["shard_00002.z.npy"]
    assert len(LatentCache(out)) == 1870
    # So is a shard with a file shorter than its record says (a copy cut short).
    f = out / "shard_00001.z.npy"
    f.write_bytes(f.read_bytes()[:-100])
    extract(cfg, out, shard_size=500, progress=False)
    assert len(LatentCache(out)) == 1870 and f.stat().st_mtime_ns != stamp["shard_00001.z.npy"]
    # Truncation after the fact is caught on open, naming the file.
    f = out / "shard_00001.base.npy"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CacheError, match="shard_00001.base.npy: .* bytes, expected"):
        LatentCache(out)


def test_cache_for_another_model_is_refused(tmp_path):
    extract(_tiny(tmp_path), tmp_path / "c", shard_size=1000, progress=False)
    other = _tiny(tmp_path, "model.base_mode=latent", f"train.data={tmp_path / 'c'}")
    with pytest.raises(CacheError, match="base_mode"):
        train(other, progress=False, save=False)
    with pytest.raises(CacheError, match="manifest.json: missing"):
        LatentCache(tmp_path)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["model"]["image_sizes"] == [8, 16]


def test_latent_base_mode_stores_no_base_and_trains(tmp_path):
    cfg = _tiny(tmp_path, "model.base_mode=latent", "train.steps=2")
    out = extract(cfg, tmp_path / "c", shard_size=1000, progress=False)
    assert not list(out.glob("*.base.npy"))
    assert np.load(out / "shard_00000.z.npy", mmap_mode="r").dtype == np.float16
    cached = _tiny(tmp_path, "model.base_mode=latent", "train.steps=2", f"train.data={out}")
    assert train(cached, progress=False, save=False).steps == 2


def test_extraction_is_sharded_over_torchrun_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "msf", "extract", "--preset", "tiny", "--quiet", "--out", str(tmp_path / "c"),
           "--shard-size", "400", "--dtype", "float32"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG)
    assert r.returncode == 0, r.stderr[-3000:]
    single = extract(_tiny(tmp_path), tmp_path / "one", shard_size=400, dtype="float32",
                     progress=False)
    a, b = LatentCache(tmp_path / "c"), LatentCache(single)
    assert len(a.z) == 5
    for za, zb in zip(a.z, b.z):
        assert np.array_equal(za, zb)
