"""Backbone speed on this machine: the levers behind msf.speed's choices.

Prints four tables, each measured in one run, interleaved, as ratios:

1. attention, forward and forward + backward: ``scaled_dot_product_attention`` vs
   two matmuls and a softmax ("math"), fp32 and bf16;
2. GELU, exact vs tanh approximation (DiT's), bf16 and fp32;
3. one training step (forward + backward + AdamW) of the demo's scale networks and
   a sampling forward, fp32 vs bf16 autocast: images/s;
4. our DiT against diffusers' ``DiTTransformer2DModel`` at the same configuration
   (DiT-XL/2 dims on 256 tokens, with ``--xl-blocks`` of its 28 blocks, and DiT-S/2),
   forward and forward + backward (bf16 autocast, and bf16 weights): seconds, ratio,
   and the fraction of the bf16 matrix-product rate measured in the same run on the
   sizes of one block's Linear layers. ``--compile`` adds, for both models,
   ``msf.speed.compile_for_inference`` and a ``torch.compile``'d training step.

    python benchmarks/backbone.py [--repeats 5] [--sections 1,2,3,4] [--compile] [--configs small,xl]
    python benchmarks/backbone.py --quick      # smoke run: small sizes, 2 repeats
    python benchmarks/backbone.py --sections 4 --dit-batch 64 --xl-blocks 28 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from timing import interleaved, machine  # benchmarks/timing.py, beside this script

from msf.config import AutoencoderConfig, ModelConfig, ScaleConfig
from msf.interfaces.info import scale_infos
from msf.method.models import DiT
from msf.method.pipeline import autocast, build_scale_networks
from msf.presets import preset
from msf.speed import compile_for_inference, inference_copy

CPU = torch.device("cpu")


def bench(fn, repeats: int, device: torch.device = CPU) -> float:
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def math_attention_scaled_scores(q, k, v):
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v


def math_attention(q, k, v):
    """msf.speed.attention's bf16 training path: the scale on q, not on the N x N scores."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v


def attention_table(repeats: int, device: torch.device) -> None:
    print("\n## attention: SDPA vs math (ms, best of repeats)\n")
    print("math: two batched matmuls and a softmax, the 1/sqrt(d) scale on q (msf's); "
          "'scores scaled': the scale on the N x N scores instead\n")
    print("| B x heads x tokens x dim | dtype | fwd SDPA | fwd math | fwd math, scores scaled "
          "| fwd+bwd SDPA | fwd+bwd math | fwd+bwd math, scores scaled |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in [(64, 4, 64, 64), (32, 16, 144, 72), (16, 16, 256, 72)]:
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)
                       for _ in range(3))
            row = []
            for grad in (False, True):
                for fn in (F.scaled_dot_product_attention, math_attention,
                           math_attention_scaled_scores):
                    def run(fn=fn, grad=grad):
                        with torch.set_grad_enabled(grad):
                            out = fn(q, k, v)
                            if grad:
                                out.sum().backward()
                    row.append(bench(run, repeats, device) * 1e3)
            dt = str(dtype).replace("torch.", "")
            print(f"| {' x '.join(map(str, shape))} | {dt} | " + " | ".join(f"{r:.1f}" for r in row) + " |")


