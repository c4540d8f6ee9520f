"""Model facts: sizes, tokens, parameters, and FLOPs, per scale and for a whole sample.

FLOPs are counted analytically for the matrix products (linear layers, patch
embedding, attention scores and values), the way DiT and most papers count them.
Elementwise work (norms, softmax, GELU, modulation) is left out. We report both
**FLOPs** and **multiply-adds (MACs)**, named: 1 MAC = 2 FLOPs. ``tests/test_info.py``
checks the count against ``torch.utils.flop_counter``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from msf.config import ModelConfig, ScaleConfig, evaluations


@dataclass
class ScaleInfo:
    scale: int
    image_size: int
    latent_size: int
    tokens: int
    depth: int
    width: int
    heads: int
    patch_size: int
    in_channels: int
    parameters: int  # counted as DiT's models.py does (fixed position embedding included)
    macs_per_forward: int  # per image
    flops_per_forward: int  # = 2 * macs
    steps: int
    cfg_scale: float
    solver: str
    forwards_per_sample: int  # network evaluations per image, CFG branches counted
    flops_per_sample: int
    options: list[str]  # the later DiT-family options turned on (msf.method.models), [] for the paper's DiT


def _mlp_hidden(s: ScaleConfig) -> tuple[int, int]:
    """(hidden width, its number of input products): GELU's fc1 is one, SwiGLU's w12 two."""
    hidden = int(s.width * s.mlp_ratio)
    return (int(2 / 3 * hidden), 2) if s.mlp == "swiglu" else (hidden, 1)


def _time_embedders(s: ScaleConfig, level: bool) -> int:
    """The scale's scalar embedders: the time's, MeanFlow's interval t - r, the prior's noise level."""
    return 1 + (s.objective == "meanflow") + level


def _dit_parameters(s: ScaleConfig, n: int, channels: int, prior_channels: int, classes: int,
                    level: bool = False) -> int:
    D, p = s.width, s.patch_size
    hidden, gates = _mlp_hidden(s)
    tokens = (n // p) ** 2
    block = (D * 3 * D + 3 * D) + (D * D + D) + gates * (D * hidden + hidden) + (hidden * D + D)
    block += D * 6 * D + 6 * D
    block += 2 * (D // s.heads) if s.qk_norm else 0  # the query and key norms' scales
    embed = (channels + prior_channels) * p * p * D + D
    t_embed = (256 * D + D + D * D + D) * _time_embedders(s, level)
    y_embed = (classes + 1) * D
    final = D * 2 * D + 2 * D + D * p * p * channels + p * p * channels
    pos = tokens * D if "sincos" in s.pos_embed else 0  # counted as DiT counts it; RoPE has none
    return s.depth * block + embed + t_embed + y_embed + final + pos


def _dit_macs(s: ScaleConfig, n: int, channels: int, prior_channels: int, level: bool = False) -> int:
    D, p = s.width, s.patch_size
    hidden, gates = _mlp_hidden(s)
    N = (n // p) ** 2
    per_block = (
        D * 6 * D  # adaLN modulation (once per image)
        + N * D * 3 * D  # qkv
        + 2 * N * N * D  # q k^T and attn @ v
        + N * D * D  # output projection
        + (gates + 1) * N * D * hidden  # MLP
    )
    embed = N * (channels + prior_channels) * p * p * D
    t_embed = (256 * D + D * D) * _time_embedders(s, level)
    final = D * 2 * D + N * D * p * p * channels
    return s.depth * per_block + embed + t_embed + final


def network_options(s: ScaleConfig) -> list[str]:
    """The scale's non-default network options, e.g. ``["qk_norm", "swiglu", "pos_embed=rope"]``."""
    out = ["qk_norm"] if s.qk_norm else []
    out += [s.norm] if s.norm != "layernorm" else []
    out += [s.mlp] if s.mlp != "gelu" else []
    return out + ([f"pos_embed={s.pos_embed}"] if s.pos_embed != "sincos" else [])


