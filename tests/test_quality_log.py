"""train.eval_every: quality against step, logged and plotted (issue 19, item 1)."""

import json

import numpy as np
import pytest
import torch
from helpers import MeanColour

import msf.evaluation.metrics as metrics
from msf.config import ConfigError, apply_overrides, validate
from msf.evaluation.metrics import evaluate
from msf.presets import preset
from msf.training.data import load_builtin, prepare_data, to_uint8
from msf.training.train import train


def test_quality_is_checked_every_n_steps_against_the_training_data(tmp_path, monkeypatch):
    standin = MeanColour()  # the real network is tested in test_metrics.py: a cheap stand-in here
    monkeypatch.setattr(metrics, "load_feature_extractor", lambda *a, **k: standin)
    cfg = apply_overrides(preset("tiny"), ["train.steps=4", "train.eval_every=2", "train.eval_samples=18",
                                           "train.log_every=2", "train.tensorboard=false",
                                           f"train.out_dir={tmp_path / 'run'}"])
    result = train(cfg, progress=False)
    out = tmp_path / "run"
    rows = json.loads((out / "quality.json").read_text())
    assert [r["step"] for r in rows] == [2, 4] and all(r["num_samples"] == 18 for r in rows)
    # the last check scores the final EMA model's samples against the training data, as msf eval would
    with np.load(out / "quality_samples.npz") as f:
        assert np.bincount(f["arr_1"]).tolist() == [2] * 9
        again = to_uint8(result.pipeline.sample(torch.from_numpy(f["arr_1"]), seed=0, precision="auto"))
        np.testing.assert_array_equal(f["arr_0"], again.numpy())
    ref = out / "eval_ref.npz"
    with np.load(ref) as f:
        assert f["arr_0"].shape == (len(load_builtin().labels), 16, 16, 3)
        np.testing.assert_array_equal(f["arr_0"], prepare_data(load_builtin(), 16).images.numpy())
    r = evaluate(str(out / "quality_samples.npz"), str(ref), metrics=("fid", "kid"), extractor=standin,
                 progress=False, bootstraps=0, floor=False, cache_dir=tmp_path / "c")
    assert rows[-1]["fid"] == pytest.approx(r["fid"]) and rows[-1]["kid"] == pytest.approx(r["kid"])
    assert (out / "quality.png").stat().st_size > 1000
    assert "eval/fid=" in (out / "log.txt").read_text()


def test_eval_metrics_are_checked():
    cfg = preset("tiny")
    cfg.train.eval_metrics = "fid,is"
    with pytest.raises(ConfigError, match="train.eval_metrics='fid,is'"):
        validate(cfg)


def test_quality_checks_need_a_reference_when_the_data_has_no_images_to_build_one(tmp_path):
    from msf.training.data import load_builtin

    cfg = apply_overrides(preset("tiny"), ["train.steps=2", "train.eval_every=1",
                                           f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="a dataset object was passed.*set train.eval_ref"):
        train(cfg, data=load_builtin(), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step
