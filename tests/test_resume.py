"""Checkpoints and resume: a run killed at any moment continues exactly."""

import json
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from helpers import HANG, grid_cells, kill_after_checkpoint
from safetensors.torch import load_file

from msf.config import apply_overrides
from msf.method.pipeline import MSFPipeline
from msf.presets import preset
from msf.training.checkpoint import CheckpointError, list_checkpoints, load_latest, prune, save_checkpoint
from msf.training.data import to_uint8
from msf.training.train import learning_rate, train

BASE = ["train.tensorboard=false", "train.log_every=5", "train.lr=3e-3", "train.warmup_steps=5",
        "train.lr_schedule=cosine", "model.prior_noise=0.1", "train.class_dropout=0.2"]


def _cfg(out, steps=40, extra=()):
    return apply_overrides(preset("tiny"), [*BASE, f"train.steps={steps}", f"train.out_dir={out}",
                                            *extra])


def _cli(out, steps, extra=(), resume=False):
    cmd = [sys.executable, "-m", "msf", "train", "--preset", "tiny", "--quiet",
           *BASE, f"train.steps={steps}", f"train.out_dir={out}", *extra]
    return cmd + (["--resume"] if resume else [])


def _weights(model_dir):
    return {k: load_file(str(model_dir / f"scale_{k}.safetensors")) for k in (0, 1)}


