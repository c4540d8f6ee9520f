"""The later DiT-family network options: QK-norm, RMSNorm, SwiGLU, 2-D RoPE.

Off by default (tests/test_regression.py proves the paper presets still train bit for bit); here
each option does what it says, `msf info` counts it exactly, and it trains, samples in bf16 and
survives a save and load.
"""

import json

import pytest
import torch
from helpers import measured_flops

from msf.config import ConfigError, ScaleConfig, apply_overrides
from msf.interfaces.info import scale_infos
from msf.method.models import DiT, apply_rope, count_parameters, rope_2d
from msf.method.pipeline import MSFPipeline
from msf.presets import preset
from msf.speed import inference_copy
from msf.training.train import train

OPTIONS = {
    "qk_norm": ["model.scales.*.qk_norm=true"],
    "rmsnorm": ["model.scales.*.norm=rmsnorm"],
    "swiglu": ["model.scales.*.mlp=swiglu"],
    "rope": ["model.scales.*.pos_embed=rope"],
    "sincos+rope": ["model.scales.*.pos_embed=sincos+rope"],
    "all": ["model.scales.*.qk_norm=true", "model.scales.*.norm=rmsnorm", "model.scales.*.mlp=swiglu",
            "model.scales.*.pos_embed=rope"],
}


def _net(**kw):
    torch.manual_seed(0)
    return DiT(ScaleConfig(image_size=8, depth=2, width=32, heads=2, **kw), input_size=8, channels=3,
               num_classes=4)


