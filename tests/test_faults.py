"""Bad input and faults (issue 15): a clear error naming the problem, or a safe default; nothing lost."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from msf.config import ConfigError, apply_overrides, config_from_json, config_to_json
from msf.files import atomic_write, atomic_write_text
from msf.interfaces.cli import main
from msf.method.pipeline import ModelDirError, MSFPipeline
from msf.presets import preset
from msf.training.checkpoint import (
    VERSION,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    prune,
    save_checkpoint,
)
from msf.training.train import train

QUICK = ["train.steps=2", "train.tensorboard=false"]


@pytest.mark.parametrize("override,message", [
    ("train.betas=[0.9]", r"train.betas must be two numbers \[beta1, beta2\] \(AdamW\), got \[0.9\]"),
    ("train.betas=[0.9, 1.5]", r"train.betas\[1\] must be a number in \[0, 1\), got 1.5"),
    ("train.ema_decay=1.5", r"train.ema_decay must be a number in \[0, 1\), got 1.5"),
    ("train.lr=0", r"train.lr must be a number in \(0, inf\), got 0"),
    ("train.lr=nan", r"train.lr must be a number in \(0, inf\), got nan"),
    ("train.lr=inf", r"train.lr must be a number in \(0, inf\), got inf"),
    ("train.ckpt_every=-1", r"train.ckpt_every must be an integer in \[0, inf\), got -1"),
    ("train.warmup_steps=-5", r"train.warmup_steps must be an integer in \[0, inf\), got -5"),
    ("train.grad_clip=-1", r"train.grad_clip must be a number in \[0, inf\), got -1"),
    ("train.num_workers=-2", r"train.num_workers must be an integer in \[0, inf\), got -2"),
    ("train.out_dir=", r"train.out_dir must name a directory"),
    ("train.log_every=0", r"train.log_every must be an integer in \[1, inf\), got 0"),
    ("train.min_lr_ratio=2", r"train.min_lr_ratio must be a number in \[0, 1\], got 2"),
    ("train.scale_steps=[10, -1]", r"train.scale_steps\[1\] must be an integer in \[0, inf\), got -1"),
    ("train.scale_steps=[10, 10, 10]", r"train.scale_steps needs 2 values \(one per scale\), got \[10"),
    ("model.prior_noise=nan", r"model.prior_noise must be a number in \[0, inf\), got nan"),
    ("model.scales.0.cfg_scale=nan", r"model.scales.0.cfg_scale must be a number in \[0, 100\], got nan"),
    ("model.scales.1.steps=0", r"model.scales.1.steps must be an integer in \[1, inf\), got 0"),
])
def test_every_train_field_is_range_checked_on_override_and_on_load(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(preset("tiny"), [override])
    key, _, value = override.partition("=")
    data = json.loads(config_to_json(preset("tiny")))
    *path, field = key.split(".")
    node = data
    for part in path:
        node = node[int(part)] if part.isdigit() else node[part]
    node[field] = json.loads(value) if value not in ("", "nan", "inf") else \
        {"": "", "nan": float("nan"), "inf": float("inf")}[value]
    with pytest.raises(ConfigError, match=message.split(" must")[0]):
        config_from_json(json.dumps(data), source="run/config.json")


def test_a_fresh_run_refuses_a_directory_holding_another_run(tmp_path):
    cfg = apply_overrides(preset("tiny"), [*QUICK, f"train.out_dir={tmp_path}"])
    first = train(cfg, progress=False)
    before = load_file(first.model_dir / "scale_0.safetensors")
    with pytest.raises(ConfigError, match=r"holds an earlier run \(checkpoints, model, .*--resume.*"
                                          r"train.out_dir.*--overwrite"):
        train(cfg, progress=False)
    after = load_file(first.model_dir / "scale_0.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the earlier run is untouched
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
    again = train(apply_overrides(cfg, ["train.steps=1"]), progress=False, overwrite=True)
    assert again.steps == 1 and [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [1]
    assert main(["train", "--preset", "tiny", "--quiet", *QUICK, f"train.out_dir={tmp_path}"]) == 2


def test_resume_with_only_damaged_checkpoints_names_each_and_starts_nothing(tmp_path):
    cfg = apply_overrides(preset("tiny"), [*QUICK, "train.ckpt_every=1", f"train.out_dir={tmp_path}"])
    train(cfg, progress=False)
    for _, path in list_checkpoints(tmp_path / "checkpoints"):
        path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"), \
            pytest.raises(CheckpointError, match=r"(?s)no checkpoint can be resumed from.*step_000000002.pt.*"
                                                 r"step_000000001.pt"):
        train(apply_overrides(cfg, ["train.steps=4"]), progress=False, resume=True)


def test_damaged_checkpoints_never_count_toward_retention(tmp_path):
    d = tmp_path / "ck"
    for step in (1, 2):
        save_checkpoint(d, step, {"x": torch.tensor([step])})
    for step in (3, 4):  # newer, but damaged
        (d / f"step_{step:09d}.pt").write_bytes(b"not a checkpoint")
    prune(d, keep_last=2)
    assert [s for s, _ in list_checkpoints(d)] == [1, 2, 3, 4]  # the good ones are kept
    save_checkpoint(d, 5, {"x": torch.tensor([5])})
    prune(d, keep_last=2)
    assert [s for s, _ in list_checkpoints(d)] == [2, 3, 4, 5]  # the damaged ones are left for the user


def test_a_write_cut_short_leaves_the_old_file_whole_and_nothing_beside_it(tmp_path):
    target = tmp_path / "config.json"
    atomic_write_text(target, "old")

    def cut_short(tmp):
        tmp.write_text("new, half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        atomic_write(target, cut_short)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left behind


def test_a_checkpoint_of_another_format_or_version_is_refused_by_name(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"x": torch.tensor([1])})
    assert load_checkpoint(path)["x"].tolist() == [1]
    torch.save({"format": "msf-train-checkpoint", "version": VERSION + 1, "step": 1}, path)
    with pytest.raises(CheckpointError, match=rf"step_000000001.pt: checkpoint version {VERSION + 1}, "
                                              rf"expected {VERSION}"):
        load_checkpoint(path)
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match=r"not an msf training checkpoint \(field 'format'\)"):
        load_checkpoint(path)


def test_class_count_and_names_come_from_the_folder_or_the_run_says_which_override(tmp_path):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (40 * i, 100, 0)).save(tmp_path / "data" / name / f"{i}.png")
    base = [*QUICK, f"train.data={tmp_path / 'data'}", "train.num_workers=0", "train.batch_size=4"]
    with pytest.raises(ConfigError, match=r"2 classes \(cat, dog\), but model.num_classes=9: "
                                          r"set model.num_classes=2"):
        train(apply_overrides(preset("tiny"), [*base, f"train.out_dir={tmp_path / 'a'}"]), progress=False)
    named = apply_overrides(preset("tiny"), [*base, "model.num_classes=2", f"train.out_dir={tmp_path / 'b'}",
                                             "model.class_names=[\"Smileys\", \"People\"]"])
    with pytest.raises(ConfigError, match="its classes are cat, dog, but model.class_names are Smileys, "
                                          "People.*set model.class_names=null"):
        train(named, progress=False)
    ok = train(apply_overrides(named, ["model.class_names=null"]), progress=False)
    assert ok.pipeline.config.class_names == ["cat", "dog"]


def test_a_model_directory_with_nan_weights_is_refused_naming_the_tensor(tmp_path):
    d = MSFPipeline(preset("tiny").model).save_pretrained(tmp_path / "m")
    state = load_file(d / "scale_1.safetensors")
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    save_file(state, str(d / "scale_1.safetensors"))
    with pytest.raises(ModelDirError, match=r"scale_1.safetensors: blocks.0.attn.qkv.weight holds NaN"):
        MSFPipeline.from_pretrained(d)


def test_cuda_asked_for_without_cuda_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = MSFPipeline(preset("tiny").model).save_pretrained(tmp_path / "m")
    assert main(["sample", str(model), "--num-samples", "2", "--npz", str(tmp_path / "s.npz"),
                 "--device", "cuda"]) == 2
    assert "device 'cuda': CUDA is not available here" in capsys.readouterr().err


def test_loader_workers_default_to_what_the_machine_has(monkeypatch):
    import os

    import msf.training.train as mt
    from msf.training.distributed import World

    tc = preset("tiny").train
    assert tc.num_workers is None

    def workers(configured):
        tc.num_workers = configured
        return mt._loading(tc, World())["num_workers"]

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert workers(None) == 1 and workers(3) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert workers(None) == 4


def test_a_finished_sample_set_is_not_replaced_by_one_with_other_settings(tmp_path):
    from msf.evaluation.sample_set import read_meta, sample_set

    pipe = MSFPipeline(preset("tiny").model)
    out = tmp_path / "s.npz"
    kw = dict(batch_size=4, precision="fp32", progress=False)
    sample_set(pipe, out, 4, steps=2, **kw)
    with pytest.raises(ValueError, match=r"s.npz: exists, drawn with other settings \(steps: \[2, 2\] -> "
                                         r"\[3, 3\]\).*--overwrite"):
        sample_set(pipe, out, 4, steps=3, **kw)
    assert read_meta(out)["steps"] == [2, 2]
    sample_set(pipe, out, 4, steps=3, overwrite=True, **kw)
    assert read_meta(out)["steps"] == [3, 3]


def test_symlinks_in_class_folders_count_each_image_once_in_its_own_class(tmp_path):
    import os

    from PIL import Image

    from msf.training.imagefolder import ImageFolder

    root = tmp_path / "train"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / name / f"{i}.png")
    (root / "dog" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(root / "dog" / "sub" / "deep.png")
    os.symlink("..", root / "dog" / "loop")            # back up the tree: every class again
    os.symlink("../cat", root / "dog" / "cats")        # into another class
    os.symlink("../cat/0.png", root / "dog" / "x.png")  # a file of another class
    os.symlink("sub", root / "dog" / "again")          # the same folder twice
    elsewhere = tmp_path / "elsewhere"                 # outside the tree: a legitimate link
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "far.png")
    os.symlink(elsewhere, root / "dog" / "far")
    with pytest.warns(UserWarning, match=r"not followed or counted twice: 4 symlink\(s\)"):
        ds = ImageFolder(root, 8)
    per_class = {c: sorted(os.path.relpath(p, root / c) for p, y in ds.samples if y == i)
                 for i, c in enumerate(ds.classes)}
    assert per_class == {"cat": ["0.png", "1.png", "2.png"],
                         "dog": ["0.png", "1.png", "2.png", "far/far.png", "sub/deep.png"]}
    assert sorted(os.path.basename(p) for p in ds.skipped_links) == ["again", "cats", "loop", "x.png"]


def test_strict_data_with_loader_processes_fails_in_one_line(tmp_path, capsys):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(tmp_path / "data" / c / f"{i}.png")
    (tmp_path / "data" / "b" / "broken.png").write_bytes(b"not a png")
    assert main(["train", "--preset", "tiny", "--quiet", f"train.data={tmp_path / 'data'}",
                 "model.num_classes=2", "model.class_names=null", "train.strict_data=true",
                 "train.num_workers=1", "train.balance_classes=false", "train.steps=6", "train.batch_size=4",
                 "train.tensorboard=false", f"train.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.png: cannot decode image" in err, err


def _short_png(path, width=400, height=300):
    """A PNG whose zlib stream is well formed but holds one row of the many it declares."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" + b"\0" * 3 * width)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_a_png_whose_data_ends_early_is_damaged_not_black(tmp_path):
    from PIL import Image

    from msf.training.imagefolder import load_image

    _short_png(tmp_path / "short.png")
    with pytest.raises(ValueError, match=r"PNG image data ends early: 1201 of 360300 bytes \(400 x 300"):
        load_image(tmp_path / "short.png", 32)
    Image.new("RGB", (400, 300)).save(tmp_path / "black.png")  # a whole black image is fine
    assert load_image(tmp_path / "black.png", 32).max() == 0


