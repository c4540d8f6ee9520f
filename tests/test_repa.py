"""REPA (train.repa_encoder, msf.training.repa) with a tiny randomly initialised timm
encoder in a local folder.

It adds exactly its term and nothing else (weight 0 trains the networks bit for bit as without it),
its projectors resume exactly and stay out of the model directory, and every way it cannot run is
refused before training, naming the field.
"""

import pytest
import timm  # in the dev extra: REPA's encoder is a timm model
import torch
from helpers import HANG
from safetensors.torch import load_file

from msf.config import ConfigError, ScaleConfig, apply_overrides
from msf.method.models import DiT
from msf.method.pipeline import MSFPipeline
from msf.presets import preset
from msf.training.repa import AlignedNet, Projector, alignment_loss, load_encoder, pooled
from msf.training.train import train


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from timm.models import save_for_hf

    args = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=0)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    out = tmp_path_factory.mktemp("encoder")
    save_for_hf(model, str(out), model_args=args, safe_serialization=True)
    return out


def _cfg(out, encoder=None, steps=4, extra=()):
    repa = [f"train.repa_encoder={encoder}", "train.repa_projector=32"] if encoder else []
    return apply_overrides(preset("tiny"), [
        f"train.steps={steps}", "train.batch_size=8", "train.lr=3e-3", "train.tensorboard=false",
        "train.log_every=2", f"train.out_dir={out}", *repa, *extra])


def _nets(result):
    return {k: {n: w.clone() for n, w in net.state_dict().items()}
            for k, net in enumerate(result.pipeline.networks)}


def test_the_encoder_loads_from_a_local_folder_and_gives_patch_features(encoder_dir):
    enc = load_encoder(str(encoder_dir))
    assert enc.dim == 16 and enc.prefix == 1 and enc.image_size == (16, 16)
    feats = enc(torch.rand(3, 3, 32, 32) * 2 - 1)  # any image size: resized to the encoder's
    assert feats.shape == (3, 16, 16)  # a 4 x 4 grid of patches, the class token dropped
    assert not any(p.requires_grad for p in enc.parameters())


def test_bad_encoder_sources_name_the_source(tmp_path):
    with pytest.raises(ConfigError, match=r"repa_encoder=.*config.json is not a timm config"):
        load_encoder(str(tmp_path))  # a folder with no config.json
    with pytest.raises(ConfigError, match=r"repa_encoder=nobody/no-such-encoder: cannot load"):
        load_encoder("nobody/no-such-encoder")  # the tests run offline


def test_pooling_and_the_alignment_loss():
    f = torch.arange(16.0).view(1, 16, 1)  # a 4 x 4 grid, one channel
    assert pooled(f, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pooled(f, 4).equal(f)
    z = torch.randn(2, 5, 8)
    assert alignment_loss(z, 3 * z).item() == pytest.approx(0, abs=1e-6)
    assert alignment_loss(z, -z).item() == pytest.approx(2, abs=1e-6)


def test_aligned_net_returns_the_velocity_and_the_projected_tokens_of_its_block():
    torch.manual_seed(0)
    net = DiT(ScaleConfig(image_size=8, depth=3, width=32, heads=2), input_size=8, channels=3, num_classes=4)
    with torch.no_grad():  # adaLN-Zero starts every block as the identity
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])
    proj = Projector(32, 16, 7)
    v, z = AlignedNet(net, proj, depth=2)(x, t, y)
    assert torch.equal(v, net(x, t, y)) and z.shape == (2, 16, 7)
    _, h = net(x, t, y, tokens_at=2)
    _, h3 = net(x, t, y, tokens_at=3)
    assert torch.equal(z, proj(h)) and not torch.allclose(h, h3)


