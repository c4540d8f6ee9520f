"""Models shipped inside the package load by name, anywhere a model directory is taken."""

import numpy as np
import pytest
import torch

import msf.interfaces.pretrained
from msf.interfaces.cli import main
from msf.method.pipeline import ModelDirError, MSFPipeline
from msf.presets import preset


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    root = tmp_path / "pretrained"
    pipe = MSFPipeline(preset("tiny").model)
    for p in pipe.parameters():  # adaLN-Zero starts at zero output: give the model something to say
        p.data.normal_(0, 0.05)
    pipe.save_pretrained(root / "emoji-test")
    monkeypatch.setattr(msf.interfaces.pretrained, "pretrained_dir", lambda: root)
    return pipe


def test_a_shipped_model_loads_by_name_and_samples_as_its_directory(shipped, tmp_path, monkeypatch):
    assert msf.interfaces.pretrained.available() == ["emoji-test"]
    pipe = MSFPipeline.from_pretrained("emoji-test")
    a = pipe.sample([0, 1], seed=3)
    assert torch.equal(a, shipped.sample([0, 1], seed=3))
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "emoji-test", "--classes", "0,1", "--per-class", "2", "--out", "grid.png",
                 "--quiet"]) == 0
    assert (tmp_path / "grid.png").is_file()
    assert main(["sample", "emoji-test", "--num-samples", "4", "--npz", "s.npz", "--quiet"]) == 0
    with np.load(tmp_path / "s.npz") as d:
        assert d["arr_0"].shape == (4, 16, 16, 3)
    assert main(["info", "emoji-test"]) == 0


def test_a_local_directory_wins_over_a_shipped_name_and_unknown_names_list_the_shipped(shipped, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = MSFPipeline(preset("tiny-dit").model)
    other.save_pretrained(tmp_path / "emoji-test")  # ./emoji-test exists: it is the one loaded
    assert MSFPipeline.from_pretrained("emoji-test").num_scales == 1
    with pytest.raises(ModelDirError, match="models shipped with msf: emoji-test"):
        MSFPipeline.from_pretrained("no-such-model")


def test_every_model_shipped_in_the_package_loads_and_samples():
    # the real package directory, not a stand-in: what `pip install msf` puts on a user's machine
    names = msf.interfaces.pretrained.available()
    assert names, "msf ships at least one model (src/msf/pretrained/<name>/)"
    for name in names:
        folder = msf.interfaces.pretrained.pretrained_dir() / name
        assert sum(f.stat().st_size for f in folder.iterdir()) < 20e6, f"{name}: over 20 MB"
        assert "FID" in (folder / "README.md").read_text(), f"{name}: README.md gives no scores"
        pipe = MSFPipeline.from_pretrained(name)
        images = pipe.sample(list(range(pipe.config.num_classes)), steps=2, seed=0)
        assert torch.isfinite(images).all() and images.std() > 0.05