def test_unreadable_images_are_listed_once_each_with_the_reason(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(tmp_path / "data" / c / f"{i}.png")
    (tmp_path / "data" / "b" / "broken.png").write_bytes(b"not a png")
    _short_png(tmp_path / "data" / "a" / "short.png")
    cfg = apply_overrides(preset("tiny"), [*QUICK, f"train.data={tmp_path / 'data'}", "model.num_classes=2",
                                           "model.class_names=null", "train.num_workers=0", "train.steps=12",
                                           "train.batch_size=8", f"train.out_dir={tmp_path / 'run'}"])
    with pytest.warns(UserWarning, match=r"2 unreadable image file\(s\) were replaced by their neighbours "
                                         r"\(\d+ reads\); the list, with reasons: .*unreadable_images.txt"):
        train(cfg, progress=False)
    listing = (tmp_path / "run" / "unreadable_images.txt").read_text()
    rows = dict(line.split("\t") for line in listing.splitlines())
    short, broken = str(tmp_path / "data" / "a" / "short.png"), str(tmp_path / "data" / "b" / "broken.png")
    assert set(rows) == {short, broken}
    assert "PNG image data ends early" in rows[short] and "UnidentifiedImageError" in rows[broken]


def test_extract_into_a_cache_made_with_other_settings_is_refused(tmp_path):
    from msf.training.data import load_builtin
    from msf.training.extract import extract
    from msf.training.latent_cache import CacheError

    small = load_builtin()
    small.images, small.labels = small.images[:18], torch.arange(18) % 9
    cfg = apply_overrides(preset("tiny"), [])
    extract(cfg, tmp_path / "c", shard_size=8, progress=False, data=small)
    extract(cfg, tmp_path / "c", shard_size=8, progress=False, data=small)  # the same: resumes, nothing to do
    other = apply_overrides(preset("tiny"), ["model.base_mode=latent"])
    with pytest.raises(CacheError, match=r"holds shards extracted with other settings "
                                         r"\(model: .*'base_mode': 'image'.*'latent'"):
        extract(other, tmp_path / "c", shard_size=8, progress=False, data=small)
    with pytest.raises(CacheError, match=r"dtype: 'float16' -> 'float32'"):
        extract(cfg, tmp_path / "c", shard_size=8, dtype="float32", progress=False, data=small)


def test_a_busy_machine_with_several_threads_per_process_is_named(tmp_path, monkeypatch):
    import os

    import msf.training.run_log as run_log

    cfg = apply_overrides(preset("tiny"), [*QUICK, "train.steps=1"])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(run_log, "busy_cpus", lambda: 1.0)  # another process keeps one core busy
    with pytest.warns(UserWarning, match=r"the machine is busy \(1.0 of 2 CPUs in use by other processes\) "
                                         r".* 2 threads.*OMP_NUM_THREADS=1"):
        train(cfg, progress=False, save=False)
    monkeypatch.setattr(run_log, "busy_cpus", lambda: 0.1)  # idle: no word
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(cfg, progress=False, save=False)


def test_a_gpu_that_cuda_cannot_use_stops_the_run_and_the_device_is_named(tmp_path, monkeypatch, capsys):
    import msf.training.distributed as md

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(md, "gpu_present", lambda: "/dev/nvidia0")
    cfg = apply_overrides(preset("tiny"), [*QUICK, f"train.out_dir={tmp_path / 'a'}"])
    with pytest.raises(ValueError, match=r"an NVIDIA GPU is present \(/dev/nvidia0\) but this torch cannot "
                                         r"use it.*nvidia-smi.*--device cpu"):
        train(cfg, progress=False)
    result = train(cfg, progress=True, device="cpu")  # asked for explicitly: runs, and says where
    assert result.steps == 2
    assert "[msf] training on cpu (1 thread; torch" in capsys.readouterr().out


def test_busy_cpus_counts_other_processes_not_this_one():
    from msf.training.run_log import busy_cpus, cpus, others_busy

    # (all ticks, idle + iowait ticks, this process's ticks) before and after, on 2 CPUs
    assert others_busy((1000, 500, 10), (1100, 550, 10), 2) == pytest.approx(1.0)  # one core busy
    assert others_busy((1000, 500, 10), (1100, 550, 60), 2) == pytest.approx(0.0)  # busy: ourselves
    assert others_busy((1000, 500, 0), (1000, 500, 0), 2) is None
    measured = busy_cpus(0.05)  # reads /proc on Linux
    assert measured is None or 0.0 <= measured <= cpus() + 0.01


def test_a_loss_that_stays_above_twice_its_first_value_is_named_once():
    import warnings
    from types import SimpleNamespace

    from msf.training.distributed import World
    from msf.training.run_log import RunLog

    history = {0: [], 1: []}
    opts = {k: SimpleNamespace(param_groups=[{"lr": 1e-4}]) for k in history}
    log = RunLog(preset("tiny"), World(), history, opts, enabled=False)

    def logged(step, *losses):
        log.running, log.count = torch.tensor(losses, dtype=torch.float64), 1
        return log.write(step, [0, 1])

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logged(10, 1.0, 1.0)
        logged(20, 0.6, 1.5)  # a rise, but under twice the first: training noise, not divergence
        logged(30, 27.4, 500.0)  # scale 1: one window's spike, which comes back down (as at 45 minutes)
        for step in (40, 50):
            logged(step, 27.4, 0.9)
    with pytest.warns(UserWarning, match=r"scale 0's loss has stayed above twice its first \(1 at step 10\): "
                                         r"median 27.4 over the 5 logs to step 60.*lower train.lr") as seen:
        logged(60, 27.4, 0.9)
    assert len(seen) == 1  # scale 1's spike, among its last five logs, is not divergence
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logged(70, 675.0, 0.8)  # once per scale, not at every log
    assert history[0][-1] == (70, 675.0)
