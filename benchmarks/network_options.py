"""What each network option of issue 18 costs: a training step and a sampling evaluation, per preset.

For each variant (the paper's DiT, then QK-norm, RMSNorm, SwiGLU, 2-D RoPE alone, then all four), every
scale's network does a full training step as ``msf.training.train`` runs it (autocast at ``--precision``, by
default auto: bf16 where the CPU runs it natively, else fp32; forward, loss, backward, clipping, AdamW)
on random inputs of its sizes, and a sampling forward of an inference copy in that precision. Variants
are interleaved round by round and the best of ``--repeats`` is kept, so the ratios to the paper's DiT
come from one run on one machine.

    python benchmarks/network_options.py --presets demo,dit-demo --batch 32
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import machine  # benchmarks/timing.py, beside this script

from msf.config import apply_overrides
from msf.interfaces.info import model_info
from msf.method.flow import rectified_flow_loss
from msf.method.pipeline import autocast, build_scale_networks
from msf.precision import resolve_precision
from msf.presets import preset
from msf.speed import inference_copy

VARIANTS = {
    "paper DiT": [],
    "qk_norm": ["model.scales.*.qk_norm=true"],
    "rmsnorm": ["model.scales.*.norm=rmsnorm"],
    "swiglu": ["model.scales.*.mlp=swiglu"],
    "rope": ["model.scales.*.pos_embed=rope"],
    "all four": [
        "model.scales.*.qk_norm=true",
        "model.scales.*.norm=rmsnorm",
        "model.scales.*.mlp=swiglu",
        "model.scales.*.pos_embed=rope",
    ],
}


def _inputs(cfg, k, batch):
    n, ch = cfg.model.latent_sizes[k], cfg.model.autoencoder.channels
    prior = torch.randn(batch, ch, n, n) if k > 0 and cfg.model.prior == "concat" else None
    return (
        torch.randn(batch, ch, n, n),
        torch.rand(batch),
        torch.randint(0, cfg.model.num_classes, (batch,)),
        prior,
    )


def train_ms(cfg, nets, opts, batch, precision: str) -> float:
    t0 = time.perf_counter()
    for k, (net, opt) in enumerate(zip(nets, opts)):
        c, t, y, prior = _inputs(cfg, k, batch)
        with autocast("cpu", precision):
            loss = rectified_flow_loss(net, c, y, t, prior)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def sample_ms(cfg, fast, batch, dtype: torch.dtype) -> float:
    t0 = time.perf_counter()
    for k, net in enumerate(fast):
        c, t, y, prior = _inputs(cfg, k, batch)
        net(c.to(dtype), t, y, None if prior is None else prior.to(dtype))
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="demo,dit-demo")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    args = ap.parse_args()
    precision = resolve_precision(args.precision, "cpu")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    print(f"machine: {machine()}; batch {args.batch}; {precision}; best of {args.repeats}, variants "
          "interleaved\n")
    print("| preset | variant | parameters | GFLOPs/sample | train step ms | x paper | sample fwd ms "
          "| x paper |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.presets.split(","):
        setups = {}
        for v, over in VARIANTS.items():
            cfg = apply_overrides(preset(name), over)
            torch.manual_seed(0)
            nets = build_scale_networks(cfg.model)
            nets.train()
            opts = [torch.optim.AdamW(n.parameters(), lr=1e-4) for n in nets]
            setups[v] = (cfg, nets, opts, [inference_copy(n, dtype) for n in nets])
        best = {v: [float("inf"), float("inf")] for v in VARIANTS}
        for r in range(args.repeats + 1):  # round 0 warms up
            for v, (cfg, nets, opts, fast) in setups.items():
                a = train_ms(cfg, nets, opts, args.batch, precision)
                b = sample_ms(cfg, fast, 2 * args.batch, dtype)
                if r:
                    best[v] = [min(best[v][0], a), min(best[v][1], b)]
        base = best["paper DiT"]
        for v, (cfg, *_rest) in setups.items():
            info = model_info(cfg.model)
            tr, sa = best[v]
            print(
                f"| {name} | {v} | {info['parameters'] / 1e6:.2f}M | {info['flops_per_sample'] / 1e9:.1f} "
                f"| {tr:.1f} | {tr / base[0]:.2f} | {sa:.1f} | {sa / base[1]:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
