"""Named presets: each a function returning a fresh :class:`~msf.config.Config`.

What each preset's choices were measured to do is in docs/levers.md ("The presets' settings, and their
measurements"); the paper's sizes and where msf departs from them are in docs/design.md.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from msf.config import AutoencoderConfig, Config, ConfigError, ModelConfig, ScaleConfig, TrainConfig, validate

EMOJI_CLASSES = [
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
]

SD_VAE = AutoencoderConfig(
    kind="sd-vae", path="stabilityai/sd-vae-ft-ema", channels=4, factor=8, scaling_factor=0.18215
)
# The autoencoder shipped in the package (msf/autoencoders/emoji64-kl-f4/README.md): trained by
# `msf train-autoencoder` on emoji64; its scale is the one measured and stored in its folder, which a
# model refuses to load against any other
EMOJI64_VAE = AutoencoderConfig(
    kind="sd-vae", path="emoji64-kl-f4", channels=4, factor=4, scaling_factor=0.17751580476760864
)


def _paper_sampler(steps: list[int] | None = None) -> dict[str, dict[str, Any]]:
    """``model.samplers`` naming the paper's sampler: Euler on a uniform grid, guidance at every step, at
    ``steps`` (one value for every scale where None, so that a preset with other scales keeps it). A
    preset whose defaults are a cheaper sampler names the paper's steps here: ``--sampler paper``."""
    paper = {"solver": "euler", "shift": 1.0, "guidance_interval": [0.0, 1.0]}
    return {"paper": paper if steps is None else {**paper, "steps": steps}}


def _tiny() -> Config:
    """A few-thousand-parameter two-scale model on 16 x 16 images, for tests."""
    model = ModelConfig(
        num_classes=len(EMOJI_CLASSES),
        scales=[
            ScaleConfig(image_size=8, depth=2, width=32, heads=2, steps=8),
            ScaleConfig(image_size=16, depth=2, width=32, heads=2, steps=4),
        ],
        class_names=list(EMOJI_CLASSES),
        samplers=_paper_sampler(),
    )
    train = TrainConfig(steps=50, batch_size=16, lr=1e-3, ema_decay=0.9, precision="fp32")
    return Config(model=model, train=train, preset="tiny")


def _tiny_dit() -> Config:
    """The K = 1 case of ``tiny``: one DiT on the 16 x 16 image, for tests of comparisons."""
    cfg = _tiny()
    cfg.model.scales = [ScaleConfig(image_size=16, depth=2, width=32, heads=2, steps=4)]
    cfg.preset = "tiny-dit"
    return cfg


def _demo() -> Config:
    """Two scales in pixel space on the built-in 32 x 32 emoji, 16 -> 32, at the paper's recipe: minutes
    on a CPU (16 tokens per scale). Guidance 3 on the base, none on the residual, as in the paper."""
    model = ModelConfig(
        num_classes=len(EMOJI_CLASSES),
        scales=[
            # the base sampled with AB2 on a shifted grid; --sampler paper: Euler, 50 + 20 steps
            ScaleConfig(image_size=16, depth=6, width=256, heads=4, patch_size=4, steps=10,
                        cfg_scale=3.0, solver="ab2", shift=2.0),
            ScaleConfig(image_size=32, depth=4, width=128, heads=2, patch_size=4, steps=3),
        ],
        normalize="std",
        class_names=list(EMOJI_CLASSES),
        samplers=_paper_sampler([50, 20]),
    )
    train = TrainConfig(
        steps=1500, batch_size=32, lr=2e-3, warmup_steps=100, ema_decay=0.995,
        time_sampler="logit-normal", out_dir="runs/demo",
    )
    return Config(model=model, train=train, preset="demo")


