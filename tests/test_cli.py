import json

from msf.cli import main


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
    assert main(["sample", str(model), "--classes", "0,Flags", "--per-class", "2",
                 "--steps", "2,1", "--cfg", "1.5,1.0", "--solver", "heun", "--out", str(png)]) == 0
    assert png.stat().st_size > 0
    assert main(["info", str(model), "--json"]) == 0
    assert "wrote 4 samples" in capsys.readouterr().out


def test_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "train.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "missing")]) == 2
    assert "model directory does not exist" in capsys.readouterr().err
    assert main(["info", "nonsense"]) == 2
    assert "unknown preset" in capsys.readouterr().err
