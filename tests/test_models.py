import numpy as np
import pytest
import torch

from msf.config import preset
from msf.info import _dit_parameters
from msf.models import DiT, attention, count_parameters, sincos_pos_embed_2d
from msf.pipeline import build_scale_networks


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


def test_forward_shapes_zero_init_and_prior_required():
    net = DiT(input_size=12, channels=4, width=32, depth=2, heads=2, num_classes=5,
              prior_channels=4)
    x, prior = torch.randn(3, 4, 12, 12), torch.randn(3, 4, 12, 12)
    out = net(x, torch.rand(3), torch.tensor([0, 4, 5]), prior)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the untrained net predicts zero
    with pytest.raises(ValueError, match="prior"):
        net(x, torch.rand(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="divisible"):
        DiT(input_size=7, channels=4, width=32, depth=1, heads=2, num_classes=5)


def test_output_depends_on_every_input():
    torch.manual_seed(0)
    net = DiT(input_size=8, channels=3, width=32, depth=2, heads=2, num_classes=4,
              prior_channels=3)
    for p in net.parameters():  # leave the zero init so every path carries signal
        torch.nn.init.normal_(p, std=0.05)
    x, prior, t, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 2])
    base = net(x, t, y, prior)
    assert not torch.allclose(base, net(x, t, torch.tensor([3, 0]), prior))
    assert not torch.allclose(base, net(x, t + 0.3, y, prior))
    assert not torch.allclose(base, net(x, t, y, prior + 1))
    # Tokens attend to each other: changing one pixel changes a far-away patch's output.
    x2 = x.clone()
    x2[:, :, 0, 0] += 1
    assert not torch.allclose(base[:, :, -2:, -2:], net(x2, t, y, prior)[:, :, -2:, -2:])


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