def test_repa_adds_only_its_term_and_changes_training(tmp_path, encoder_dir):
    plain = _nets(train(_cfg(tmp_path / "plain"), progress=False))
    zero_run = train(_cfg(tmp_path / "zero", encoder_dir, extra=["train.repa_weight=0"]), progress=False)
    zero = _nets(zero_run)
    for k in plain:
        for n in plain[k]:
            assert torch.equal(plain[k][n], zero[k][n]), (k, n)
    on_run = train(_cfg(tmp_path / "on", encoder_dir, extra=["train.repa_weight=2"]), progress=False)
    on = _nets(on_run)
    assert any(not torch.equal(plain[k][n], on[k][n]) for k in plain for n in plain[k])
    # the projectors learn (with weight 0 their gradient is zero and they keep their initial weights)
    p0 = torch.load(zero_run.checkpoint, weights_only=True)["projectors"]
    p2 = torch.load(on_run.checkpoint, weights_only=True)["projectors"]
    for k in p0:
        assert all(not torch.equal(p0[k][n], p2[k][n]) for n in p0[k] if n.endswith("weight")), k


def test_repa_resumes_exactly_and_its_projectors_stay_out_of_the_model(tmp_path, encoder_dir):
    whole = train(_cfg(tmp_path / "whole", encoder_dir, steps=4), progress=False)
    train(_cfg(tmp_path / "cut", encoder_dir, steps=2), progress=False)
    resumed = train(_cfg(tmp_path / "cut", encoder_dir, steps=4), progress=False, resume=True)
    a = torch.load(whole.checkpoint, weights_only=True)
    b = torch.load(resumed.checkpoint, weights_only=True)
    assert set(a["projectors"]) == {"0", "1"}
    for key in ("models", "projectors"):
        for k in a[key]:
            for n in a[key][k]:
                assert torch.equal(a[key][k][n], b[key][k][n]), (key, k, n)
    for k in (0, 1):  # the model directory: the networks alone, loadable as any msf model
        assert not any("projector" in n for n in load_file(str(whole.model_dir / f"scale_{k}.safetensors")))
    MSFPipeline.from_pretrained(whole.model_dir)


def test_what_repa_cannot_do_is_refused_before_training(tmp_path, encoder_dir):
    with pytest.raises(ConfigError, match=r"train.repa_depth\[1\] must be an integer in \[0, 2\], got 3"):
        _cfg(tmp_path, encoder_dir, extra=["train.repa_depth=[1,3]"])
    with pytest.raises(ConfigError, match="train.repa_encoder: REPA does not run under train.fsdp"):
        _cfg(tmp_path, encoder_dir, extra=["train.fsdp=true"])
    with pytest.raises(ConfigError, match="train.repa_encoder: .*full checkpoints only"):
        _cfg(tmp_path, encoder_dir, extra=["train.ckpt_format=sharded"])
    from msf.training.extract import extract

    cache = extract(_cfg(tmp_path / "x"), tmp_path / "cache", dtype="float32", progress=False)
    with pytest.raises(ConfigError, match=r"train.data=.*is a latent cache; REPA's encoder needs the images"):
        train(_cfg(tmp_path / "c", encoder_dir, extra=[f"train.data={cache}"]), progress=False)
    # a scale with depth 0 is not aligned: no projector for it
    one = train(_cfg(tmp_path / "one", encoder_dir, steps=1, extra=["train.repa_depth=[0,1]"]),
                progress=False)
    assert set(torch.load(one.checkpoint, weights_only=True)["projectors"]) == {"1"}


def test_two_processes_match_one_with_repa(tmp_path, encoder_dir):
    import subprocess
    import sys

    args = ["--preset", "tiny", "--quiet", "train.tensorboard=false", "train.steps=2", "train.batch_size=16",
            "train.lr=3e-3", f"train.repa_encoder={encoder_dir}", "train.repa_projector=32"]

    def run(cmd, out):
        r = subprocess.run([*cmd, "-m", "msf", "train", *args, f"train.out_dir={out}"], capture_output=True,
                           text=True, timeout=HANG)
        assert r.returncode == 0, r.stderr[-3000:]
        return torch.load(sorted((out / "checkpoints").glob("*.pt"))[-1], weights_only=True)

    ddp = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
              tmp_path / "ddp")
    one = run([sys.executable], tmp_path / "one")
    for key in ("models", "projectors"):  # the projectors' gradients are averaged over processes too
        for k in ("0", "1"):
            for name, w in one[key][k].items():
                torch.testing.assert_close(ddp[key][k][name], w, atol=2e-6, rtol=1e-5)
