"""msf.interfaces.convert: DiT and SiT checkpoints become msf model directories computing
their network in msf's time.

The reference is a small SiT written out here after willisma/SiT's ``models.py`` (the same module
names, so its ``state_dict`` is the released checkpoints' layout; tanh GELU; t embedded as is;
learned-sigma channels dropped by its forward) and SiT's Euler ODE from ``transport`` (noise at
s = 0, data at s = 1). facebookresearch/DiT's network is the same module fed an integer DDPM
timestep; its DDIM sampler is written out from ``diffusion/gaussian_diffusion.py`` (linear betas,
``_predict_xstart_from_eps``, ``ddim_sample`` with eta = 0).
"""

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from msf.config import ModelConfig, SamplerSettings, from_dict
from msf.interfaces.convert import ConversionError, convert_checkpoint
from msf.method.autoencoder import IdentityAutoencoder
from msf.method.pipeline import MSFPipeline

C = 4  # SD VAE latent channels


def _pos_embed(dim, grid):
    """get_2d_sincos_pos_embed (MAE / DiT / SiT), in numpy as there."""
    gh, gw = np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)


class _Seq(nn.Sequential):
    pass


class RefSiT(nn.Module):
    """SiT's forward (reference layout): x_embedder.proj, pos_embed, t/y embedders, blocks, final_layer."""

    def __init__(self, input_size=8, patch=2, width=384, depth=1, heads=6, classes=10, learn_sigma=True):
        super().__init__()
        self.p, self.heads, self.learn_sigma = patch, heads, learn_sigma
        self.out_channels = 2 * C if learn_sigma else C
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(C, width, patch, stride=patch)
        grid = input_size // patch
        pos = torch.from_numpy(_pos_embed(width, grid)).float()[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # a parameter: in the state dict, as SiT's
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = _Seq(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(classes + 1, width)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            b.attn = nn.Module()
            b.attn.qkv, b.attn.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
            b.mlp = nn.Module()
            b.mlp.fc1, b.mlp.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
            b.adaLN_modulation = _Seq(nn.SiLU(), nn.Linear(width, 6 * width))
            self.blocks.append(b)
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(width, patch * patch * self.out_channels)
        self.final_layer.adaLN_modulation = _Seq(nn.SiLU(), nn.Linear(width, 2 * width))
        for name, prm in self.named_parameters():  # every gate open, every branch carrying signal
            if name != "pos_embed":
                nn.init.normal_(prm, std=0.1)

    def forward(self, x, t, y):
        B, D = x.shape[0], self.pos_embed.shape[-1]
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]  # SiT: t in [0, 1], not scaled
        c = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1))
        c = c + self.y_embedder.embedding_table(y)

        def modulate(a, shift, scale):
            return a * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

        def ln(a):
            return F.layer_norm(a, (D,), eps=1e-6)

        N = h.shape[1]
        for b in self.blocks:
            s1, g1, gate1, s2, g2, gate2 = b.adaLN_modulation(c).chunk(6, dim=1)
            a = modulate(ln(h), s1, g1)
            q, k, v = b.attn.qkv(a).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
            w = (q @ k.transpose(-2, -1) * (D // self.heads) ** -0.5).softmax(-1)
            h = h + gate1.unsqueeze(1) * b.attn.proj((w @ v).transpose(1, 2).reshape(B, N, D))
            a = modulate(ln(h), s2, g2)
            h = h + gate2.unsqueeze(1) * b.mlp.fc2(F.gelu(b.mlp.fc1(a), approximate="tanh"))
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        out = self.final_layer.linear(modulate(ln(h), shift, scale))
        g, p, oc = int(N ** 0.5), self.p, self.out_channels
        out = torch.einsum("nhwpqc->nchpwq", out.reshape(B, g, g, p, p, oc)).reshape(B, oc, g * p, g * p)
        return out.chunk(2, dim=1)[0] if self.learn_sigma else out


class NotATensor:
    """Any pickled object other than tensors and plain containers: weights_only refuses it."""


def _load(model_dir):
    return MSFPipeline.from_pretrained(model_dir, autoencoder=IdentityAutoencoder(channels=C))


def _converted_euler_sample(tmp_path, ref, name, labels, steps, w):
    """Convert ``ref`` saved as ``name``, sample it with msf's Euler on a uniform grid (the named
    ``paper`` settings) at ``steps`` and guidance ``w``; return the latent and msf's noise at t = 1."""
    torch.save(ref.state_dict(), tmp_path / name)
    pipe = _load(convert_checkpoint(tmp_path / name, tmp_path / "model"))
    paper = SamplerSettings.named(pipe.config, "paper")
    _, (z,) = pipe.sample(labels, settings=paper, steps=steps, cfg_scale=w, seed=3, precision="fp32",
                          return_components=True)
    noise = torch.randn(len(labels), C, 8, 8, generator=torch.Generator().manual_seed(3))
    return z, noise


@pytest.fixture
def ref():
    torch.manual_seed(1)
    return RefSiT().eval()


def test_sit_checkpoint_converts_to_sits_network_in_msfs_time(tmp_path, ref):
    ckpt = tmp_path / "SiT-S-2-64x64.pt"
    torch.save(ref.state_dict(), ckpt)
    out = convert_checkpoint(ckpt, tmp_path / "model")
    meta = json.loads((out / "config.json").read_text())
    assert meta["converted_from"] == {"file": ckpt.name, "kind": "sit", "weights": "state dict",
                                      "learned_sigma": "dropped"}
    pipe = _load(out)
    cfg = pipe.config
    (s,) = cfg.scales
    assert (cfg.num_classes, cfg.image_size, cfg.latent_sizes) == (10, 64, [8])
    assert (s.depth, s.width, s.heads, s.patch_size, s.mlp_ratio) == (1, 384, 6, 2, 4.0)
    assert (s.time_convention, s.gelu) == ("sit", "tanh")
    assert (cfg.autoencoder.kind, cfg.autoencoder.path) == ("sd-vae", "stabilityai/sd-vae-ft-ema")

    x, y = torch.randn(5, C, 8, 8), torch.tensor([0, 3, 9, 10, 10])  # 10: the null class
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    with torch.no_grad():
        ours, theirs = pipe.networks[0](x, t, y), ref(x, 1 - t, y)
    assert theirs.abs().mean() > 0.1
    # x_t = (1 - t) c + t e is SiT's point at s = 1 - t; msf's velocity e - c is minus SiT's c - e
    torch.testing.assert_close(ours, -theirs, atol=2e-5, rtol=1e-4)


def test_sampling_equals_sits_euler_ode_with_guidance(tmp_path, ref):
    labels, steps, w = torch.tensor([1, 7]), 4, 1.5
    z, x = _converted_euler_sample(tmp_path, ref, "SiT-S-2-64x64.pt", labels, steps, w)
    ts = torch.linspace(0, 1, steps + 1)  # SiT: noise at s = 0 -> data at s = 1, guidance on all channels
    with torch.no_grad():
        for s, s_next in zip(ts[:-1], ts[1:]):
            u_c = ref(x, s.expand(2), labels)
            u_u = ref(x, s.expand(2), torch.full_like(labels, 10))
            x = x + (s_next - s) * (u_u + w * (u_c - u_u))
    torch.testing.assert_close(z, x, atol=1e-4, rtol=1e-4)


def test_training_checkpoint_takes_the_ema_weights_and_reads_its_args(tmp_path, ref):
    raw = RefSiT()  # other weights: the "model" entry must not be the one converted
    args = argparse.Namespace(model="SiT-S/2", image_size=64, num_classes=10, path_type="Linear",
                              prediction="velocity", vae="ema")
    ckpt = tmp_path / "0001000.pt"  # no kind in the name: the args tell
    torch.save({"model": raw.state_dict(), "ema": ref.state_dict(), "opt": {"state": {}, "param_groups": []},
                "args": args}, ckpt)
    pipe = _load(convert_checkpoint(ckpt, tmp_path / "model", autoencoder="mse"))
    assert pipe.config.autoencoder.path == "stabilityai/sd-vae-ft-mse"
    assert json.loads((tmp_path / "model" / "config.json").read_text())["converted_from"]["weights"] == "ema"
    x, t, y = torch.randn(2, C, 8, 8), torch.tensor([0.3, 0.7]), torch.tensor([2, 5])
    with torch.no_grad():
        torch.testing.assert_close(pipe.networks[0](x, t, y), -ref(x, 1 - t, y), atol=2e-5, rtol=1e-4)

    args.path_type = "GVP"
    torch.save({"ema": ref.state_dict(), "args": args}, ckpt)
    with pytest.raises(ConversionError, match=r"path_type=GVP.*only SiT's linear path"):
        convert_checkpoint(ckpt, tmp_path / "gvp")


def test_safetensors_without_sigma_channels(tmp_path):
    torch.manual_seed(2)
    ref = RefSiT(learn_sigma=False).eval()
    ckpt = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(ckpt))
    with pytest.raises(ConversionError, match="same keys.*kind='sit'"):  # nothing says DiT or SiT
        convert_checkpoint(ckpt, tmp_path / "model")
    pipe = _load(convert_checkpoint(ckpt, tmp_path / "model", kind="sit", learned_sigma="refuse",
                                    image_size=64))
    x, t, y = torch.randn(2, C, 8, 8), torch.tensor([0.1, 0.6]), torch.tensor([0, 10])
    with torch.no_grad():
        torch.testing.assert_close(pipe.networks[0](x, t, y), -ref(x, 1 - t, y), atol=2e-5, rtol=1e-4)


def test_refusals_say_why_and_what_works(tmp_path, ref):
    dit = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(ref.state_dict(), dit)
    with pytest.raises(ConversionError, match=r"learned-sigma.*DDPM sampler.*need none.*noise prediction"):
        convert_checkpoint(dit, tmp_path / "a", learned_sigma="refuse")
    sit = tmp_path / "SiT-S-2.pt"
    torch.save(ref.state_dict(), sit)
    with pytest.raises(ConversionError, match="learned-sigma channels.*learned_sigma='drop'"):
        convert_checkpoint(sit, tmp_path / "b", learned_sigma="refuse")
    with pytest.raises(ConversionError, match=r"a 64 px model; image_size=256"):
        convert_checkpoint(sit, tmp_path / "c", image_size=256)
    convert_checkpoint(sit, tmp_path / "d")
    with pytest.raises(ConversionError, match="already a model directory.*overwrite"):
        convert_checkpoint(sit, tmp_path / "d")
    convert_checkpoint(sit, tmp_path / "d", overwrite=True)

    evil = tmp_path / "SiT-evil.pt"
    torch.save({"ema": ref.state_dict(), "extra": NotATensor()}, evil)
    with pytest.raises(ConversionError, match="SiT-evil.pt: not a weights-only PyTorch checkpoint"):
        convert_checkpoint(evil, tmp_path / "e")


def test_wrong_shapes_and_keys_name_the_file_the_key_and_the_shapes(tmp_path, ref):
    state = ref.state_dict()
    ckpt = tmp_path / "SiT-S-2.pt"
    state["blocks.0.mlp.fc2.bias"] = torch.zeros(383)
    torch.save(state, ckpt)
    with pytest.raises(ConversionError, match=r"SiT-S-2.pt: blocks.0.mlp.fc2.bias has shape \(383,\), "
                                              r"expected \(384,\)"):
        convert_checkpoint(ckpt, tmp_path / "model")
    state = ref.state_dict()
    state["final_layer.linear.weight"] = torch.zeros(32, 380)
    torch.save(state, ckpt)
    with pytest.raises(ConversionError, match=r"final_layer.linear.weight has shape \(32, 380\), "
                                              r"expected \(32, 384\)"):
        convert_checkpoint(ckpt, tmp_path / "model")
    state = ref.state_dict()
    del state["blocks.0.attn.proj.weight"]
    state["blocks.0.attn.extra"] = torch.zeros(1)
    torch.save(state, ckpt)
    with pytest.raises(ConversionError, match=r"missing \['blocks.0.attn.proj.weight'\], "
                                              r"unexpected \['blocks.0.attn.extra'\]"):
        convert_checkpoint(ckpt, tmp_path / "model")
    del state["blocks.0.attn.extra"]  # a key missing, nothing else wrong
    torch.save(state, ckpt)
    with pytest.raises(ConversionError, match=r"missing \['blocks.0.attn.proj.weight'\], unexpected \[\]"):
        convert_checkpoint(ckpt, tmp_path / "model")
    state = ref.state_dict()
    state["pos_embed"] = state["pos_embed"] + 0.01
    torch.save(state, ckpt)
    with pytest.raises(ConversionError, match="pos_embed is not DiT's fixed 2-D sin-cos table"):
        convert_checkpoint(ckpt, tmp_path / "model")
    assert not (tmp_path / "model").exists()  # nothing written on a refusal


def test_a_config_without_the_new_fields_loads_as_msfs_convention():
    data = {"num_classes": 3, "scales": [{"image_size": 8, "depth": 1, "width": 32, "heads": 2}]}
    (s,) = from_dict(ModelConfig, data).scales
    assert (s.time_convention, s.gelu) == ("msf", "exact")


def test_cli_convert(tmp_path, ref, capsys):
    from msf.interfaces.cli import main

    sit, dit = tmp_path / "SiT-S-2.pt", tmp_path / "DiT-S-2.pt"
    torch.save(ref.state_dict(), sit)
    torch.save(ref.state_dict(), dit)
    assert main(["convert", str(sit), "--out", str(tmp_path / "m")]) == 0
    assert f"wrote {tmp_path / 'm'}" in capsys.readouterr().out
    assert _load(tmp_path / "m").config.scales[0].time_convention == "sit"
    assert main(["convert", str(dit), "--out", str(tmp_path / "n")]) == 0
    assert _load(tmp_path / "n").config.scales[0].time_convention == "ddpm"
    assert main(["convert", str(dit), "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msf convert: error:") and "already a model directory" in err
    assert "Traceback" not in err


# DiT's DDPM (diffusion/gaussian_diffusion.py): linear betas, 1000 steps, written out here in numpy
ALPHA_BAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
LOG_SNR = np.log(ALPHA_BAR / (1 - ALPHA_BAR))


def _ddpm_point(t):
    """msf time t (float64 array) -> (DDPM timestep, alpha_bar): the timestep of equal SNR, at most 999."""
    t = np.minimum(t, 1 / (1 + np.sqrt(ALPHA_BAR[-1] / (1 - ALPHA_BAR[-1]))))
    snr = np.log((1 - t) ** 2 / np.maximum(t, 1e-12) ** 2)
    tau = np.interp(-snr, -LOG_SNR, np.arange(1000.0))  # np.interp wants a rising table
    return tau, (1 - t) ** 2 / ((1 - t) ** 2 + t ** 2)


def _ddim_eps_and_x0(ref, x_vp, tau, y, a, w=1.0, null=10):
    """DiT's noise prediction (guided as ``forward_with_cfg``, on every channel) and
    ``_predict_xstart_from_eps``."""
    tau = torch.as_tensor(tau, dtype=torch.float32).expand(x_vp.shape[0])
    eps = ref(x_vp, tau, y)
    if w != 1.0:
        u = ref(x_vp, tau, torch.full_like(y, null))
        eps = u + w * (eps - u)
    x0 = (x_vp - math.sqrt(1 - a) * eps) / math.sqrt(a)
    return eps, x0


def test_dit_checkpoint_converts_to_its_noise_prediction_as_msfs_velocity(tmp_path, ref):
    ckpt = tmp_path / "DiT-S-2-64x64.pt"
    torch.save(ref.state_dict(), ckpt)
    out = convert_checkpoint(ckpt, tmp_path / "model")
    meta = json.loads((out / "config.json").read_text())
    assert meta["converted_from"]["kind"] == "dit"
    pipe = _load(out)
    (s,) = pipe.config.scales
    assert (s.time_convention, s.gelu, s.depth, s.width) == ("ddpm", "tanh", 1, 384)
    assert "paper" in pipe.config.samplers

    # msf times of DiT's integer timesteps 0, 1, 37, 500, 998 (rounded to float32), two between,
    # and t = 1, beyond timestep 999
    taus = np.array([0, 1, 37, 500, 998])
    a = ALPHA_BAR[taus]
    t = torch.tensor(np.concatenate([np.sqrt(1 - a) / (np.sqrt(a) + np.sqrt(1 - a)), [0.3, 0.75, 1.0]]),
                     dtype=torch.float32)
    tau, a = _ddpm_point(t.double().numpy())
    np.testing.assert_allclose(tau[:5], taus, atol=2e-3)  # msf's grid times land on DiT's timesteps
    assert tau[-1] == 999
    x, y = torch.randn(8, C, 8, 8), torch.tensor([0, 3, 9, 10, 2, 4, 6, 8])
    with torch.no_grad():
        ours = pipe.networks[0](x, t, y)
        want = []
        for i in range(8):
            x_vp = x[i:i + 1] * (math.sqrt(a[i]) + math.sqrt(1 - a[i]))  # DiT's state of the same point
            eps, x0 = _ddim_eps_and_x0(ref, x_vp, tau[i], y[i:i + 1], a[i])
            want.append(eps - x0)  # msf's velocity: noise - data
        want = torch.cat(want)
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(ours, want, atol=2e-3, rtol=1e-3)


def test_euler_sampling_of_a_converted_dit_takes_ddim_steps(tmp_path, ref):
    labels, steps, w = torch.tensor([1, 7]), 4, 1.5
    z, x = _converted_euler_sample(tmp_path, ref, "DiT-S-2-64x64.pt", labels, steps, w)
    x = x.double()
    ts = np.linspace(1, 0, steps + 1)
    with torch.no_grad():
        # t = 1 is beyond DiT's last timestep: the network runs at 999, and msf carries its velocity
        # over [t(999), 1] (DiT's own chains start there from pure noise)
        tau, a = _ddpm_point(ts[:1])
        eps, x0 = _ddim_eps_and_x0(ref, (x * (math.sqrt(a[0]) + math.sqrt(1 - a[0]))).float(), tau[0],
                                   labels, a[0], w)
        x = x + (ts[1] - ts[0]) * (eps - x0).double()
        for t, t_next in zip(ts[1:-1], ts[2:]):  # then DDIM, eta = 0, in DiT's own variables
            (tau,), (a,) = _ddpm_point(np.array([t]))
            a_next = (1 - t_next) ** 2 / ((1 - t_next) ** 2 + t_next ** 2)
            x_vp = x * (math.sqrt(a) + math.sqrt(1 - a))
            eps, x0 = _ddim_eps_and_x0(ref, x_vp.float(), tau, labels, a, w)
            x_vp = math.sqrt(a_next) * x0.double() + math.sqrt(1 - a_next) * eps.double()
            x = x_vp / (math.sqrt(a_next) + math.sqrt(1 - a_next))  # back to msf's state
    assert z.abs().mean() > 0.1
    torch.testing.assert_close(z, x.float(), atol=2e-3, rtol=2e-3)
