import numpy as np
import pytest
import torch

from msf.config import ScaleConfig
from msf.interfaces.info import _dit_parameters
from msf.method.models import DiT, count_parameters, sincos_pos_embed_2d
from msf.method.pipeline import build_scale_networks
from msf.presets import preset
from msf.speed import attention


def _dit_reference_pos_embed(embed_dim, grid_size):
    """DiT's get_2d_sincos_pos_embed (facebookresearch/DiT models.py), in numpy."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_pos_embed_matches_dit():
    ours = sincos_pos_embed_2d(64, 6).numpy()
    np.testing.assert_allclose(ours, _dit_reference_pos_embed(64, 6), atol=1e-6)


def _meta_scales(name):
    cfg = preset(name).model
    with torch.device("meta"):
        return cfg, build_scale_networks(cfg)


def test_paper_and_dit_xl2_parameter_counts():
    cfg, nets = _meta_scales("paper-imagenet256")
    n1 = count_parameters(nets[0])
    # The paper's 435.9M; DiT counts 18,448 more for learned-sigma output channels we do not have.
    assert abs(n1 - 435.9e6) / 435.9e6 < 1e-3
    assert n1 + 18_448 == 435_949_088
    n2 = count_parameters(nets[1])
    assert abs(n2 - 302.0e6) / 302.0e6 < 1e-3
    _, (dit,) = _meta_scales("dit-xl2")
    n = count_parameters(dit)
    assert abs(n - 675.1e6) / 675.1e6 < 1e-3
    assert n + 18_448 == 675_129_632


@pytest.mark.parametrize("name", ["tiny", "demo", "paper-imagenet256", "dit-xl2"])
def test_analytic_parameter_count_matches_modules(name):
    cfg, nets = _meta_scales(name)
    ch = cfg.autoencoder.channels
    for k, (s, n, net) in enumerate(zip(cfg.scales, cfg.latent_sizes, nets)):
        prior = ch if k > 0 and cfg.prior == "concat" else 0
        assert _dit_parameters(s, n, ch, prior, cfg.num_classes) == count_parameters(net)


def _scale(**kw):
    """A small scale's architecture (its image size is not the network's)."""
    return ScaleConfig(**{"image_size": 8, "depth": 2, "width": 32, "heads": 2, **kw})


def test_forward_shapes_zero_init_and_prior_required():
    net = DiT(_scale(depth=2), input_size=12, channels=4, num_classes=5, prior_channels=4)
    x, prior = torch.randn(3, 4, 12, 12), torch.randn(3, 4, 12, 12)
    out = net(x, torch.rand(3), torch.tensor([0, 4, 5]), prior)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the untrained net predicts zero
    with pytest.raises(ValueError, match="prior"):
        net(x, torch.rand(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="divisible"):
        DiT(_scale(depth=1), input_size=7, channels=4, num_classes=5)


def _reference_forward(net, x, t, y, prior):
    """DiT's forward (facebookresearch/DiT models.py) written out from ``net``'s weights.

    Patchify as a product over p x p patches, the position embedding from the numpy
    reference above, adaLN-Zero's shift / scale / gate per branch, exact GELU (ours).
    """
    import torch.nn.functional as F

    p, D, C = net.patch_size, net.x_embedder.out_channels, net.channels
    x = torch.cat([x, prior], dim=1)
    B, g = x.shape[0], x.shape[-1] // p
    patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(B, g * g, -1)
    h = patches @ net.x_embedder.weight.reshape(D, -1).T + net.x_embedder.bias
    h = h + torch.from_numpy(_dit_reference_pos_embed(D, g)).float()
    half = net.t_embedder.freq_dim // 2
    freqs = torch.exp(-np.log(10000) * torch.arange(half) / half)
    args = (1000 * t)[:, None] * freqs[None]
    mlp = net.t_embedder.mlp
    t_emb = F.linear(F.silu(F.linear(torch.cat([args.cos(), args.sin()], -1), mlp[0].weight, mlp[0].bias)),
                     mlp[2].weight, mlp[2].bias)
    c = t_emb + net.y_embedder.embedding_table.weight[y]

    def ln(a):
        return F.layer_norm(a, (D,), eps=1e-6)

    for blk in net.blocks:
        ada = F.linear(F.silu(c), blk.adaLN_modulation[1].weight, blk.adaLN_modulation[1].bias)
        shift1, scale1, gate1, shift2, scale2, gate2 = (a[:, None] for a in ada.chunk(6, dim=1))
        a = ln(h) * (1 + scale1) + shift1
        heads = blk.attn.heads
        q, k, v = F.linear(a, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(
            B, g * g, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-2, -1) / (D // heads) ** 0.5).softmax(-1)
        a = F.linear((w @ v).transpose(1, 2).reshape(B, g * g, D), blk.attn.proj.weight, blk.attn.proj.bias)
        h = h + gate1 * a
        a = ln(h) * (1 + scale2) + shift2
        a = F.linear(F.gelu(F.linear(a, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight,
                     blk.mlp.fc2.bias)
        h = h + gate2 * a
    fl = net.final_layer
    shift, scale = (a[:, None] for a in F.linear(F.silu(c), fl.adaLN_modulation[1].weight,
                                                  fl.adaLN_modulation[1].bias).chunk(2, dim=1))
    out = F.linear(ln(h) * (1 + scale) + shift, fl.linear.weight, fl.linear.bias)
    out = out.reshape(B, g, g, p, p, C)  # DiT's unpatchify: nhwpqc -> nchpwq
    return torch.einsum("nhwpqc->nchpwq", out).reshape(B, C, g * p, g * p)


def test_forward_equals_dit_written_out():
    torch.manual_seed(0)
    net = DiT(_scale(depth=2), input_size=8, channels=3, num_classes=4, prior_channels=3)
    for prm in net.parameters():  # leave the zero init so that every gate and branch carries signal
        torch.nn.init.normal_(prm, std=0.1)
    x, prior, t, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 4])
    with torch.no_grad():
        ours, ref = net(x, t, y, prior), _reference_forward(net, x, t, y, prior)
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    # Tokens attend to each other: changing one pixel changes a far-away patch's output.
    x2 = x.clone()
    x2[:, :, 0, 0] += 1
    with torch.no_grad():
        assert not torch.allclose(ours[:, :, -2:, -2:], net(x2, t, y, prior)[:, :, -2:, -2:])


def test_attention_paths_agree():
    # bf16 with grad takes the math path on the CPU; without grad, SDPA.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8).bfloat16().requires_grad_() for _ in range(3))
    w = torch.randn(2, 3, 10, 8)  # a loss whose gradient is not uniform over the outputs
    train_out = attention(q, k, v)
    (train_out.float() * w).sum().backward()
    with torch.no_grad():
        eval_out = attention(q, k, v)
    q32, k32, v32 = (a.detach().float().requires_grad_() for a in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32)
    (ref * w).sum().backward()
    torch.testing.assert_close(train_out.float(), ref, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(eval_out.float(), ref, atol=3e-2, rtol=3e-2)
    for ours, theirs in ((q, q32), (k, k32), (v, v32)):  # the scale's place shows in q's and k's
        torch.testing.assert_close(ours.grad.float(), theirs.grad, atol=5e-2, rtol=5e-2)
