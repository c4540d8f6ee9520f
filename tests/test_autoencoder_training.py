"""msf train-autoencoder: a small AutoencoderKL trained on msf's data, resumed exactly, and taken by an
MSF model with the latent scale and shift it measured (and no other)."""

import json

import pytest
import torch

from msf.config import ConfigError, apply_overrides
from msf.interfaces.cli import main
from msf.method.pipeline import MSFPipeline
from msf.presets import preset
from msf.training.autoencoder_training import autoencoder_config, learning_rate, train_autoencoder
from msf.training.data import load_builtin, prepare_data, to_model_range
from msf.training.train import train

TINY = ["width=8", "batch_size=8", "precision=fp32", "log_every=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "run"
    return train_autoencoder(autoencoder_config([*TINY, "steps=4", "ckpt_every=2", f"out_dir={out}"]),
                             progress=False)


def _latent_msf(path, scaling_factor, out):
    return apply_overrides(preset("tiny"), [
        "model.autoencoder.kind=sd-vae", f"model.autoencoder.path={path}", "model.autoencoder.channels=4",
        "model.autoencoder.factor=4", f"model.autoencoder.scaling_factor={scaling_factor}",
        "model.scales.0.image_size=16", "model.scales.1.image_size=32", "train.steps=2",
        "train.tensorboard=false", f"train.out_dir={out}"])


def test_the_folder_holds_the_measured_scale_and_shift_and_an_msf_model_uses_them(trained, tmp_path):
    stored = json.loads((trained.path / "config.json").read_text())
    assert stored["scaling_factor"] == pytest.approx(trained.scaling_factor)
    assert stored["shift_factor"] == pytest.approx(trained.shift_factor)
    assert trained.scaling_factor > 0 and trained.psnr > 0
    assert json.loads((trained.path / "quality.json").read_text())["psnr_db"] == pytest.approx(trained.psnr)

    result = train(_latent_msf(trained.path, trained.scaling_factor, tmp_path / "msf"), progress=False)
    pipe = MSFPipeline.from_pretrained(result.model_dir)
    ae = pipe.autoencoder
    x = to_model_range(prepare_data(load_builtin("emoji32"), 32).images[:4])
    posterior_mean = ae.vae.encode(x).latent_dist.mean
    expected = (posterior_mean - trained.shift_factor) * trained.scaling_factor
    assert torch.allclose(ae.encode(x), expected, atol=1e-5)
    z = ae.encode(x)  # unit scale on the data the scale was measured on, up to these few images
    assert 0.3 < float(z.std()) < 3
    images = pipe.sample([0, 1], seed=0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_a_model_config_with_another_scale_is_refused_naming_the_right_one(trained, tmp_path):
    with pytest.raises(ValueError, match=f"scaling_factor {trained.scaling_factor}"):
        train(_latent_msf(trained.path, 1.0, tmp_path / "msf"), progress=False)


def test_resume_continues_exactly(tmp_path):
    straight = train_autoencoder(autoencoder_config([*TINY, "steps=4", f"out_dir={tmp_path / 'a'}"]),
                                 progress=False)
    cut = autoencoder_config([*TINY, "steps=2", f"out_dir={tmp_path / 'b'}"])
    train_autoencoder(cut, progress=False)
    resumed = train_autoencoder(autoencoder_config(["steps=4"], cut), progress=False, resume=True)
    assert resumed.history == straight.history and len(resumed.history) == 4
    a = (tmp_path / "a" / "autoencoder" / "diffusion_pytorch_model.safetensors").read_bytes()
    b = (tmp_path / "b" / "autoencoder" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == b and resumed.scaling_factor == straight.scaling_factor


def test_the_learning_rate_holds_then_falls_linearly_and_a_resume_may_add_the_decay(tmp_path):
    cfg = autoencoder_config(["lr=1e-3", "steps=10", "lr_decay_from=6"])
    rates = [learning_rate(cfg, s) for s in range(1, 11)]
    assert rates[:6] == [1e-3] * 6
    assert rates[6:] == pytest.approx([8e-4, 6e-4, 4e-4, 2e-4])
    assert learning_rate(autoencoder_config(["lr=1e-3", "steps=10"]), 10) == 1e-3
    cut = autoencoder_config([*TINY, "steps=2", f"out_dir={tmp_path}"])
    train_autoencoder(cut, progress=False)
    resumed = train_autoencoder(autoencoder_config(["steps=3", "lr_decay_from=2"], cut), progress=False,
                                resume=True)
    assert resumed.steps == 3


def test_resume_with_another_shape_is_refused_naming_the_setting(tmp_path):
    cfg = autoencoder_config([*TINY, "steps=2", f"out_dir={tmp_path}"])
    train_autoencoder(cfg, progress=False)
    with pytest.raises(ConfigError, match="width"):
        train_autoencoder(autoencoder_config(["width=16", "steps=3"], cfg), progress=False, resume=True)


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match=r"autoencoder.factor must be one of \(2, 4, 8\), got 3"):
        autoencoder_config(["factor=3"])
    with pytest.raises(ConfigError, match="stepz"):
        autoencoder_config(["stepz=3"])


def test_the_command_trains_and_says_how_to_use_the_result(tmp_path, capsys):
    rc = main(["train-autoencoder", "--quiet", *TINY, "steps=2", f"out_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "autoencoder" / "config.json").is_file()
    assert f"model.autoencoder.path={tmp_path / 'autoencoder'}" in out and "PSNR" in out


def test_a_shipped_autoencoder_is_taken_by_name_and_a_local_folder_of_that_name_wins(trained, tmp_path,
                                                                                      monkeypatch):
    import shutil

    import msf.method.autoencoder as autoencoder
    from msf.config import AutoencoderConfig

    shipped = tmp_path / "autoencoders"
    shutil.copytree(trained.path, shipped / "my-ae")
    monkeypatch.setattr(autoencoder, "shipped_autoencoders", lambda: shipped)
    cfg = AutoencoderConfig(kind="sd-vae", path="my-ae", channels=4, factor=4,
                            scaling_factor=trained.scaling_factor)
    assert autoencoder.build_autoencoder(cfg).shift_factor == pytest.approx(trained.shift_factor)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-ae").mkdir()  # a local folder of that name, not an autoencoder: it wins, and says so
    with pytest.raises(ValueError, match="my-ae: not a diffusers AutoencoderKL folder"):
        autoencoder.build_autoencoder(cfg)