def scale_infos(model: ModelConfig) -> list[ScaleInfo]:
    ch = model.autoencoder.channels
    out = []
    for k, (s, n) in enumerate(zip(model.scales, model.latent_sizes)):
        prior_ch = ch if (k > 0 and model.prior == "concat") else 0
        level = prior_ch > 0 and model.prior_aug_max > 0  # its network embeds the prior's noise level
        macs = _dit_macs(s, n, ch, prior_ch, level)
        forwards = evaluations(s.steps, s.cfg_scale, s.solver, s.shift, s.guidance_interval)
        out.append(
            ScaleInfo(
                scale=k, image_size=s.image_size, latent_size=n, tokens=(n // s.patch_size) ** 2,
                depth=s.depth, width=s.width, heads=s.heads, patch_size=s.patch_size,
                in_channels=ch + prior_ch,
                parameters=_dit_parameters(s, n, ch, prior_ch, model.num_classes, level),
                macs_per_forward=macs, flops_per_forward=2 * macs, steps=s.steps,
                cfg_scale=s.cfg_scale, solver=s.solver, forwards_per_sample=forwards,
                flops_per_sample=2 * macs * forwards, options=network_options(s),
            )
        )
    return out


def model_info(model: ModelConfig, name: str = "") -> dict:
    scales = scale_infos(model)
    return {
        "name": name,
        "num_scales": len(scales),
        "num_classes": model.num_classes,
        "autoencoder": asdict(model.autoencoder),
        "base_mode": model.base_mode,
        "prior": model.prior,
        "normalize": model.normalize,
        "parameters": sum(s.parameters for s in scales),
        "flops_per_sample": sum(s.flops_per_sample for s in scales),
        "macs_per_sample": sum(s.flops_per_sample for s in scales) // 2,
        "scales": [asdict(s) for s in scales],
        "flop_convention": "matrix-product FLOPs; 1 multiply-add (MAC) = 2 FLOPs; "
        "per image; elementwise ops not counted",
    }


def _g(x: float) -> str:
    return f"{x / 1e9:,.2f}"


def format_info(info: dict) -> str:
    ae = info["autoencoder"]
    lines = [
        f"{info['name'] or 'model'}: {info['num_scales']} scale(s), {info['num_classes']} classes, "
        f"autoencoder {ae['kind']} (f={ae['factor']}, {ae['channels']} ch), "
        f"base {info['base_mode']}, prior {info['prior']}, normalize {info['normalize']}",
        "",
        "| scale | image | latent | tokens | depth x width | heads | patch | in ch | params "
        "| GFLOPs/fwd | GMACs/fwd | steps | CFG | solver | fwd/sample | GFLOPs/sample |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in info["scales"]:
        lines.append(
            f"| {s['scale']} | {s['image_size']} | {s['latent_size']}x{s['latent_size']} "
            f"| {s['tokens']} | {s['depth']} x {s['width']} | {s['heads']} | {s['patch_size']} "
            f"| {s['in_channels']} | {s['parameters'] / 1e6:,.1f}M ({s['parameters']:,}) "
            f"| {_g(s['flops_per_forward'])} | {_g(s['macs_per_forward'])} | {s['steps']} "
            f"| {s['cfg_scale']} | {s['solver']} | {s['forwards_per_sample']} "
            f"| {_g(s['flops_per_sample'])} |"
        )
    for s in info["scales"]:
        if s["options"]:
            lines.append(f"scale {s['scale']} network options: {', '.join(s['options'])}")
    lines += [
        "",
        f"total parameters: {info['parameters'] / 1e6:,.1f}M ({info['parameters']:,}); "
        f"sampling cost per image: {_g(info['flops_per_sample'])} GFLOPs "
        f"= {_g(info['macs_per_sample'])} GMACs",
        f"({info['flop_convention']})",
    ]
    return "\n".join(lines)
