"""Backbone speed on this machine: the levers behind msf.models' choices.

Prints three tables, each measured in one run, interleaved, as ratios:

1. attention, forward and forward + backward: ``scaled_dot_product_attention`` vs
   two matmuls and a softmax ("math"), fp32 and bf16;
2. GELU, exact vs tanh approximation (DiT's), bf16 and fp32;
3. one training step (forward + backward + AdamW) of the demo's scale networks and
   a sampling forward, fp32 vs bf16 autocast: images/s.

    python benchmarks/backbone.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from msf.config import preset
from msf.pipeline import autocast, build_scale_networks


def bench(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def math_attention(q, k, v):
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v


def attention_table(repeats: int) -> None:
    print("\n## attention: SDPA vs math (ms, best of repeats)\n")
    print("| B x heads x tokens x dim | dtype | fwd SDPA | fwd math | fwd+bwd SDPA | fwd+bwd math |")
    print("|---|---|---|---|---|---|")
    for shape in [(64, 4, 64, 64), (32, 16, 144, 72), (16, 16, 256, 72)]:
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
            row = []
            for grad in (False, True):
                for fn in (F.scaled_dot_product_attention, math_attention):
                    def run(fn=fn, grad=grad):
                        with torch.set_grad_enabled(grad):
                            out = fn(q, k, v)
                            if grad:
                                out.sum().backward()
                    row.append(bench(run, repeats) * 1e3)
            dt = str(dtype).replace("torch.", "")
            print(f"| {' x '.join(map(str, shape))} | {dt} | " + " | ".join(f"{r:.1f}" for r in row) + " |")


def gelu_table(repeats: int) -> None:
    print("\n## GELU on 4096 x 1024 (ms)\n")
    print("| dtype | exact fwd | tanh fwd | exact fwd+bwd | tanh fwd+bwd |")
    print("|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(4096, 1024, dtype=dtype, requires_grad=True)
        row = []
        for grad in (False, True):
            for approx in ("none", "tanh"):
                def run(approx=approx, grad=grad):
                    with torch.set_grad_enabled(grad):
                        y = F.gelu(x, approximate=approx)
                        if grad:
                            y.sum().backward()
                row.append(bench(run, repeats) * 1e3)
        print(f"| {str(dtype).replace('torch.', '')} | " + " | ".join(f"{r:.1f}" for r in row) + " |")


def training_table(repeats: int, batch: int) -> None:
    cfg = preset("demo").model
    nets = build_scale_networks(cfg)
    print(f"\n## demo scale networks, batch {batch}: images/s\n")
    print("| scale | tokens | train fp32 | train bf16 | bf16 / fp32 "
          "| sample fwd fp32 | sample fwd bf16 | bf16 / fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for k, (net, n) in enumerate(zip(nets, cfg.latent_sizes)):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        x = torch.randn(batch, 3, n, n)
        prior = torch.randn(batch, 3, n, n) if net.prior_channels else None
        y, t = torch.randint(0, 9, (batch,)), torch.rand(batch)
        rates = []
        for grad in (True, False):
            for precision in ("fp32", "bf16"):
                def run(precision=precision, grad=grad):
                    with torch.set_grad_enabled(grad), autocast("cpu", precision):
                        out = net(x, t, y, prior)
                    if grad:
                        F.mse_loss(out.float(), x).backward()
                        opt.step()
                        opt.zero_grad()
                rates.append(batch / bench(run, repeats))
        tokens = (n // cfg.scales[k].patch_size) ** 2
        print(f"| {k} | {tokens} | {rates[0]:.0f} | {rates[1]:.0f} | {rates[1] / rates[0]:.2f} "
              f"| {rates[2]:.0f} | {rates[3]:.0f} | {rates[3] / rates[2]:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"# backbone benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    attention_table(args.repeats)
    gelu_table(args.repeats)
    training_table(args.repeats, args.batch)


if __name__ == "__main__":
    main()
