"""Issue 19, item 6: sharded checkpoints (``train.ckpt_format=sharded``, torch.distributed.checkpoint).

What is bit for bit and what is not:

* At one process count, a run computes the same bits whatever the checkpoint format, and a
  checkpoint written by N processes loads into M exactly (DCP copies the pieces, it does no
  arithmetic): checked with ``torch.equal`` (FSDP 2 -> 1, DDP 1 -> 2).
* A run whose process count changes mid-way is not bit-identical to an uninterrupted one: 2
  processes sum each gradient in another order than 1 (see ``test_distributed.py``). Those
  comparisons allow 1e-6 on weights and optimizer state (6e-8 seen after 4 steps) and 1e-5 on
  the logged losses.
"""

import os
import pickle
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import HANG, kill_after_checkpoint

import msf.training.checkpoint
from msf.config import ConfigError, apply_overrides
from msf.interfaces.load import load_pipeline, resolve
from msf.method.pipeline import MSFPipeline
from msf.presets import preset
from msf.training.checkpoint import CheckpointError, list_checkpoints, load_latest, prune, read_sharded
from msf.training.train import train

OVERRIDES = ["train.tensorboard=false", "train.batch_size=16", "train.log_every=1", "train.lr=3e-3",
             "model.prior_noise=0.1"]
SHARDED = "train.ckpt_format=sharded"


def _cfg(out, steps, *extra):
    return apply_overrides(preset("tiny"), [*OVERRIDES, f"train.steps={steps}", f"train.out_dir={out}",
                                            *extra])