def _assert_same(a, b):
    for k in a:
        for name in a[k]:
            assert torch.equal(a[k][name], b[k][name]), (k, name)


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    steps, out = 60, tmp_path / "killed"
    kill_after_checkpoint(_cli(out, steps, ["train.ckpt_every=5", "train.keep_last=2"]), out / "checkpoints",
                          20)
    last = list_checkpoints(out / "checkpoints")[-1][0]
    assert 20 <= last < steps
    # keep_last=2, plus possibly one more when the kill fell between a save and its pruning.
    assert len(list_checkpoints(out / "checkpoints")) <= 3

    resumed = subprocess.run(_cli(out, steps, ["train.ckpt_every=5"], resume=True),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    ref = train(_cfg(tmp_path / "ref", steps), progress=False)
    _assert_same(_weights(out / "model"), _weights(ref.model_dir))
    # The raw weights and optimizer state continue exactly too, not only the EMA.
    a, _ = load_latest(out / "checkpoints")
    b, _ = load_latest(tmp_path / "ref" / "checkpoints")
    assert a["step"] == b["step"] == steps
    for k in ("0", "1"):
        for name, v in b["models"][k].items():
            assert torch.equal(a["models"][k][name], v)
        for pid, st in b["optimizers"][k]["state"].items():
            assert torch.equal(a["optimizers"][k]["state"][pid]["exp_avg_sq"], st["exp_avg_sq"])


def test_resume_in_process_extends_a_finished_run(tmp_path):
    # Extending a run keeps it exact under a constant schedule (a cosine one is
    # defined by the total number of steps, so extending it changes the run).
    const = ["train.lr_schedule=constant"]
    train(_cfg(tmp_path / "a", 10, const), progress=False)
    more = train(_cfg(tmp_path / "a", 20, const), progress=False, resume=True)
    ref = train(_cfg(tmp_path / "b", 20, const), progress=False)
    assert more.steps == 20
    _assert_same(_weights(more.model_dir), _weights(ref.model_dir))
    assert [s for s, _ in more.history[0]] == [s for s, _ in ref.history[0]]


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(out, 100000, ["train.ckpt_every=0"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "config.json").exists():
        time.sleep(0.05)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=HANG)
    assert proc.returncode == 130, stderr[-2000:]
    assert "resume with" in stdout
    ckpts = list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 1 and 0 < ckpts[0][0] < 100000
    assert (out / "model" / "scale_0.safetensors").is_file()


def test_nonfinite_loss_stops_or_skips(tmp_path, monkeypatch):
    real = MSFPipeline.training_losses
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        losses = real(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 7:
            losses[1] = losses[1] * float("nan")
        return losses

    monkeypatch.setattr(MSFPipeline, "training_losses", poisoned)
    with pytest.raises(FloatingPointError, match=r"step 7 .*scale\(s\) \[1\].*step_000000005.pt"):
        train(_cfg(tmp_path / "stop", 10, ["train.ckpt_every=5"]), progress=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "stop" / "checkpoints")] == [5]
    calls["n"] = 0
    result = train(_cfg(tmp_path / "skip", 10, ["train.on_nonfinite=skip"]), progress=False)
    assert result.skipped == 1 and result.steps == 10
    assert all(torch.isfinite(p).all() for p in result.pipeline.parameters())


def test_checkpoint_retention_and_damaged_files(tmp_path):
    d = tmp_path / "ck"
    for step in range(1, 10):
        save_checkpoint(d, step, {"x": torch.tensor([step])})
        prune(d, keep_last=2, keep_every=4)
    assert [s for s, _ in list_checkpoints(d)] == [4, 8, 9]
    (d / ".step_000000010.pt.tmp").write_bytes(b"half-written")  # a write cut short
    (d / "step_000000011.pt").write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        state, path = load_latest(d)
    assert state["step"] == 9 and path.name == "step_000000009.pt"
    assert any("step 11" in str(x.message) for x in w)


def test_resume_refuses_a_different_model_but_not_other_sampler_defaults(tmp_path):
    train(_cfg(tmp_path / "a", 3), progress=False)
    with pytest.raises(CheckpointError, match=r"differs from this run's in \['scales'\]"):
        train(_cfg(tmp_path / "a", 6, ["model.scales.0.depth=3"]), progress=False, resume=True)
    # how the model samples is not what it trains: new sampler defaults resume (a preset's may move)
    sampling = ["model.scales.*.steps=3", "model.scales.0.solver=ab2", "model.samplers={}"]
    resumed = train(_cfg(tmp_path / "a", 5, sampling), progress=False, resume=True)
    assert resumed.steps == 5 and resumed.pipeline.config.scales[0].solver == "ab2"


def test_learning_rate_schedule():
    t = preset("tiny").train
    t.lr, t.warmup_steps, t.lr_schedule, t.min_lr_ratio = 1.0, 10, "cosine", 0.1
    assert learning_rate(t, 5, 110) == pytest.approx(0.5)
    assert learning_rate(t, 10, 110) == pytest.approx(1.0)
    assert learning_rate(t, 60, 110) == pytest.approx(0.55)
    assert learning_rate(t, 110, 110) == pytest.approx(0.1)
    t.lr_schedule = "constant"
    assert learning_rate(t, 80, 110) == 1.0


def test_run_directory_contents(tmp_path):
    cfg = _cfg(tmp_path / "r", 4, ["train.tensorboard=true", "train.sample_every=2", "train.log_every=2"])
    result = train(cfg, progress=False)
    out = tmp_path / "r"
    from msf.config import config_from_json

    saved = config_from_json((out / "config.json").read_text())
    assert saved.model == result.pipeline.config and saved.train == cfg.train
    losses = json.loads((out / "losses.json").read_text())
    assert {k: [tuple(p) for p in v] for k, v in losses.items()} == {
        str(k): v for k, v in result.history.items()}
    assert [s for s, _ in losses["0"]] == [2, 4]
    # the grid at the last step shows the EMA model's samples: 4 per class, seed 0, precision auto
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000000002.png", "step_000000004.png"]
    pipe = MSFPipeline.from_pretrained(out / "model")
    n = pipe.config.num_classes
    labels = [c for c in range(n) for _ in range(4)]
    expected = to_uint8(pipe.sample(labels, seed=0, precision="auto")).numpy()
    cells = grid_cells(out / "samples" / "step_000000004.png", n, 4, 16)
    np.testing.assert_array_equal(cells.reshape(expected.shape), expected)
    assert not np.array_equal(cells, grid_cells(out / "samples" / "step_000000002.png", n, 4, 16))
    # TensorBoard holds the logged losses at the logged steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb")).Reload()
    for k in ("0", "1"):
        logged = [(e.step, e.value) for e in events.Scalars(f"loss/scale{k}")]
        assert logged == [(s, pytest.approx(v, rel=1e-6)) for s, v in losses[k]]
    assert {"grad_norm/scale0", "lr/scale1", "images_per_second"} <= set(events.Tags()["scalars"])
    assert len(events.Images("samples")) == 2


def test_resume_of_a_config_without_class_names(tmp_path):
    # The paper presets name no classes: the data's names fill them in, before the resume check.
    extra = ["model.class_names=null", "train.lr_schedule=constant"]
    first = train(_cfg(tmp_path / "a", 2, extra), progress=False)
    assert first.pipeline.config.class_names[0] == "Smileys & Emotion"
    cfg = _cfg(tmp_path / "a", 4, extra)
    more = train(cfg, progress=False, resume=True)
    assert more.steps == 4 and cfg.model.class_names is None  # the caller's config is not changed


def test_resume_restores_the_step_the_skipped_count_and_the_loss_history(tmp_path, monkeypatch):
    real = MSFPipeline.training_losses

    def poisoned(self, *a, **kw):  # step 3's loss is NaN: skipped and counted
        losses = real(self, *a, **kw)
        if kw["noise"].step == 3:
            losses[0] = losses[0] * float("nan")
        return losses

    monkeypatch.setattr(MSFPipeline, "training_losses", poisoned)
    extra = ["train.on_nonfinite=skip", "train.lr_schedule=constant", "train.log_every=1"]
    first = train(_cfg(tmp_path / "a", 5, extra), progress=False)
    assert (first.steps, first.skipped) == (5, 1)
    resumed = train(_cfg(tmp_path / "a", 8, extra), progress=False, resume=True)
    whole = train(_cfg(tmp_path / "b", 8, extra), progress=False)
    assert (resumed.steps, resumed.skipped) == (whole.steps, whole.skipped) == (8, 1)
    for k in (0, 1):
        assert [s for s, _ in resumed.history[k]] == [1, 2, 4, 5, 6, 7, 8]
        assert [v for _, v in resumed.history[k]] == pytest.approx([v for _, v in whole.history[k]], rel=1e-5)
    saved = json.loads((tmp_path / "a" / "losses.json").read_text())
    assert [s for s, _ in saved["0"]] == [1, 2, 4, 5, 6, 7, 8]
