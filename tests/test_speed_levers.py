"""Inference levers of issue 6: bf16 inference copies, compiled copies, ``sample(nets=...)``."""

import os

import pytest
import torch

from msf.config import ScaleConfig
from msf.method.models import DiT
from msf.method.pipeline import MSFPipeline
from msf.presets import preset
from msf.speed import compile_for_inference, inference_copy


def _net(prior_channels: int = 0) -> DiT:
    torch.manual_seed(0)
    net = DiT(ScaleConfig(image_size=8, depth=2, width=64, heads=2), input_size=8, channels=3, num_classes=4,
              prior_channels=prior_channels)
    with torch.no_grad():  # leave the zero init so the comparison carries signal
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    return net


def _inputs(prior: bool = False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 8, 8, generator=g)
    return x, torch.rand(3, generator=g), torch.tensor([0, 3, 4]), (
        torch.randn(3, 3, 8, 8, generator=g) if prior else None)


def test_inference_copy_is_bf16_close_and_leaves_the_model_alone():
    net = _net(prior_channels=3).train()
    x, t, y, prior = _inputs(prior=True)
    ref = net(x, t, y, prior)
    fast = inference_copy(net)
    assert next(fast.parameters()).dtype == torch.bfloat16 and not fast.training
    assert not any(p.requires_grad for p in fast.parameters())
    assert next(net.parameters()).dtype == torch.float32 and net.training  # untouched
    with torch.no_grad():
        out = fast(x, t, y, prior)  # fp32 inputs into bf16 weights
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 3e-2, err


def test_sample_with_replaced_nets():
    pipe = MSFPipeline(preset("tiny").model)
    with torch.no_grad():
        for p in pipe.networks.parameters():
            p.normal_(0.0, 0.05)
    labels = [0, 1, 2]
    ref = pipe.sample(labels, seed=3)
    same = pipe.sample(labels, seed=3, nets=dict(enumerate(pipe.networks)))
    assert torch.equal(ref, same)
    fast = pipe.sample(labels, seed=3, nets={k: inference_copy(n) for k, n in enumerate(pipe.networks)})
    assert fast.dtype == torch.float32
    assert (fast - ref).abs().max() < 5e-2


# ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU, how the suite plays an AVX2-only machine (docs/testing.md):
# inductor then writes AVX2 vector code on a machine that has AVX-512, and its frozen bf16 kernels give
# NaN. An AVX2-only EPYC itself passed this test; the emulation, not the code, is at fault.
@pytest.mark.skipif(bool(os.environ.get("ATEN_CPU_CAPABILITY")) and torch.cpu._is_avx512_supported()
                    and not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
                    reason="ATen capped below the CPU's AVX-512 (an emulated AVX2 machine)")
def test_compile_for_inference_matches_eager():
    net = _net()
    x, t, y, _ = _inputs()
    eager = inference_copy(net)
    compiled = compile_for_inference(net)
    with torch.no_grad():
        a, b = eager(x, t, y), compiled(x, t, y)
    assert (a.float() - b.float()).abs().max() / a.float().abs().max() < 3e-2


def test_residual_stream_is_contiguous():
    # The conv's (B, D, N) layout must not leak into the blocks: every LayerNorm and
    # Linear would copy it (10% of an XL forward).
    net = _net()
    seen = []
    net.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    x, t, y, _ = _inputs()
    net(x, t, y)
    assert seen == [True]


def _ops(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_linear_fuses_bias_in_bf16_inference_and_falls_back_elsewhere():
    from msf import speed

    torch.manual_seed(0)
    lin = speed.Linear(64, 96)
    x = torch.randn(2, 5, 64)
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    fast = inference_copy(lin)
    xb = x.bfloat16()
    with torch.no_grad():
        out = fast(xb)
        ops = _ops(lambda: fast(xb))
    assert out.shape == (2, 5, 96) and out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() / ref.abs().max() < 2e-2
    fused = "mkldnn::_linear_pointwise"
    assert (fused in ops) == speed._ONEDNN_BF16
    # fp32, and anything autograd must differentiate, take F.linear
    assert fused not in _ops(lambda: lin(x))
    train = inference_copy(lin).requires_grad_(True)
    out = train(xb.requires_grad_())
    out.float().sum().backward()
    assert xb.grad is not None and train.weight.grad is not None


def test_cpu_autocast_normalises_in_bf16_and_keeps_an_fp32_residual_stream():
    net = _net()
    norm_in, block_out = [], []
    net.blocks[0].norm1.register_forward_pre_hook(lambda m, a: norm_in.append(a[0].dtype))
    net.blocks[0].register_forward_hook(lambda m, a, out: block_out.append(out.dtype))
    x, t, y, _ = _inputs()
    ref = net(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, y)
    assert norm_in == [torch.float32, torch.bfloat16]
    assert block_out == [torch.float32, torch.float32]
    assert (out.float() - ref).abs().max() / ref.abs().max() < 3e-2


def test_bf16_training_attention_on_the_cpu_is_sdpa_in_value_and_gradient():
    # bf16 training on the CPU takes two matmuls and a softmax instead of SDPA (a faster backward)
    from msf.speed import attention

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 16, 32, generator=g) for _ in range(3))
    ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_in)
    ref.square().sum().backward()
    ours_in = [t.to(torch.bfloat16).requires_grad_(True) for t in (q, k, v)]
    out = attention(*ours_in)
    out.float().square().sum().backward()
    assert (out.float() - ref).abs().max() < 3e-2 * ref.abs().max()
    for a, b in zip(ours_in, ref_in):
        assert (a.grad.float() - b.grad).abs().max() < 5e-2 * b.grad.abs().max()


def test_tf32_is_set_for_cuda_devices_only_and_restored():
    """Issue 16, item 7 (the flags can be set without a GPU)."""
    from msf.speed import tf32

    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    before = flags()
    with tf32(torch.device("cuda", 0), True):
        assert flags() == (True, True)
        with tf32(torch.device("cuda", 0), False):
            assert flags() == (False, False)
        assert flags() == (True, True)
    assert flags() == before
    with tf32(torch.device("cpu"), not before[0]):
        assert flags() == before