def _paper_imagenet256() -> Config:
    """MSF's ImageNet 256 recipe (paper §4.1; docs/design.md §2): a 192 px base (24 x 24 latent), DiT
    18 x 1152, and a 256 px residual, DiT 10 x 1280 with the prior concatenated to its input. Learning
    rate: DiT's 1e-4 at batch 256, scaled linearly to batch 2560 (Goyal et al.)."""
    model = ModelConfig(
        num_classes=1000,
        autoencoder=dataclasses.replace(SD_VAE),
        scales=[
            # msf's sampler: the paper's 100 + 50 Euler steps are `--sampler paper`
            ScaleConfig(image_size=192, depth=18, width=1152, heads=16, steps=25, cfg_scale=1.4, solver="ab2",
                        shift=2.0),
            ScaleConfig(image_size=256, depth=10, width=1280, heads=16, steps=10, cfg_scale=1.0),
        ],
        samplers=_paper_sampler([100, 50]),
    )
    train = TrainConfig(
        steps=400_000, scale_steps=[400_000, 250_000], batch_size=2560, lr=1e-3,
        ema_decay=0.9999, data="", out_dir="runs/paper-imagenet256",
    )
    return Config(model=model, train=train, preset="paper-imagenet256")


def _dit_xl2() -> Config:
    """The single-scale baseline DiT-XL/2 on 256 px (32 x 32 latent): the K = 1 case."""
    model = ModelConfig(
        num_classes=1000,
        autoencoder=dataclasses.replace(SD_VAE),
        scales=[
            ScaleConfig(image_size=256, depth=28, width=1152, heads=16, steps=25, cfg_scale=1.5, solver="ab2",
                        shift=2.0)
        ],
        samplers=_paper_sampler([100]),
    )
    train = TrainConfig(
        steps=400_000, batch_size=256, lr=1e-4, ema_decay=0.9999, data="",
        out_dir="runs/dit-xl2",
    )
    return Config(model=model, train=train, preset="dit-xl2")


def _paper_imagenet512() -> Config:
    """Our 512 x 512 version of the paper's recipe: its 256 ratio kept, base = 3/4 of the image (384 px,
    48 x 48 latent; 512 px, 64 x 64), with the same two networks, as DiT-XL/2 keeps its own."""
    cfg = _paper_imagenet256()
    cfg.model.scales[0].image_size, cfg.model.scales[1].image_size = 384, 512
    cfg.preset, cfg.train.out_dir = "paper-imagenet512", "runs/paper-imagenet512"
    return cfg


def _paper_imagenet256_plus() -> Config:
    """``paper-imagenet256`` with the levers that helped MSF on the built-in emoji: conditioning noise 0.2
    on the residual's prior, each component at unit variance, logit-normal times. Sampled as
    ``paper-imagenet256``."""
    cfg = _paper_imagenet256()
    cfg.model.prior_noise = 0.2
    cfg.model.normalize = "std"
    cfg.train.time_sampler = "logit-normal"
    cfg.preset, cfg.train.out_dir = "paper-imagenet256-plus", "runs/paper-imagenet256-plus"
    return cfg


def _dit_xl2_plus() -> Config:
    """``dit-xl2`` with what helped the K = 1 DiT on the built-in emoji: the cosine velocity term at
    weight 0.1 with logit-normal times (FasterDiT's pairing)."""
    cfg = _dit_xl2()
    cfg.train.cosine_loss_weight = 0.1
    cfg.train.time_sampler = "logit-normal"
    cfg.preset, cfg.train.out_dir = "dit-xl2-plus", "runs/dit-xl2-plus"
    return cfg


def _dit_xl2_512() -> Config:
    """DiT-XL/2 at 512 px (64 x 64 latent, 1024 tokens): the 512 baseline."""
    cfg = _dit_xl2()
    cfg.model.scales[0].image_size = 512
    cfg.preset, cfg.train.out_dir = "dit-xl2-512", "runs/dit-xl2-512"
    return cfg


def _dit_demo() -> Config:
    """The K = 1 baseline at the demo's size: one DiT on the full 32 x 32 image."""
    cfg = _demo()
    cfg.model.scales = [
        ScaleConfig(image_size=32, depth=6, width=256, heads=4, patch_size=4, steps=10,
                    cfg_scale=3.0, solver="ab2", shift=2.0)
    ]
    cfg.model.samplers = _paper_sampler([50])
    cfg.preset = "dit-demo"
    cfg.train.out_dir = "runs/dit-demo"
    return cfg


def _demo_paper_ratio() -> Config:
    """``demo`` with the paper's proportions: the base at three quarters of the image (24 of 32 px,
    as 192 of 256), 36 tokens instead of 16."""
    cfg = _demo()
    cfg.model.scales[0].image_size = 24
    cfg.preset = "demo-paper-ratio"
    cfg.train.out_dir = "runs/demo-paper-ratio"
    return cfg


