import json
from pathlib import Path

import numpy as np
from helpers import grid_cells
from PIL import Image

from msf.interfaces.demo import run_demo
from msf.method.pipeline import MSFPipeline
from msf.training.data import to_uint8

SMALL = ["model.scales.0.depth=1", "model.scales.0.width=32", "model.scales.0.heads=2",
         "model.scales.1.depth=1", "model.scales.1.width=32", "model.scales.1.heads=2",
         "model.scales.0.steps=2", "model.scales.1.steps=2"]


def test_demo_writes_the_trained_models_samples(tmp_path):
    paths = run_demo(tmp_path / "demo", minutes=1.0, per_class=2, progress=False,
                     overrides=["train.steps=3", "train.log_every=1", "train.ema_decay=0.1", *SMALL])
    pipe = MSFPipeline.from_pretrained(paths["model"])
    cfg = pipe.config
    saved = json.loads((paths["model"] / "config.json").read_text())
    train_cfg = saved["train"]
    assert train_cfg["steps"] == 3
    # make demo trains demo-plus's recipe (the tiny sizes above are the test's own)
    assert train_cfg["lr"] == 4e-3 and saved["model"]["prior_noise"] == 0.2 and train_cfg["ema_decay"] == 0.1
    assert saved["model"]["scales"][0]["cfg_scale"] == 7.0  # and samples with its guidance
    # samples.png: one row per class, each cell the saved model's sample for that class and seed 0
    labels = [c for c in range(cfg.num_classes) for _ in range(2)]
    expected = to_uint8(pipe.sample(labels, seed=0, precision=train_cfg["precision"])).numpy()
    cells = grid_cells(paths["samples"], cfg.num_classes, 2, cfg.image_size)
    np.testing.assert_array_equal(cells.reshape(expected.shape), expected)
    assert len(np.unique(expected.reshape(len(labels), -1), axis=0)) == len(labels)
    # factorization.png shows real images; loss.png the three logged steps
    for key in ("factorization", "loss"):
        assert Image.open(paths[key]).width > 100
    losses = json.loads((paths["model"].parent / "losses.json").read_text())
    assert [s for s, _ in losses["0"]] == [1, 2, 3] and all(np.isfinite(v) for _, v in losses["1"])


def test_demo_says_when_its_time_cap_cut_training_and_what_to_try_next(tmp_path, capsys):
    import pytest

    with pytest.warns(UserWarning, match="time cap"):
        paths = run_demo(tmp_path / "demo", minutes=0.0, per_class=1, progress=False,
                         overrides=["train.steps=40", *SMALL])
    out = capsys.readouterr().out
    assert "WARNING: the 0-minute cap stopped training at step 1 of 40" in out
    assert "sampling the raw weights" in out  # one step: the EMA is still its random start
    assert "msf sample" in out and str(paths["model"]) in out and "--show-scales" in out
    assert "tensorboard --logdir" in out


def test_a_short_demo_samples_its_raw_weights_and_says_so(tmp_path, capsys):
    import pytest
    import torch

    from msf.interfaces.load import from_checkpoint

    with pytest.warns(UserWarning, match="EMA weights .* still hold 99.0% of their random start after 2 up"):
        paths = run_demo(tmp_path / "demo", minutes=1.0, per_class=1, progress=False,
                         overrides=["train.steps=2", "train.lr=5e-2", *SMALL])  # decay 0.995: young
    out = capsys.readouterr().out
    assert "EMA weights still hold 99.0% of their random start: sampling the raw weights" in out
    raw = from_checkpoint(paths["model"].parent / "checkpoints" / "step_000000002.pt", "raw")
    labels = list(range(raw.config.num_classes))
    expected = to_uint8(raw.sample(labels, seed=0, precision="auto")).numpy()
    cells = grid_cells(paths["samples"], raw.config.num_classes, 1, raw.config.image_size)
    np.testing.assert_array_equal(cells.reshape(expected.shape), expected)
    ema = MSFPipeline.from_pretrained(paths["model"])  # the model directory still holds the EMA
    assert not all(torch.equal(a, b) for a, b in zip(ema.parameters(), raw.parameters()))


def test_the_next_commands_survive_a_shell_whatever_the_class_and_folder_names(tmp_path):
    import shlex

    from msf.interfaces.demo import next_steps

    out = tmp_path / "my runs" / "demo"
    text = next_steps(out, out / "model", ["Smileys & Emotion", "Flags"])
    sample = next(line for line in text.splitlines() if "--per-class 16" in line)
    argv = shlex.split(sample.split(":", 1)[1])  # as a POSIX shell would split the pasted command
    assert argv[:2] == ["msf", "sample"] and argv[2] == str(out / "model")
    assert argv[argv.index("--classes") + 1] == "Smileys & Emotion"
    assert argv[argv.index("--out") + 1] == "smileys-emotion.png"
    assert "&" not in argv and ";" not in sample.replace("'Smileys & Emotion'", "")


def test_the_suggested_comparison_pits_the_demos_own_recipe_against_the_dit():
    import shlex

    from msf.interfaces.demo import next_steps
    from msf.presets import preset

    line = next(x for x in next_steps(Path("d"), Path("d/model"), []).splitlines() if "msf compare" in x)
    argv = shlex.split(line.split(":", 1)[1])
    names = argv[argv.index("--presets") + 1].split(",")
    # the preset `make demo` trains, and its K = 1 DiT counterpart, each with its own measured guidance
    assert names == ["dit-demo-plus", "demo-plus"]
    for name in names:
        preset(name)  # a renamed preset would fail here