def gelu_table(repeats: int, device: torch.device) -> None:
    print("\n## GELU on 4096 x 1024 (ms)\n")
    print("| dtype | exact fwd | tanh fwd | exact fwd+bwd | tanh fwd+bwd |")
    print("|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(4096, 1024, dtype=dtype, device=device, requires_grad=True)
        row = []
        for grad in (False, True):
            for approx in ("none", "tanh"):
                def run(approx=approx, grad=grad):
                    with torch.set_grad_enabled(grad):
                        y = F.gelu(x, approximate=approx)
                        if grad:
                            y.sum().backward()
                row.append(bench(run, repeats, device) * 1e3)
        print(f"| {str(dtype).replace('torch.', '')} | " + " | ".join(f"{r:.1f}" for r in row) + " |")


def training_table(repeats: int, batch: int, device: torch.device) -> None:
    cfg = preset("demo").model
    nets = [net.to(device) for net in build_scale_networks(cfg)]
    print(f"\n## demo scale networks, batch {batch}: images/s\n")
    print("| scale | tokens | train fp32 | train bf16 | bf16 / fp32 "
          "| sample fwd fp32 | sample fwd bf16 | bf16 / fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for k, (net, n) in enumerate(zip(nets, cfg.latent_sizes)):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        x = torch.randn(batch, 3, n, n, device=device)
        prior = torch.randn(batch, 3, n, n, device=device) if net.prior_channels else None
        y, t = torch.randint(0, 9, (batch,), device=device), torch.rand(batch, device=device)
        rates = []
        for grad in (True, False):
            for precision in ("fp32", "bf16"):
                def run(precision=precision, grad=grad):
                    with torch.set_grad_enabled(grad), autocast(device, precision):
                        out = net(x, t, y, prior)
                    if grad:
                        F.mse_loss(out.float(), x).backward()
                        opt.step()
                        opt.zero_grad()
                rates.append(batch / bench(run, repeats, device))
        tokens = (n // cfg.scales[k].patch_size) ** 2
        print(f"| {k} | {tokens} | {rates[0]:.0f} | {rates[1]:.0f} | {rates[1] / rates[0]:.2f} "
              f"| {rates[2]:.0f} | {rates[3]:.0f} | {rates[3] / rates[2]:.2f} |")


# --------------------------------------------------------------------- ours vs diffusers


def ratio(times: dict, num: str, den: str) -> str:
    """Median over repeats of the per-repeat ratio (robust to a busy machine), and its range."""
    each = [a / b for a, b in zip(times[num], times[den])]
    return f"{statistics.median(each):.2f} [{min(each):.2f}-{max(each):.2f}]"


def block_matmuls(tokens: int, width: int, hidden: int, device: torch.device):
    """bf16 ``x @ w.T`` on one block's Linear sizes (qkv, proj, fc1, fc2): (function, FLOPs)."""
    shapes = [(width, 3 * width), (width, width), (width, hidden), (hidden, width)]
    xs = {k: torch.randn(tokens, k, dtype=torch.bfloat16, device=device) for k in {width, hidden}}
    ws = [torch.randn(n, k, dtype=torch.bfloat16, device=device) for k, n in shapes]

    def run():
        for (k, _), w in zip(shapes, ws):
            xs[k] @ w.t()
        synchronize(device)

    return run, sum(2 * tokens * k * n for k, n in shapes)


def diffusers_dit(depth: int, width: int, heads: int, size: int, channels: int, classes: int):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=width // heads, in_channels=channels,
        out_channels=channels, num_layers=depth, sample_size=size, patch_size=2,
        num_embeds_ada_norm=classes, norm_type="ada_norm_zero",
    )


def randomize(model: torch.nn.Module) -> None:
    """Small random weights everywhere: adaLN-Zero's zeros would make the blocks trivial."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)


def diffusers_table(repeats: int, batch: int, xl_blocks: int, quick: bool, compile_: bool,
                    which: str, device: torch.device) -> None:
    from diffusers.utils import logging as diffusers_logging

    # its bf16 .to() warning; set after import (diffusers sets its own level on import)
    diffusers_logging.set_verbosity_error()
    size, channels, classes = 32, 4, 1000
    configs = [("S/2 (12 x 384)", 12, 384, 6),
               (f"XL/2 ({xl_blocks} of 28 blocks x 1152)", xl_blocks, 1152, 16)]
    if quick:
        configs = [("tiny (2 x 128)", 2, 128, 2), ("XL/2 (1 of 28 blocks x 1152)", 1, 1152, 16)]
    configs = [c for c, key in zip(configs, ("small", "xl")) if key in which.split(",")]
    print(f"\n## our DiT vs diffusers' DiTTransformer2DModel, batch {batch}, 256 tokens, bf16, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}\n")
    print("seconds per call, median of interleaved repeats; 'ours / diffusers' is the median "
          "per-repeat speed-up (> 1: ours faster); '% mm' = counted matrix-product FLOP/s as a "
          "fraction of the bf16 matmul rate measured on the same sizes in this run.\n")
    print("| config | mode | ours s | diffusers s | ours / diffusers | ours % mm | diffusers % mm |")
    print("|---|---|---|---|---|---|---|")
    for name, depth, width, heads in configs:
        torch.manual_seed(0)
        ours = DiT(ScaleConfig(size, depth, width, heads), size, channels, classes).to(device)
        theirs = diffusers_dit(depth, width, heads, size, channels, classes).to(device)
        randomize(ours)
        randomize(theirs)
        x = torch.randn(batch, channels, size, size, device=device)
        t, y = torch.rand(batch, device=device), torch.randint(0, classes, (batch,), device=device)
        info = scale_infos(ModelConfig(
            num_classes=classes, autoencoder=AutoencoderConfig(channels=channels),
            scales=[ScaleConfig(image_size=size, depth=depth, width=width, heads=heads)]))[0]
        matmuls, matmul_flops = block_matmuls(batch * info.tokens, width, 4 * width, device)
        fwd_flops = info.flops_per_forward * batch
        ours16, theirs16 = inference_copy(ours), inference_copy(theirs)

        def call(model, ours: bool, x):
            return model(x, t, y) if ours else model(x, timestep=t * 1000, class_labels=y).sample

        def fwd(model, ours: bool, dtype, amp: bool):
            def run():
                with torch.no_grad(), autocast(device, "bf16" if amp else "fp32"):
                    call(model, ours, x.to(dtype))
                synchronize(device)
            return run

        def train(model, ours: bool, amp: bool = True):
            def run():
                with autocast(device, "bf16" if amp else "fp32"):
                    out = call(model, ours, x if amp else x.bfloat16())
                F.mse_loss(out.float(), x).backward()
                model.zero_grad(set_to_none=True)
                synchronize(device)
            return run

        modes = [
            ("fwd, bf16 weights", fwd(ours16, True, torch.bfloat16, False),
             fwd(theirs16, False, torch.bfloat16, False), fwd_flops),
            ("fwd, fp32 weights + bf16 autocast", fwd(ours, True, torch.float32, True),
             fwd(theirs, False, torch.float32, True), fwd_flops),
            ("fwd + bwd, bf16 autocast (training)", train(ours, True), train(theirs, False),
             3 * fwd_flops),
            # bf16 everywhere: under autocast the residual streams differ (ours fp32,
            # diffusers' bf16 on the CPU), here both models run one dtype throughout
            ("fwd + bwd, bf16 weights", train(copy.deepcopy(ours).bfloat16(), True, False),
             train(copy.deepcopy(theirs).bfloat16(), False, False), 3 * fwd_flops),
        ]
        if compile_:
            oc, dc = compile_for_inference(ours), compile_for_inference(theirs)
            t0 = time.perf_counter()
            fwd(oc, True, torch.bfloat16, False)()
            t1 = time.perf_counter()
            fwd(dc, False, torch.bfloat16, False)()
            t2 = time.perf_counter()
            print(f"<!-- compile time: ours {t1 - t0:.0f} s, diffusers {t2 - t1:.0f} s -->")
            modes.append(("fwd, compile_for_inference (bf16, frozen)",
                          fwd(oc, True, torch.bfloat16, False), fwd(dc, False, torch.bfloat16, False),
                          fwd_flops))
            # training as `train.compile=true` runs it: torch.compile over fp32 weights, autocast
            modes.append(("fwd + bwd, torch.compile (bf16 autocast)", train(torch.compile(ours), True),
                          train(torch.compile(theirs), False), 3 * fwd_flops))
        fns = {}
        for mode, o, d, _ in modes:
            fns[f"ours {mode}"], fns[f"diffusers {mode}"] = o, d
        fns["matmul"] = matmuls  # interleaved too: the rate under the same load as the models
        times = interleaved(fns, repeats)
        rate = matmul_flops / statistics.median(times["matmul"])
        for mode, _, _, flops in modes:
            to, td = (statistics.median(times[f"{w} {mode}"]) for w in ("ours", "diffusers"))
            print(f"| {name} | {mode} | {to:.3f} | {td:.3f} "
                  f"| {ratio(times, f'diffusers {mode}', f'ours {mode}')} "
                  f"| {flops / to / rate:.0%} | {flops / td / rate:.0%} |")
        if compile_:
            for what, eager, compiled in (("forward, bf16 weights", modes[0][0], modes[-2][0]),
                                          ("training, autocast", modes[2][0], modes[-1][0])):
                print(f"| {name} | compiled / eager speed-up ({what}) "
                      f"| {ratio(times, f'ours {eager}', f'ours {compiled}')} "
                      f"| {ratio(times, f'diffusers {eager}', f'diffusers {compiled}')} | | | |")
        print(f"| {name} | bf16 matmul rate, {batch * info.tokens} x {width} x {4 * width} etc. "
              f"| {rate / 1e12:.2f} TFLOP/s | | | | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32, help="batch of section 3")
    ap.add_argument("--dit-batch", type=int, default=8, help="batch of section 4")
    ap.add_argument("--xl-blocks", type=int, default=8, help="blocks of the XL/2 model in section 4")
    ap.add_argument("--sections", default="1,2,3,4")
    ap.add_argument("--compile", action="store_true", help="section 4: add compiled forwards")
    ap.add_argument("--configs", default="small,xl", help="section 4: 'small', 'xl' or both")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ... (every section)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, 2 repeats")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.batch, args.dit_batch = 2, 8, 2
    sections = {int(s) for s in args.sections.split(",")}
    torch.manual_seed(0)
    print(f"# backbone benchmark: {machine()} at start, {time.strftime('%Y-%m-%d')}")
    device = torch.device(args.device)
    if 1 in sections:
        attention_table(args.repeats, device)
    if 2 in sections:
        gelu_table(args.repeats, device)
    if 3 in sections:
        training_table(args.repeats, args.batch, device)
    if 4 in sections:
        diffusers_table(args.repeats, args.dit_batch, args.xl_blocks, args.quick, args.compile,
                        args.configs, device)


if __name__ == "__main__":
    main()