def _demo_plus() -> Config:
    """``demo`` with its best recipe, `make demo`'s preset: learning rate 4e-3, conditioning noise 0.2 on
    the residual's prior, 1,800 steps, guidance 7 on the base (``--sampler paper``: the paper's 3)."""
    cfg = _demo()
    cfg.train.lr = 4e-3
    cfg.model.prior_noise = 0.2
    cfg.model.scales[0].cfg_scale = 7.0
    cfg.model.samplers["paper"]["cfg_scale"] = [s.cfg_scale for s in _demo().model.scales]
    cfg.train.steps = 1800
    cfg.preset, cfg.train.out_dir = "demo-plus", "runs/demo-plus"
    return cfg


def _dit_demo_plus() -> Config:
    """``dit-demo`` with its best recipe, ``demo-plus``'s counterpart: the cosine velocity term at weight
    0.1 and guidance 5 (``--sampler paper``: the paper's 3)."""
    cfg = _dit_demo()
    cfg.train.cosine_loss_weight = 0.1
    cfg.model.scales[0].cfg_scale = 5.0
    cfg.model.samplers["paper"]["cfg_scale"] = [s.cfg_scale for s in _dit_demo().model.scales]
    cfg.preset, cfg.train.out_dir = "dit-demo-plus", "runs/dit-demo-plus"
    return cfg


def _latent_demo() -> Config:
    """MSF in a latent space at our scale, with the paper's proportions: the shipped f = 4 autoencoder on
    the built-in 64 x 64 emoji, a 48 px image base (12 x 12 latent, 36 tokens) under a 64 px residual
    (16 x 16 latent, 64 tokens), the demo's two networks; its latents cached on first use."""
    cfg = _demo_paper_ratio()
    cfg.model.autoencoder = dataclasses.replace(EMOJI64_VAE)
    cfg.model.scales[0].image_size, cfg.model.scales[1].image_size = 48, 64
    for s in cfg.model.scales:
        s.patch_size = 2
    cfg.train.data = "emoji64"
    cfg.preset, cfg.train.out_dir = "latent-demo", "runs/latent-demo"
    return cfg


def _dit_latent_demo() -> Config:
    """The K = 1 case of ``latent-demo``: ``dit-demo``'s network on the whole 16 x 16 latent (64 tokens)."""
    cfg = _dit_demo()
    cfg.model.autoencoder = dataclasses.replace(EMOJI64_VAE)
    cfg.model.scales[0].image_size, cfg.model.scales[0].patch_size = 64, 2
    cfg.train.data = "emoji64"
    cfg.preset, cfg.train.out_dir = "dit-latent-demo", "runs/dit-latent-demo"
    return cfg


def _demo64() -> Config:
    """``latent-demo`` in pixel space: the same networks and token counts on 64 x 64 pixels (48 px base,
    patch 8), to ask whether the latent is worth it at this scale."""
    cfg = _latent_demo()
    cfg.model.autoencoder = AutoencoderConfig()
    for s in cfg.model.scales:
        s.patch_size = 8
    cfg.preset, cfg.train.out_dir = "demo64", "runs/demo64"
    return cfg


PRESETS = {
    "tiny": _tiny,
    "tiny-dit": _tiny_dit,
    "demo": _demo,
    "demo-plus": _demo_plus,
    "dit-demo": _dit_demo,
    "dit-demo-plus": _dit_demo_plus,
    "demo-paper-ratio": _demo_paper_ratio,
    "paper-imagenet256": _paper_imagenet256,
    "paper-imagenet256-plus": _paper_imagenet256_plus,
    "paper-imagenet512": _paper_imagenet512,
    "dit-xl2": _dit_xl2,
    "dit-xl2-plus": _dit_xl2_plus,
    "dit-xl2-512": _dit_xl2_512,
    "latent-demo": _latent_demo,
    "dit-latent-demo": _dit_latent_demo,
    "demo64": _demo64,
}


def preset(name: str) -> Config:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        near = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown preset {name!r}{hint} Available: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    validate(cfg)
    return cfg