def _perturb(net):
    """adaLN-Zero starts every block as the identity; give the weights values so options matter."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _run(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, t, y = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([0, 3])
    with torch.no_grad():
        return net(x, t, y)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_info_counts_each_option_exactly(option):
    cfg = apply_overrides(preset("tiny"), OPTIONS[option])
    pipe = MSFPipeline(cfg.model)
    for k, (info, net, n) in enumerate(zip(scale_infos(cfg.model), pipe.networks, cfg.model.latent_sizes)):
        assert info.parameters == count_parameters(net), (option, k)
        measured = measured_flops(net, n)
        assert abs(info.flops_per_forward - measured) / measured < 0.01, (option, k, measured)


def test_swiglu_keeps_the_parameter_count_and_rope_drops_the_table():
    base = apply_overrides(preset("paper-imagenet256"), [])
    swiglu = apply_overrides(base, OPTIONS["swiglu"])
    for a, b in zip(scale_infos(base.model), scale_infos(swiglu.model)):
        assert abs(a.parameters - b.parameters) / a.parameters < 0.001  # 2/3 of the hidden width, gated
    rope = scale_infos(apply_overrides(base, OPTIONS["rope"]).model)
    for a, b in zip(scale_infos(base.model), rope):
        assert a.parameters - b.parameters == a.tokens * a.width  # DiT counts its sin-cos table
        assert a.flops_per_forward == b.flops_per_forward


def test_each_option_changes_the_network_and_the_default_has_none_of_them():
    default = _net()
    keys = set(default.state_dict())
    assert not any("q_norm" in k or "w12" in k for k in keys)
    assert default.rope is None and default.pos_embed is not None
    out = _run(_perturb(default))
    for kw in ({"qk_norm": True}, {"norm": "rmsnorm"}, {"mlp": "swiglu"}, {"pos_embed": "rope"},
               {"pos_embed": "sincos+rope"}):
        net = _perturb(_net(**kw))
        other = _run(net)
        assert other.shape == out.shape and torch.isfinite(other).all()
        assert not torch.allclose(other, out, atol=1e-4), kw


def test_rope_scores_depend_only_on_the_offset_between_tokens():
    grid, d = 5, 16
    rope = rope_2d(d, grid)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)
    rq = apply_rope(q.expand(1, 1, grid * grid, d), rope)[0, 0]
    rk = apply_rope(k.expand(1, 1, grid * grid, d), rope)[0, 0]
    assert torch.allclose(rq.norm(dim=-1), q.norm().expand(grid * grid), atol=1e-5)  # a rotation
    scores = (rq @ rk.T).view(grid, grid, grid, grid)  # [row_q, col_q, row_k, col_k]
    for dy, dx in ((0, 1), (1, 0), (2, -1)):
        ref = None
        for r in range(grid):
            for c in range(grid):
                r2, c2 = r + dy, c + dx
                if 0 <= r2 < grid and 0 <= c2 < grid:
                    ref = scores[r, c, r2, c2] if ref is None else ref
                    assert torch.allclose(scores[r, c, r2, c2], ref, atol=1e-4), (dy, dx, r, c)
    # and the rows and the columns are told apart: one step down is not one step right
    assert not torch.allclose(scores[0, 0, 1, 0], scores[0, 0, 0, 1], atol=1e-3)


def test_rope_rotates_the_first_half_by_the_row_and_the_second_by_the_column():
    grid, d = 3, 8
    x = torch.randn(1, 1, grid * grid, d)
    out = apply_rope(x, rope_2d(d, grid))[0, 0]
    freqs = [10000 ** (-i / 2) for i in range(2)]  # d / 4 = 2 frequencies
    for r in range(grid):
        for c in range(grid):
            v = x[0, 0, r * grid + c]
            for half, pos in ((0, r), (1, c)):
                for i, f in enumerate(freqs):
                    a, b = v[half * 4 + i], v[half * 4 + i + 2]
                    cos, sin = torch.cos(torch.tensor(pos * f)), torch.sin(torch.tensor(pos * f))
                    got = out[r * grid + c, [half * 4 + i, half * 4 + i + 2]]
                    assert torch.allclose(got, torch.stack([a * cos - b * sin, b * cos + a * sin]), atol=1e-5)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    for qk_norm in (True, False):
        net = _perturb(_net(qk_norm=qk_norm))
        before = _run(net)
        width = 32
        with torch.no_grad():
            for block in net.blocks:
                block.attn.qkv.weight[: 2 * width] *= 8  # queries and keys, not values
                block.attn.qkv.bias[: 2 * width] *= 8
        after = _run(net)
        assert torch.allclose(before, after, atol=1e-5) == qk_norm


def test_bad_option_values_name_the_field():
    with pytest.raises(ConfigError, match=r"model.scales.0.mlp.*swiglu"):
        apply_overrides(preset("tiny"), ["model.scales.0.mlp=geglu"])
    with pytest.raises(ConfigError, match=r"model.scales.1.qk_norm: expected true or false, got 'maybe'"):
        apply_overrides(preset("tiny"), ["model.scales.1.qk_norm=maybe"])
    with pytest.raises(ConfigError, match=r"model.scales.0.pos_embed.*divisible by 4, got 32/16 = 2"):
        apply_overrides(preset("tiny"), ["model.scales.0.heads=16", "model.scales.0.pos_embed=rope"])
    with pytest.raises(ConfigError, match=r"model.scales.7: index must be 0..1 or \*"):
        apply_overrides(preset("tiny"), ["model.scales.7.norm=rmsnorm"])


def test_all_options_train_in_bf16_sample_in_bf16_and_survive_save_and_load(tmp_path):
    cfg = apply_overrides(preset("tiny"), [*OPTIONS["all"], "train.steps=3", "train.batch_size=8",
                                           "train.precision=bf16", "train.tensorboard=false",
                                           f"train.out_dir={tmp_path / 'run'}"])
    result = train(cfg, progress=False)
    assert result.steps == 3 and result.checkpoint.exists()
    assert all(torch.isfinite(torch.tensor([v for _, v in h])).all() for h in result.history.values())
    pipe = result.pipeline
    fast = inference_copy(pipe.networks[0])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = fast(x.bfloat16(), torch.rand(2), torch.tensor([0, 1]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    pipe.save_pretrained(tmp_path / "model")
    again = MSFPipeline.from_pretrained(tmp_path / "model")
    assert again.config.scales[1].mlp == "swiglu" and again.config.scales[0].pos_embed == "rope"
    a = pipe.sample([0, 2], steps=[2, 2], seed=3)
    b = again.sample([0, 2], steps=[2, 2], seed=3)
    assert torch.equal(a, b)


def test_msf_info_sizes_a_variant_from_overrides(capsys):
    from msf.interfaces.cli import main

    assert main(["info", "tiny", "model.scales.*.mlp=swiglu", "model.scales.1.qk_norm=true", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["options"] for s in info["scales"]] == [["swiglu"], ["qk_norm", "swiglu"]]
    want = scale_infos(apply_overrides(preset("tiny"), ["model.scales.*.mlp=swiglu",
                                                        "model.scales.1.qk_norm=true"]).model)
    assert [s["parameters"] for s in info["scales"]] == [s.parameters for s in want]
    assert main(["info", "tiny", "model.scales.0.norm=batchnorm"]) == 2
    assert "model.scales.0.norm must be one of" in capsys.readouterr().err


def _attention_by_hand(attn, x, rope=None):
    """Attention written out: q, k, v from one projection; QK-norm with each branch's own scale; RoPE on
    the queries and keys only."""
    import torch.nn.functional as F

    B, N, D = x.shape
    q, k, v = attn.qkv(x).view(B, N, 3, attn.heads, D // attn.heads).permute(2, 0, 3, 1, 4)
    if attn.qk_norm:
        q = F.rms_norm(q, q.shape[-1:], attn.q_norm.weight, attn.q_norm.eps)
        k = F.rms_norm(k, k.shape[-1:], attn.k_norm.weight, attn.k_norm.eps)
    if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    out = F.scaled_dot_product_attention(q, k, v)
    return attn.proj(out.transpose(1, 2).reshape(B, N, D))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_rotates_queries_and_keys_not_values_and_norms_each_with_its_own_scale(qk_norm):
    from msf.method.models import Attention

    grid, width, heads = 3, 16, 2
    attn = Attention(width, heads, qk_norm=qk_norm)
    if qk_norm:  # learned scales that differ, so that swapping them shows
        with torch.no_grad():
            attn.q_norm.weight.copy_(torch.linspace(0.2, 2.0, width // heads))
            attn.k_norm.weight.copy_(torch.linspace(3.0, -1.0, width // heads))
    x = torch.randn(2, grid * grid, width)
    rope = rope_2d(width // heads, grid)
    with torch.no_grad():
        got, want = attn(x, rope), _attention_by_hand(attn, x, rope)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn(x), _attention_by_hand(attn, x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, attn(x), atol=1e-3)  # the rotation does change the output
