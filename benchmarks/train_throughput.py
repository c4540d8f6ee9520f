"""Training throughput of one scale's network: images/s in fp32 and bf16 autocast.

A full training step as ``msf.training.train`` runs it for that scale (``--device cuda`` on a GPU):
forward, rectified-flow loss, backward, gradient clipping, AdamW, EMA. Random inputs of the scale's sizes
(the factorization and data loading are not timed). fp32 and bf16 are interleaved
and the best of ``--repeats`` steps is kept, after ``--warmup`` steps.

    python benchmarks/train_throughput.py --preset demo --batch 32
    python benchmarks/train_throughput.py --preset paper-imagenet256 --batch 4 --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from timing import machine  # benchmarks/timing.py, beside this script

from msf.interfaces.info import scale_infos
from msf.method.flow import rectified_flow_loss
from msf.method.pipeline import autocast, build_scale_networks
from msf.presets import preset
from msf.training.train import ema_update


def step_time(net, ema, opt, batch, n, channels, prior, precision, device) -> float:
    c = torch.randn(batch, channels, n, n, device=device)
    p = torch.randn(batch, channels, n, n, device=device) if prior else None
    y, t = torch.randint(0, net.num_classes, (batch,), device=device), torch.rand(batch, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with autocast(device, precision):
        loss = rectified_flow_loss(net, c, y, t, p)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema_update(ema, net, 0.9999)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the step's kernels have run, not only been queued
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scales", default="all", help="'all' or comma-separated scale indices")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = preset(args.preset).model
    torch.manual_seed(0)
    print(f"# train throughput: preset {args.preset}, batch {args.batch}, {machine()} at start, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| scale | tokens | depth x width | params | fp32 img/s | bf16 img/s | bf16 / fp32 |")
    print("|---|---|---|---|---|---|---|")
    nets = build_scale_networks(cfg)
    infos = scale_infos(cfg)
    ks = range(len(nets)) if args.scales == "all" else [int(k) for k in args.scales.split(",")]
    for k in ks:
        net, info, n = nets[k].to(device), infos[k], cfg.latent_sizes[k]
        ema = copy.deepcopy(net).requires_grad_(False)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        best = {"fp32": float("inf"), "bf16": float("inf")}
        for i in range(args.warmup + args.repeats):
            for precision in ("fp32", "bf16"):
                dt = step_time(net, ema, opt, args.batch, n, cfg.autoencoder.channels,
                               net.prior_channels > 0, precision, device)
                if i >= args.warmup:
                    best[precision] = min(best[precision], dt)
        fp32, bf16 = args.batch / best["fp32"], args.batch / best["bf16"]
        print(f"| {k} | {info.tokens} | {info.depth} x {info.width} | {info.parameters / 1e6:.1f}M "
              f"| {fp32:.2f} | {bf16:.2f} | {bf16 / fp32:.2f} |", flush=True)
        del net, ema, opt


if __name__ == "__main__":
    main()
