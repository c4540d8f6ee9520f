"""GPU memory of the paper-size training jobs, per GPU, estimated on the CPU.

What a training step holds on one GPU:

* the training state, per parameter: fp32 weights (4 B), fp32 gradients (4), AdamW's two
  moments (8) and the EMA (4): 20 B. DDP keeps all of it on every GPU (its gradient buckets
  are the gradients: ``gradient_as_bucket_view``); FSDP shards it over the GPUs and adds
  the bf16 weights of the two blocks being gathered and their fp32 gradients;
* the activations autograd saves for the backward pass, per image: measured here by
  running one forward under bf16 autocast at batch 2 with a ``saved_tensors_hooks`` that
  adds up the distinct storages saved, with the CUDA path of the model (SDPA attention
  everywhere, LayerNorm on the fp32 stream; on the CPU msf takes other paths for speed).
  With activation checkpointing only each block's input is kept (fp32), plus one block's
  activations while it is recomputed;
* ``train.scale=all`` trains the scales in one step with one backward through their summed
  losses: the scales' states and activations add up (the rows "scale all");
* a working margin (allocator fragmentation, the CUDA context, kernels' workspaces): we
  reserve 10% of the GPU plus 2 GiB, a rule of thumb, not a measurement.

The table gives, per job, the most images per GPU that fit, DDP and FSDP(8), with and
without activation checkpointing, on an 80 GiB and a 141 GiB GPU, and the GPUs the
preset's global batch then needs (``train.batch_size`` / images per GPU: msf has no
gradient accumulation). Check these on a GPU: ``scripts/gpu_check.sh`` measures peak
memory of a paper-size step with ``torch.cuda.max_memory_allocated``.

    python benchmarks/memory.py [--presets paper-imagenet256,dit-xl2,...] [--fsdp-gpus 8]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from timing import machine  # benchmarks/timing.py, beside this script

import msf.method.models
from msf.method.models import count_parameters
from msf.method.pipeline import autocast, build_scale_networks
from msf.presets import preset

GiB = 1024**3
STATE_BYTES = 20  # fp32 weights, gradients, two AdamW moments, EMA


def saved_bytes_per_image(net: torch.nn.Module, size: int, channels: int, prior: bool) -> int:
    """Bytes autograd saves for backward in one forward, per image (bf16 autocast, CUDA's path)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    old = msf.method.models.attention, msf.method.models.norm_input
    msf.method.models.attention, msf.method.models.norm_input = F.scaled_dot_product_attention, lambda x: x
    try:
        per = []
        for batch in (1, 2):  # the difference between batch 2 and 1 leaves out the weights' copies
            seen.clear()
            x = torch.randn(batch, channels, size, size)
            p = torch.randn(batch, channels, size, size) if prior else None
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast("cpu", "bf16"):
                net(x, torch.rand(batch), torch.zeros(batch, dtype=torch.long), p)
            per.append(sum(seen.values()))
    finally:
        msf.method.models.attention, msf.method.models.norm_input = old
    return per[1] - per[0]


def rows(name: str, fsdp_gpus: int) -> list[dict]:
    cfg = preset(name)
    out = []
    nets = build_scale_networks(cfg.model)
    for k, net in enumerate(nets):
        sc, n = cfg.model.scales[k], cfg.model.latent_sizes[k]
        params = count_parameters(net) - net.pos_embed.numel()
        block = sum(p.numel() for p in net.blocks[0].parameters())
        tokens = (n // sc.patch_size) ** 2
        act = saved_bytes_per_image(net, n, net.channels, net.prior_channels > 0)
        stream = tokens * sc.width * 4  # one block's fp32 input
        act_ckpt = sc.depth * stream + act / sc.depth  # the blocks' inputs + one block recomputed
        ddp = params * STATE_BYTES
        fsdp = params * STATE_BYTES / fsdp_gpus + 2 * block * (2 + 4)
        out.append(dict(preset=name, scale=k, params=params, tokens=tokens, depth=sc.depth,
                        width=sc.width, batch=cfg.train.batch_size, ddp=ddp, fsdp=fsdp, act=act,
                        act_ckpt=act_ckpt))
    if len(out) > 1:  # train.scale=all: one backward through the scales' summed losses
        out.append(dict(out[0], scale="all", tokens="-", **{
            key: sum(r[key] for r in out) for key in ("params", "ddp", "fsdp", "act", "act_ckpt")}))
    return out


def fit(state: float, per_image: float, gpu_gib: float) -> int:
    free = gpu_gib * GiB * 0.9 - 2 * GiB - state
    return max(0, int(free // per_image))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="paper-imagenet256,dit-xl2,paper-imagenet512,dit-xl2-512")
    ap.add_argument("--fsdp-gpus", type=int, default=8)
    ap.add_argument("--gpus", default="80,141", help="GPU memory sizes in GiB")
    args = ap.parse_args()
    torch.manual_seed(0)
    gpus = [float(g) for g in args.gpus.split(",")]
    print(f"# training memory per GPU: {machine()}, {time.strftime('%Y-%m-%d')}\n")
    print("state: 20 B/param (fp32 weights, grads, AdamW moments, EMA); activations: saved tensors "
          "of one bf16-autocast forward, CUDA's path; margin 10% + 2 GiB\n")
    g = args.fsdp_gpus
    head = ["job", "params", "tokens", "state DDP", f"state FSDP({g})", "act/img", "act/img ckpt"]
    for gib in gpus:
        head += [f"img/GPU {gib:.0f}G DDP", "ckpt", f"FSDP({g})", f"FSDP({g}) ckpt"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in args.presets.split(","):
        for r in rows(name, g):
            cells = [f"{r['preset']} scale {r['scale']}", f"{r['params'] / 1e6:.1f}M", str(r["tokens"]),
                     f"{r['ddp'] / GiB:.1f} GiB", f"{r['fsdp'] / GiB:.2f} GiB",
                     f"{r['act'] / 2**20:.0f} MiB", f"{r['act_ckpt'] / 2**20:.0f} MiB"]
            for gib in gpus:
                for state, act in ((r["ddp"], r["act"]), (r["ddp"], r["act_ckpt"]),
                                   (r["fsdp"], r["act"]), (r["fsdp"], r["act_ckpt"])):
                    n = fit(state, act, gib)
                    cells.append(f"{n} ({math.ceil(r['batch'] / n) if n else '-'} GPUs)")
            print("| " + " | ".join(cells) + " |")
    print("\n'n (m GPUs)': n images fit per GPU; the preset's global batch then needs m GPUs.")


if __name__ == "__main__":
    main()
