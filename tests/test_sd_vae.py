"""The SD VAE path, with a tiny randomly initialised AutoencoderKL saved to a folder."""

import json

import pytest
import torch
from diffusers import AutoencoderKL

from msf.config import ConfigError, apply_overrides
from msf.method.factorize import compose
from msf.method.pipeline import MSFPipeline
from msf.presets import preset

SIZES = ["model.scales.0.image_size=48", "model.scales.1.image_size=64",
         "model.scales.0.patch_size=2", "model.scales.1.patch_size=2"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=0.18215,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def _cfg(vae_dir, *extra):
    return apply_overrides(preset("tiny"), [
        "model.autoencoder.kind=sd-vae", f"model.autoencoder.path={vae_dir}",
        "model.autoencoder.channels=4", "model.autoencoder.factor=8",
        "model.autoencoder.scaling_factor=0.18215", *SIZES, *extra,
    ])


@pytest.mark.parametrize("base_mode", ["image", "latent"])
def test_encode_factorize_compose_decode(vae_dir, base_mode):
    pipe = MSFPipeline(_cfg(vae_dir, f"model.base_mode={base_mode}").model)
    assert pipe.config.latent_sizes == [6, 8]
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z, base = pipe.encode(x)
    assert z.shape == (2, 4, 8, 8)
    assert (base is None) == (base_mode == "latent")
    if base is not None:
        assert base.shape == (2, 4, 6, 6)
        # The image base is the encoding of the downsampled image, not a resized latent.
        assert not torch.allclose(base, torch.nn.functional.interpolate(z, size=6), atol=1e-3)
    comps = pipe.components(x)
    torch.testing.assert_close(compose(comps), z, atol=1e-5, rtol=0)
    ae = pipe.autoencoder
    torch.testing.assert_close(ae.decode(compose(comps)), ae.decode(z), atol=1e-4, rtol=0)
    # Latents are scaled: decode undoes the factor the encoder applied.
    raw = ae.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(z, raw * 0.18215, atol=1e-6, rtol=0)


def test_pipeline_trains_samples_saves_and_loads(vae_dir, tmp_path):
    from msf.training.train import train

    cfg = _cfg(vae_dir, "train.steps=2", "train.batch_size=4", "train.tensorboard=false",
               f"train.out_dir={tmp_path}", "model.scales.0.steps=2", "model.scales.1.steps=2")
    result = train(cfg, progress=False)
    pipe = result.pipeline
    for p in pipe.networks.parameters():  # two steps leave the outputs near zero: make them matter
        p.data.add_(0.05 * torch.randn_like(p))
    images, comps = pipe.sample([0, 3], seed=1, return_components=True)
    # components live in latent space (4 channels, 6 and 8 wide); the image is the VAE's decoding
    # of their sum, unscaled by the VAE's factor
    assert [tuple(c.shape) for c in comps] == [(2, 4, 6, 6), (2, 4, 8, 8)]
    assert comps[1].abs().mean() > 1e-3
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        expected = vae.decode(compose(comps) / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-5)
    pipe.save_pretrained(tmp_path / "m")
    loaded = MSFPipeline.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.sample([0, 3], seed=1), images)


def test_latent_cache_with_the_vae(vae_dir, tmp_path):
    from msf.training.extract import extract
    from msf.training.latent_cache import LatentCache

    cfg = _cfg(vae_dir, "model.autoencoder.dtype=bf16")
    from msf.training.data import load_builtin

    small = load_builtin()
    small.images, small.labels = small.images[:40], small.labels[:40]
    small.labels[-1] = 8  # keep all 9 classes present
    out = extract(cfg, tmp_path / "c", shard_size=16, progress=False, data=small)
    cache = LatentCache(out)
    z, base = cache.get(torch.tensor([0, 39]), torch.tensor([False, True]))
    assert z.shape == (2, 4, 8, 8) and base.shape == (2, 4, 6, 6)


def test_bad_sizes_and_mismatches_fail_clearly(vae_dir):
    with pytest.raises(ConfigError, match=r"image_size=60 must be divisible by .* 8 x 2 = 16"):
        _cfg(vae_dir, "model.scales.1.image_size=60")
    with pytest.raises(ValueError, match="scaling_factor 0.18215; the config says 0.13025"):
        MSFPipeline(_cfg(vae_dir, "model.autoencoder.scaling_factor=0.13025").model)
    with pytest.raises(ValueError, match="4 latent channels and factor 8"):
        MSFPipeline(_cfg(vae_dir, "model.autoencoder.channels=16").model)
    cfg = json.loads((vae_dir / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL"


def test_hub_id_offline_says_how_to_pass_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    cfg = apply_overrides(preset("paper-imagenet256"), ["model.autoencoder.path=nobody/no-such-vae"])
    with pytest.raises(ValueError, match=r"(?s)nobody/no-such-vae.*Offline\?.*"
                                         r"model.autoencoder.path=/path/to/vae"):
        MSFPipeline(cfg.model)
    (tmp_path / "empty").mkdir()
    cfg = apply_overrides(cfg, [f"model.autoencoder.path={tmp_path / 'empty'}"])
    with pytest.raises(ValueError, match="not a diffusers AutoencoderKL folder"):
        MSFPipeline(cfg.model)


@pytest.mark.parametrize("name,tokens", [("paper-imagenet512", [576, 1024]), ("dit-xl2-512", [1024])])
def test_512_presets(name, tokens):
    from msf.interfaces.info import model_info

    info = model_info(preset(name).model)
    assert [s["tokens"] for s in info["scales"]] == tokens


def test_an_fp32_vae_stays_fp32_inside_bf16_autocast(vae_dir):
    # Training encodes inside its bf16 autocast region; model.autoencoder.dtype=fp32 must still hold.
    pipe = MSFPipeline(_cfg(vae_dir).model)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    plain = pipe.autoencoder.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = pipe.autoencoder.encode(x)
        decoded = pipe.autoencoder.decode(plain)
    assert torch.equal(inside, plain)
    assert torch.equal(decoded, pipe.autoencoder.decode(plain))
    bf16 = MSFPipeline(_cfg(vae_dir, "model.autoencoder.dtype=bf16").model)
    bf16.autoencoder.vae.load_state_dict(pipe.autoencoder.vae.state_dict())
    assert not torch.equal(bf16.autoencoder.encode(x), plain)  # and bf16 is honoured as bf16