def _torchrun(out, steps, *extra, resume=False):
    """``msf train`` under torchrun with 2 gloo processes, as ``test_distributed.py`` launches it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "msf", "train", "--preset", "tiny", "--quiet", *OVERRIDES, f"train.steps={steps}",
           f"train.out_dir={out}", *extra, *(["--resume"] if resume else [])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def _state(path):
    """The whole state of a checkpoint of either format (a run directory: its newest)."""
    if (path / "checkpoints").is_dir():
        path = load_latest(path / "checkpoints")[1]
    return read_sharded(path) if path.is_dir() else torch.load(path, weights_only=True)


def _tensors(state):
    """(name, tensor) of the weights, EMA weights and optimizer state."""
    for key in ("models", "emas"):
        for k, sd in state[key].items():
            yield from ((f"{key}.{k}.{n}", v) for n, v in sd.items())
    for k, osd in state["optimizers"].items():
        for fqn, st in osd["state"].items():
            yield from ((f"optimizers.{k}.{fqn}.{n}", v) for n, v in st.items())


def _assert_equal(a, b):
    ta, tb = dict(_tensors(a)), dict(_tensors(b))
    assert ta.keys() == tb.keys() and ta
    for name, v in tb.items():
        assert torch.equal(ta[name], v), name
    assert _groups(a) == _groups(b)
    assert a["step"] == b["step"] and a["history"] == b["history"]


def _groups(state):
    # the full format's resume hands AdamW its betas back as a list: the same numbers
    return [[{**g, "betas": tuple(g["betas"])} for g in o["param_groups"]]
            for o in state["optimizers"].values()]


def _assert_close(a, b):
    ta, tb = dict(_tensors(a)), dict(_tensors(b))
    assert ta.keys() == tb.keys() and ta
    for name, v in tb.items():
        torch.testing.assert_close(ta[name], v, atol=1e-6, rtol=1e-5, msg=name)
    assert a["step"] == b["step"]
    for k, losses in b["history"].items():
        assert [s for s, _ in a["history"][k]] == [s for s, _ in losses]
        assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a["history"][k], losses))


def _start_from(src_ckpt, run):
    """A run directory holding only ``src_ckpt`` (to resume it elsewhere)."""
    dest = run / "checkpoints" / src_ckpt.name
    dest.parent.mkdir(parents=True)
    (shutil.copytree if src_ckpt.is_dir() else shutil.copy)(src_ckpt, dest)


def test_fsdp_sharded_checkpoints_resume_2_to_1_and_1_to_2(tmp_path):
    one = tmp_path / "one"  # uninterrupted, one process
    train(_cfg(one, 4, SHARDED, "train.ckpt_every=2"), progress=False)
    _torchrun(tmp_path / "a", 2, "train.fsdp=true", SHARDED)
    _torchrun(tmp_path / "f", 2, "train.fsdp=true")  # the same run, in the full format
    ckpt = tmp_path / "a" / "checkpoints" / "step_000000002"
    # each process wrote its own shards; nothing was gathered into one file
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "msf.json"]
    a2 = read_sharded(ckpt)
    assert a2["world_size"] == 2 and a2["ckpt_format"] == "sharded"
    _assert_equal(a2, _state(tmp_path / "f"))  # the format changes no bit; read whole in one process

    # 2 -> 1: resumed by one process, exactly as the full checkpoint is; to rounding as the one-process run
    train(_cfg(tmp_path / "a", 4, SHARDED), progress=False, resume=True)
    train(_cfg(tmp_path / "f", 4), progress=False, resume=True)
    _assert_equal(_state(tmp_path / "a"), _state(tmp_path / "f"))
    _assert_close(_state(tmp_path / "a"), _state(one))

    # 1 -> 2: the one-process run's step-2 checkpoint, resumed by 2 FSDP processes
    _start_from(one / "checkpoints" / "step_000000002", tmp_path / "b")
    _torchrun(tmp_path / "b", 4, "train.fsdp=true", SHARDED, resume=True)
    b = _state(tmp_path / "b")
    assert b["world_size"] == 2 and b["history"]["0"][:2] == _state(one)["history"]["0"][:2]
    _assert_close(b, _state(one))


def test_ddp_sharded_checkpoints_resume_1_to_2_and_2_to_1(tmp_path):
    one = tmp_path / "one"
    train(_cfg(one, 4, SHARDED, "train.ckpt_every=2"), progress=False)
    train(_cfg(tmp_path / "full", 2), progress=False)  # one's first 2 steps, in the full format

    # 1 -> 2: two DDP processes continue from the sharded checkpoint exactly as from the full one
    _start_from(one / "checkpoints" / "step_000000002", tmp_path / "b")
    _torchrun(tmp_path / "b", 4, SHARDED, resume=True)
    _start_from(tmp_path / "full" / "checkpoints" / "step_000000002.pt", tmp_path / "c")
    _torchrun(tmp_path / "c", 4, resume=True)
    _assert_equal(_state(tmp_path / "b"), _state(tmp_path / "c"))
    _assert_close(_state(tmp_path / "b"), _state(one))

    # 2 -> 1: DDP's replicated tensors are written once, and resume in one process
    _torchrun(tmp_path / "a", 2, SHARDED)
    assert read_sharded(tmp_path / "a" / "checkpoints" / "step_000000002")["world_size"] == 2
    train(_cfg(tmp_path / "a", 4, SHARDED), progress=False, resume=True)
    _assert_close(_state(tmp_path / "a"), _state(one))


def test_one_process_resume_from_a_sharded_checkpoint_is_bit_exact(tmp_path):
    train(_cfg(tmp_path / "a", 3, SHARDED), progress=False)
    more = train(_cfg(tmp_path / "a", 6, SHARDED), progress=False, resume=True)
    ref = train(_cfg(tmp_path / "b", 6), progress=False)
    assert more.checkpoint.name == "step_000000006" and more.checkpoint.is_dir()
    _assert_equal(_state(tmp_path / "a"), _state(tmp_path / "b"))
    # a full checkpoint resumes into a sharded run (and is then continued in that format)
    train(_cfg(tmp_path / "b", 8, SHARDED), progress=False, resume=True)
    train(_cfg(tmp_path / "c", 8), progress=False)
    _assert_equal(_state(tmp_path / "b"), _state(tmp_path / "c"))
    assert ref.checkpoint.suffix == ".pt"


def test_sigkill_during_sharded_saves_then_resume_equals_uninterrupted(tmp_path):
    # a checkpoint every step: the kill most likely lands inside a save
    steps, out = 40, tmp_path / "killed"
    cli = [sys.executable, "-m", "msf", "train", "--preset", "tiny", "--quiet", *OVERRIDES, SHARDED,
           f"train.steps={steps}", f"train.out_dir={out}", "train.ckpt_every=1", "train.keep_last=2"]
    kill_after_checkpoint(cli, out / "checkpoints", 10)
    assert 10 <= list_checkpoints(out / "checkpoints")[-1][0] < steps
    resumed = subprocess.run(cli + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    train(_cfg(tmp_path / "ref", steps), progress=False)
    _assert_equal(_state(out), _state(tmp_path / "ref"))


def test_atomic_saves_pruning_and_damaged_directories(tmp_path, monkeypatch):
    run, d = tmp_path / "r", tmp_path / "r" / "checkpoints"
    cfg = _cfg(run, 5, SHARDED, "train.ckpt_every=1", "train.keep_last=2", "train.keep_every=2")
    train(cfg, progress=False)
    assert [s for s, _ in list_checkpoints(d)] == [2, 4, 5]  # pruned: the last 2 and every 2nd
    assert sorted(os.listdir(d)) == ["step_000000002", "step_000000004", "step_000000005"]

    # a save cut short after DCP wrote its files, before the marker: the previous checkpoint stands
    def crash(*a, **kw):
        raise OSError("no space left on device")

    monkeypatch.setattr(msf.training.checkpoint, "atomic_write_text", crash)
    with pytest.raises(OSError, match="no space left"):
        train(apply_overrides(cfg, ["train.steps=6"]), progress=False, resume=True)
    monkeypatch.undo()
    assert (d / ".step_000000006.partial" / ".metadata").is_file()
    assert [s for s, _ in list_checkpoints(d)] == [2, 4, 5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a temporary directory is no damaged checkpoint: no warning
        assert load_latest(d)[0]["step"] == 5
    (d / ".step_000000003.partial").mkdir()  # an older save cut short: removed at the next save
    train(apply_overrides(cfg, ["train.steps=6"]), progress=False, resume=True)
    assert sorted(os.listdir(d)) == ["step_000000002", "step_000000004", "step_000000005", "step_000000006"]

    # damaged newer directories: no marker, a shard cut short, a .metadata that would run code
    good = d / "step_000000006"
    for step in (7, 8, 9):
        shutil.copytree(good, d / f"step_{step:09d}")
    (d / "step_000000007" / "msf.json").unlink()
    shard = d / "step_000000008" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    (d / "step_000000009" / ".metadata").write_bytes(
        pickle.dumps(_Evil(str(tmp_path / "pwned"))))
    with pytest.warns(UserWarning) as seen:
        state, path = load_latest(d)
    assert state["step"] == 6 and path == good
    messages = " | ".join(str(w.message) for w in seen)
    assert "step 9" in messages and "not part of DCP's metadata" in messages
    assert "step 8" in messages and "cut short" in messages
    assert "step 7" in messages and "no msf.json" in messages
    assert not (tmp_path / "pwned").exists()
    # damaged ones never count toward keep_last and are left for the user
    prune(d, keep_last=1)
    assert [s for s, _ in list_checkpoints(d)] == [6, 7, 8, 9]

    # sampling takes the sharded checkpoint too: EMA weights by default, the raw ones on request
    assert resolve(good) == ("checkpoint", good)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        from_run = load_pipeline(run)
    ema = MSFPipeline.from_pretrained(run / "model")
    for k in range(2):
        for name, v in ema.networks[k].state_dict().items():
            assert torch.equal(from_run.networks[k].state_dict()[name], v)
    raw, whole = load_pipeline(good, weights="raw"), read_sharded(good)
    for k in range(2):
        for name, v in whole["models"][str(k)].items():
            assert torch.equal(raw.networks[k].state_dict()[name], v)
    with pytest.raises(CheckpointError, match="cut short"):
        load_pipeline(d / "step_000000008")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_ckpt_format_is_checked():
    with pytest.raises(ConfigError, match=r"train.ckpt_format must be one of \('full', 'sharded'\)"):
        apply_overrides(preset("tiny"), ["train.ckpt_format=zip"])
    assert preset("tiny").train.ckpt_format == "full"
