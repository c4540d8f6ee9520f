import json
import sys

import numpy as np
import pytest
from helpers import grid_cells

from msf.config import SamplerSettings
from msf.interfaces.cli import main
from msf.method.pipeline import MSFPipeline
from msf.presets import preset
from msf.training.data import to_uint8


def test_info_json_for_presets(capsys):
    assert main(["info", "paper-imagenet256", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["tokens"] for s in info["scales"]] == [144, 256]
    assert abs(info["scales"][0]["parameters"] - 435.9e6) / 435.9e6 < 1e-3
    assert main(["info", "dit-xl2"]) == 0
    out = capsys.readouterr().out
    assert "675.1M" in out and "GMACs" in out and "GFLOPs" in out


def test_train_sample_info_on_a_model_dir(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--quiet", "train.steps=2",
                 f"train.out_dir={out}"]) == 0
    model = out / "model"
    png = tmp_path / "s.png"
    assert main(["sample", str(model), "--classes", "0,Flags", "--per-class", "2", "--seed", "3",
                 "--steps", "2,1", "--cfg", "1.5,1.0", "--solver", "heun", "--out", str(png),
                 "--precision", "fp32", "--device", "cpu"]) == 0
    assert "wrote 4 samples" in capsys.readouterr().out
    # The grid holds what the library draws for the same classes and settings, a row per class.
    pipe = MSFPipeline.from_pretrained(model)
    flags = pipe.config.class_names.index("Flags")
    expected = to_uint8(pipe.sample([0, 0, flags, flags], seed=3, steps=[2, 1], cfg_scale=[1.5, 1.0],
                                    solver="heun")).numpy()
    np.testing.assert_array_equal(grid_cells(png, 2, 2, 16).reshape(expected.shape), expected)
    assert not np.array_equal(expected[0], expected[2])
    assert main(["info", str(model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["tokens"] for s in info["scales"]] == [16, 64]


def test_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "train.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "missing")]) == 2
    assert "model directory does not exist" in capsys.readouterr().err
    assert main(["info", "nonsense"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_bad_sampler_settings_fail_before_any_work(tmp_path, capsys, monkeypatch):
    model = MSFPipeline(preset("tiny").model).save_pretrained(tmp_path / "m")
    monkeypatch.setattr(MSFPipeline, "from_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    for args, message in ((["--cfg", "nan"], "cfg_scale: nan for scale 0 must be a number in [0, 100]"),
                          (["--steps", "-2"], "steps: -2 for scale 0 must be an integer >= 1"),
                          (["--num-samples", "0", "--npz", str(tmp_path / "s.npz")],
                           "--num-samples must be >= 1"),
                          (["--npz", str(tmp_path / "s.npz")], "--num-samples must be >= 1")):
        assert main(["sample", str(model), "--out", str(tmp_path / "x.png"), *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "s.npz").exists()
    assert not (tmp_path / "samples.png").exists()


def test_sample_with_a_shifted_grid_and_a_guidance_interval(tmp_path):
    from msf.evaluation.sample_set import read_meta

    model = MSFPipeline(preset("tiny").model).save_pretrained(tmp_path / "m")
    npz = tmp_path / "s.npz"
    assert main(["sample", str(model), "--num-samples", "3", "--npz", str(npz), "--steps", "4,2",
                 "--cfg", "2,1", "--solver", "ab2,midpoint", "--shift", "3,1", "--guidance-interval", "0:0.5",
                 "--precision", "fp32", "--device", "cpu", "--quiet"]) == 0
    meta = read_meta(npz)
    assert meta["solver"] == ["ab2", "midpoint"] and meta["shift"] == [3.0, 1.0]
    assert meta["guidance_interval"] == [[0.0, 0.5], [0.0, 0.5]]
    # a 4-step shifted grid (t = 1, .9, .75, .5) guided at t <= 0.5 once: 4 + 1 evaluations, then 2
    settings = SamplerSettings.of(preset("tiny").model, steps=[4, 2], cfg_scale=[2.0, 1.0], solver="ab2",
                                  shift=[3.0, 1.0], guidance_interval=(0.0, 0.5))
    assert settings.evaluations == 4 + 1 + 2


def test_warnings_read_as_one_line_of_the_command(monkeypatch, capsys):
    import warnings

    import msf.interfaces.cli

    def warn(args):
        warnings.warn("the EMA weights are young", stacklevel=2)
        return 0

    def shown(message, category, filename, lineno, file=None, line=None):  # as Python's default shows them
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)

    monkeypatch.setattr(msf.interfaces.cli, "cmd_info", warn)
    default = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", shown)
        assert main(["info", "tiny"]) == 0
        assert capsys.readouterr().err == "msf info: warning: the EMA weights are young\n"
        warnings.warn("from the library", stacklevel=1)  # outside the command line: Python's format
        assert "UserWarning: from the library" in capsys.readouterr().err
    assert warnings.formatwarning is default
