from PIL import Image

from msf.demo import run_demo


def test_demo_writes_everything(tmp_path):
    paths = run_demo(
        tmp_path / "demo", minutes=1.0, per_class=2, progress=False,
        overrides=["train.steps=3", "model.scales.0.depth=1", "model.scales.0.width=32",
                   "model.scales.0.heads=2", "model.scales.1.depth=1",
                   "model.scales.1.width=32", "model.scales.1.heads=2",
                   "model.scales.0.steps=2", "model.scales.1.steps=2"],
    )
    for key in ("factorization", "samples", "loss"):
        assert paths[key].is_file() and Image.open(paths[key]).width > 100
    assert (paths["model"] / "config.json").is_file()
    assert (paths["model"] / "scale_1.safetensors").is_file()
