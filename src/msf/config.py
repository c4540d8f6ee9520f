"""Typed configs, named presets, ``key=value`` overrides, validation.

A :class:`Config` has two parts: ``model`` (everything needed to rebuild and sample
a pipeline; saved as ``config.json`` in every model directory) and ``train`` (the
recipe). Presets are functions returning a fresh :class:`Config`.

Time convention (one, everywhere): ``t = 0`` is data, ``t = 1`` is noise,
``x_t = (1 - t) * c + t * e`` and the networks predict the velocity ``e - c``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

BASE_MODES = ("image", "latent")
PRIOR_MODES = ("concat", "none")
NORMALIZE_MODES = ("none", "std")
SOLVERS = ("euler", "heun", "midpoint", "ab2")  # msf.method.sampler
TIME_SAMPLERS = ("uniform", "logit-normal")
# training: autocast dtype of the forward pass; "auto": bf16 where the hardware has it (msf.precision)
PRECISIONS = ("auto", "bf16", "fp32")
# sampling adds bf16 weight copies (msf.speed.inference_copy) to the autocast choices
SAMPLING_PRECISIONS = ("auto", "fp32", "bf16", "bf16-weights")
FEATURE_PRECISIONS = ("fp32", "bf16", "auto")  # the Inception network's; fp32 is the reference
TIME_CONVENTIONS = ("msf", "sit", "ddpm")  # how a scale's weights read time (models, convert)
GELUS = ("exact", "tanh")
NORMS = ("layernorm", "rmsnorm")
# A scale's sampler defaults: they change how a model samples, not how it trains
SAMPLING_FIELDS = ("steps", "cfg_scale", "solver", "shift", "guidance_interval")
MLPS = ("gelu", "swiglu")
POS_EMBEDS = ("sincos", "rope", "sincos+rope")


class ConfigError(ValueError):
    """A config value, file or override is invalid; the message names the field."""


@dataclass
class AutoencoderConfig:
    kind: str = "identity"  # "identity" (pixel space) or "sd-vae" (diffusers AutoencoderKL)
    path: str | None = None  # local folder or hub id, for kinds that load weights
    channels: int = 3
    factor: int = 1  # spatial downsampling factor f
    scaling_factor: float = 1.0  # checked against the VAE's own config when it loads
    sample_posterior: bool = False  # encode with a posterior sample instead of its mean
    dtype: str = "fp32"  # "fp32" or "bf16": the precision the autoencoder runs in


@dataclass
class ScaleConfig:
    image_size: int  # s_k; the latent size is image_size // autoencoder.factor
    depth: int
    width: int
    heads: int
    patch_size: int = 2
    mlp_ratio: float = 4.0
    # Sampler defaults for this scale (overridable per call).
    steps: int = 50  # network evaluations per CFG branch
    cfg_scale: float = 1.0
    solver: str = "euler"
    shift: float = 1.0  # time grid: 1 uniform (the paper's); > 1 more steps near the noise
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # guide only at t in [a, b]
    # For weights imported from SiT or DiT (msf.interfaces.convert): "sit" feeds the network 1 - t and negates
    # its output; "ddpm" runs DiT's noise prediction at DDPM timesteps (msf.method.models.ddpm_inputs).
    # Either way the network still gives msf's velocity at t.
    time_convention: str = "msf"
    gelu: str = "exact"  # "tanh": the GELU approximation DiT and SiT were trained with
    # Later DiT-family network options (msf.method.models); the defaults are the paper's DiT.
    qk_norm: bool = False  # RMSNorm on each head's queries and keys
    norm: str = "layernorm"  # or "rmsnorm"
    mlp: str = "gelu"  # or "swiglu" (hidden width 2/3 of mlp_ratio x width)
    pos_embed: str = "sincos"  # or "rope" (2-D rotary) or "sincos+rope"


def evaluations(steps: int, cfg_scale: float, solver: str = "euler", shift: float = 1.0,
                interval: tuple[float, float] | list[float] = (0.0, 1.0)) -> int:
    """Network evaluations per image of one scale's sampler: ``steps`` per CFG branch, and two
    branches unless ``cfg_scale`` is 1 (the conditional pass alone), or at times outside the
    guidance ``interval``."""
    if cfg_scale == 1.0:
        return steps
    if tuple(interval) == (0.0, 1.0):
        return 2 * steps
    from msf.method.sampler import evaluation_times, guided

    lo, hi = interval
    return steps + sum(guided(t, (lo, hi)) for t in evaluation_times(steps, solver, shift))


CFG_RANGE = (0.0, 100.0)  # guidance scales accepted (0: unconditional, 1: no guidance)


@dataclass(frozen=True)
class SamplerSettings:
    """How each scale of Algorithm 3 is sampled, one value per scale: ``steps`` (network
    evaluations per CFG branch), ``cfg_scale`` (guidance; 1 is none) and ``solver``.

    The pipeline, ``msf sample``, sample sets and sweeps share it; it is checked when made, so
    that a bad value fails before any sampling work, with the allowed range in the message.
    """

    steps: tuple[int, ...]
    cfg_scale: tuple[float, ...]
    solver: tuple[str, ...]
    shift: tuple[float, ...] | None = None  # None: 1 (uniform) at every scale
    guidance_interval: tuple[tuple[float, float], ...] | None = None  # None: (0, 1) at every scale

    def __post_init__(self) -> None:
        k = len(self.steps)
        if self.shift is None:
            object.__setattr__(self, "shift", (1.0,) * k)
        if self.guidance_interval is None:
            object.__setattr__(self, "guidance_interval", ((0.0, 1.0),) * k)
        object.__setattr__(self, "guidance_interval", tuple(tuple(float(v) for v in g)
                                                            for g in self.guidance_interval))
        if len(self.cfg_scale) != k or len(self.solver) != k or len(self.shift) != k \
                or len(self.guidance_interval) != k:
            raise ConfigError(f"sampler settings: one value per scale for steps, cfg_scale, solver, shift "
                              f"and guidance_interval, got {list(self.steps)}, {list(self.cfg_scale)}, "
                              f"{list(self.solver)}, {list(self.shift)}, {list(self.guidance_interval)}")
        for i in range(k):
            shift, (lo, hi) = self.shift[i], self.guidance_interval[i]
            if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not 0 < shift <= 100:
                raise ConfigError(f"shift: {shift!r} for scale {i} must be a number in (0, 100] "
                                  "(1 = uniform)")
            if not 0.0 <= lo <= hi <= 1.0:
                raise ConfigError(f"guidance_interval: [{lo:g}, {hi:g}] for scale {i} must satisfy "
                                  "0 <= a <= b <= 1 (times: 0 data, 1 noise)")
        for i in range(k):
            steps, w, solver = self.steps[i], self.cfg_scale[i], self.solver[i]
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ConfigError(f"steps: {steps!r} for scale {i} must be an integer >= 1")
            number = isinstance(w, (int, float)) and not isinstance(w, bool)
            if not number or not CFG_RANGE[0] <= w <= CFG_RANGE[1]:  # also NaN
                raise ConfigError(f"cfg_scale: {w!r} for scale {i} must be a number in "
                                  f"[{CFG_RANGE[0]:g}, {CFG_RANGE[1]:g}] (1 = no guidance)")
            if solver not in SOLVERS:
                raise ConfigError(f"solver: {solver!r} for scale {i} must be one of {SOLVERS}")

    @classmethod
    def named(cls, model: ModelConfig, name: str = "default") -> SamplerSettings:
        """The model's per-scale defaults (``"default"``), or one of its named settings
        (``model.samplers``; ``"paper"``: the paper's sampler, Euler on a uniform grid with guidance
        throughout, which every model saved before named settings existed samples with by default)."""
        defaults = cls(tuple(s.steps for s in model.scales), tuple(float(s.cfg_scale) for s in model.scales),
                       tuple(s.solver for s in model.scales), tuple(float(s.shift) for s in model.scales),
                       tuple(tuple(s.guidance_interval) for s in model.scales))
        if name == "default":
            return defaults
        if name in model.samplers:
            return cls.of(model, base=defaults, **model.samplers[name])
        plain = all(s == "euler" for s in defaults.solver) and all(v == 1.0 for v in defaults.shift) \
            and all(g == (0.0, 1.0) for g in defaults.guidance_interval)
        if name == "paper" and not model.samplers and plain:
            return defaults
        raise ConfigError(f"sampler {name!r}: this model names {['default', *model.samplers]}")

    @classmethod
    def of(cls, model: ModelConfig, steps=None, cfg_scale=None, solver=None,
           base: SamplerSettings | None = None, shift=None, guidance_interval=None,
           name: str | None = None) -> SamplerSettings:
        """``base`` (by default the model's named settings ``name``, else its per-scale defaults) with
        the given values replacing its own: each one value for every scale, or a list with one per scale
        (``guidance_interval``: one ``(a, b)`` pair, or a list of pairs)."""
        base = base or cls.named(model, name or "default")
        k = model.num_scales

        def per_scale(name: str, value, default: tuple) -> tuple:
            if value is None:
                return default
            if isinstance(value, (list, tuple)):
                if len(value) != k:
                    raise ConfigError(f"{name}: need one value per scale ({k}), got {list(value)}")
                return tuple(value)
            return (value,) * k

        if guidance_interval is not None and len(guidance_interval) == 2 \
                and all(isinstance(v, (int, float)) for v in guidance_interval):
            guidance_interval = [tuple(guidance_interval)] * k  # one pair for every scale
        return cls(per_scale("steps", steps, base.steps),
                   per_scale("cfg_scale", cfg_scale, base.cfg_scale),
                   per_scale("solver", solver, base.solver),
                   per_scale("shift", shift, base.shift),
                   per_scale("guidance_interval", guidance_interval, base.guidance_interval))

    def make_defaults(self, model: ModelConfig) -> None:
        """Write these settings into ``model``'s scales as their defaults."""
        for k, s in enumerate(model.scales):
            s.steps, s.cfg_scale, s.solver = self.steps[k], self.cfg_scale[k], self.solver[k]
            s.shift, s.guidance_interval = self.shift[k], list(self.guidance_interval[k])

    def scale_evaluations(self, k: int) -> int:
        """Network evaluations per image of scale k, CFG branches counted."""
        return evaluations(self.steps[k], self.cfg_scale[k], self.solver[k], self.shift[k],
                           self.guidance_interval[k])

    @property
    def evaluations(self) -> int:
        """Network evaluations per image, every scale and CFG branch counted."""
        return sum(self.scale_evaluations(k) for k in range(len(self.steps)))

    def to_dict(self) -> dict[str, list]:
        """The settings; the shift and the guidance interval only where one differs from the paper's
        (uniform grid, guidance everywhere), so records of earlier sample sets still match."""
        out = {"steps": list(self.steps), "cfg_scale": list(self.cfg_scale), "solver": list(self.solver)}
        if any(v != 1.0 for v in self.shift):
            out["shift"] = list(self.shift)
        if any(g != (0.0, 1.0) for g in self.guidance_interval):
            out["guidance_interval"] = [list(g) for g in self.guidance_interval]
        return out

    def describe(self) -> str:
        """One line for captions: ``steps 100,50  cfg 1.4,1  euler  (300 evaluations/image)``."""
        solvers = self.solver[0] if len(set(self.solver)) == 1 else ",".join(self.solver)
        extra = ""
        if any(v != 1.0 for v in self.shift):
            extra += f"  shift {','.join(f'{v:g}' for v in self.shift)}"
        if any(g != (0.0, 1.0) for g in self.guidance_interval):
            extra += "  guided t in " + ",".join(f"[{a:g},{b:g}]" for a, b in self.guidance_interval)
        return (f"steps {','.join(map(str, self.steps))}  cfg {','.join(f'{w:g}' for w in self.cfg_scale)}  "
                f"{solvers}{extra}  ({self.evaluations} evaluations/image)")


@dataclass
class ModelConfig:
    num_classes: int
    scales: list[ScaleConfig]
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    base_mode: str = "image"  # c_0 = E(resize_image(x, s_0)) ("image") or down(z, n_0)
    prior: str = "concat"  # how scale k > 0 sees its prior: channel concat, or not at all
    prior_noise: float = 0.0  # conditioning augmentation: std of noise added to priors
    normalize: str = "none"  # "std": train each component at unit variance
    component_std: list[float] | None = None  # per-scale std, measured on data ("std")
    class_names: list[str] | None = None
    # Named sampler settings besides the scales' defaults, e.g. {"paper": {"steps": [100, 50],
    # "cfg_scale": [1.4, 1.0], "solver": ["euler", "euler"]}}: `msf sample --sampler paper`.
    samplers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def image_size(self) -> int:
        return self.scales[-1].image_size

    @property
    def image_sizes(self) -> list[int]:
        return [s.image_size for s in self.scales]

    @property
    def latent_sizes(self) -> list[int]:
        return [s.image_size // self.autoencoder.factor for s in self.scales]


@dataclass
class TrainConfig:
    scale: str = "all"  # "all", or one scale index: the scales train independently
    other_scales_from: str = ""  # model dir whose weights the scales this job does not train take
    steps: int = 1000  # optimizer steps per scale (see scale_steps)
    scale_steps: list[int] | None = None  # per-scale steps, overriding ``steps``
    batch_size: int = 64  # global batch: split evenly over the processes of a torchrun job
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # after warm-up: "constant" (DiT) or "cosine" to min_lr_ratio
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float = 0.9999
    class_dropout: float = 0.1  # label -> null class with this probability (CFG)
    time_sampler: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    precision: str = "auto"  # autocast dtype of the forward pass: auto (msf.precision), bf16 or fp32
    balance_classes: bool = True  # sample classes uniformly, not by frequency
    random_flip: bool = True  # mirror each image with probability 1/2 (DiT); off for text, digits, flags
    seed: int = 0
    log_every: int = 10
    data: str = "emoji"  # "emoji" (built-in), a .npz, or an image folder (one sub-folder per class)
    strict_data: bool = False  # stop at an unreadable image instead of skipping it
    num_workers: int | None = None  # data-loading processes for image folders; None: min(4, CPUs - 1)
    out_dir: str = "runs/msf"
    ckpt_every: int = 0  # steps between checkpoints; 0: only at the end (and on Ctrl-C)
    keep_last: int = 3  # checkpoints kept, newest first ...
    keep_every: int = 0  # ... plus every M-th step's, for good (0: none)
    ckpt_format: str = "full"  # "full": one .pt gathered to rank 0; "sharded": a DCP directory, per process
    on_nonfinite: str = "stop"  # a NaN/Inf loss: "stop" the run, or "skip" the step and count it
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    compile: bool = False  # torch.compile each scale's network
    deterministic: bool = False  # deterministic kernels only (GPU: bit-exact resume, some ops slower)
    fsdp: bool = False  # shard weights, grads and optimizer state over processes (large presets)
    tensorboard: bool = True  # scalars (and sample grids) under <out_dir>/tb, if installed
    wandb_project: str = ""  # also log to Weights & Biases under this project ("": off; pip install wandb)
    sample_every: int = 0  # steps between sample grids of the EMA model; 0: off
    # Levers beyond the paper, off by default: the paper's recipe trains as before.
    time_shift: list[float] | None = None  # per scale: training times moved towards the noise (SD3's shift)
    # or derived from each scale's size: "sd3" = sqrt(latent elements / time_shift_ref) (SD3's rule)
    time_shift_rule: str = "none"
    time_shift_ref: int = 4096  # elements where the rule gives 1: a 256-px SD-VAE latent, 32 x 32 x 4
    cosine_loss_weight: float = 0.0  # weight of a velocity-direction term, mean(1 - cos(v, e - c)), in eq. 5
    # REPA (msf.training.repa): align early tokens with a frozen timm encoder's patch features ("": off)
    repa_encoder: str = ""  # a local folder (timm's save_for_hf layout) or a hub id
    repa_weight: float = 0.5
    repa_depth: list[int] | None = None  # per scale: the block aligned (1-based; 0: none); None: a third
    repa_projector: int = 2048  # hidden width of the projection MLP
    eval_every: int = 0  # steps between quality checks of the EMA model (FID, KID); 0: off
    eval_samples: int = 500  # samples per quality check, class-balanced
    eval_ref: str = ""  # reference for them: .npz, folder or statistics file ("": train.data, built once)
    eval_metrics: str = "fid,kid"  # any of fid,kid,pr,cas

    def steps_for(self, k: int) -> int:
        return self.scale_steps[k] if self.scale_steps is not None else self.steps


@dataclass
class Config:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "custom"


# --------------------------------------------------------------------------- presets

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


def _paper_sampler(steps: list[int] | None = None) -> dict[str, dict[str, Any]]:
    """``model.samplers`` naming the paper's sampler: Euler on a uniform grid, guidance at every step,
    at the preset's step counts and guidance (one value for every scale, so a preset with other scales
    keeps it). A preset whose defaults move to a cheaper sampler adds its old steps and
    guidance here, so that ``--sampler paper`` still draws today's images."""
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
    """Two scales in pixel space on the built-in 32 x 32 emoji: 16 -> 32, minutes on a CPU.

    Sized for 2 CPU cores: 16 tokens per scale (patch 4), so that 1,500 steps take about 4 minutes
    (200 images/s on an AMD Zen 4). The paper's recipe at this size; ``demo-plus`` trains better.
    CFG 3.0 on the base: an undertrained base needs strong guidance to commit to its class; the
    residual runs without CFG, as in the paper.
    """
    model = ModelConfig(
        num_classes=len(EMOJI_CLASSES),
        scales=[
            # sampled with 2nd-order Adams-Bashforth on a shifted grid: level with the paper's 50 + 20
            # Euler steps at 1/5 of the evaluations (docs/sampler_map.md); --sampler paper for those
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
    """MSF's ImageNet 256 recipe (paper §4.1; docs/design.md §2).

    Scale 1: 192 px (24 x 24 latent, 144 tokens), DiT 18 x 1152, the paper's 435.9M.
    Scale 2: 256 px (32 x 32 latent, 256 tokens), DiT 10 x 1280 with the prior
    concatenated to its input: 302.0M. The paper's 331.2M is one 1280-wide block
    (29.5M) more than the 10 x 1280 its text describes; we build what the text says.
    Learning rate: DiT's 1e-4 at batch 256, scaled linearly to batch 2560 (Goyal et al.).
    """
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
    """Our 512 x 512 version of the paper's recipe (its version 2 reports FID 2.47 at 512).

    The paper gives no 512 sizes; we keep its 256 ratio, base = 3/4 of the image:
    384 px (48 x 48 latent, 576 tokens) and 512 px (64 x 64, 1024 tokens), with the
    same two networks (DiT-XL/2 is likewise unchanged from 256 to 512).
    """
    cfg = _paper_imagenet256()
    cfg.model.scales[0].image_size, cfg.model.scales[1].image_size = 384, 512
    cfg.preset, cfg.train.out_dir = "paper-imagenet512", "runs/paper-imagenet512"
    return cfg


def _paper_imagenet256_plus() -> Config:
    """``paper-imagenet256`` with the changes that helped MSF at equal training time on the built-in emoji
    (docs/levers.md; measured at the demo's size, not at ImageNet's): conditioning noise 0.2 on the
    residual's prior (ahead by 4 FID at a 16 px and a 24 px base, three seeds, paired), each component
    trained at unit variance (without it `demo` was behind by 10.6 FID, three seeds, paired) and times
    drawn logit-normally as in SD3 (uniform, the paper's, was behind by 7.8 FID, three seeds, paired). Not
    SwiGLU: level with `demo` alone at three seeds (+0.5 FID), and level on top of the recipe of
    `demo-plus` (+1.0, +7.0, -6.1 FID by seed). The networks are the paper's. Sampled as
    ``paper-imagenet256``: its guidance was not tuned for this recipe."""
    cfg = _paper_imagenet256()
    cfg.model.prior_noise = 0.2
    cfg.model.normalize = "std"
    cfg.train.time_sampler = "logit-normal"
    cfg.preset, cfg.train.out_dir = "paper-imagenet256-plus", "runs/paper-imagenet256-plus"
    return cfg


def _dit_xl2_plus() -> Config:
    """``dit-xl2`` with what helped the K = 1 DiT at equal training time on the built-in emoji
    (docs/levers.md; measured at the demo's size, not at ImageNet's): the cosine velocity term at weight
    0.1 with times drawn logit-normally, FasterDiT's pairing. With logit-normal times the term was ahead
    of ``dit-demo`` by 3.4 FID (three seeds, paired), and by 4.7 at ``dit-demo-plus``'s guidance; with
    the paper's uniform times it was level with uniform alone. Against the paper's uniform times the
    pair is level on FID (-5.9) and behind on class accuracy (-0.11, paired: scripts/paired.py) on
    emoji: the one trade-off. Not
    SwiGLU: level on FID, behind on class accuracy, and level again on top of the cosine term.
    ``paper-imagenet256-plus``'s counterpart: both train on logit-normal times."""
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
    """``demo`` with the recipe that won at equal training time on the built-in emoji, and `make demo`'s
    preset (docs/levers.md, recipe study: three seeds, paired): learning rate 4e-3 instead of 2e-3 (8e-3
    diverges) and conditioning noise 0.2 on the residual's prior (the sampler's prior is a generated
    base, not the true one the residual trains on). 1,800 steps: about 5 minutes on 2 CPU cores.
    Guidance 7 on the base instead of 3 (docs/guidance_demo: FID level, KID and class accuracy ahead,
    three seeds; 10 is behind on FID); ``--sampler paper`` keeps the paper's sampler and its 3."""
    cfg = _demo()
    cfg.train.lr = 4e-3
    cfg.model.prior_noise = 0.2
    cfg.model.scales[0].cfg_scale = 7.0
    cfg.model.samplers["paper"]["cfg_scale"] = [s.cfg_scale for s in _demo().model.scales]
    cfg.train.steps = 1800
    cfg.preset, cfg.train.out_dir = "demo-plus", "runs/demo-plus"
    return cfg


def _dit_demo_plus() -> Config:
    """``dit-demo`` with what was measured to help it (three seeds, paired): guidance 5 instead of 3
    (docs/guidance_demo: FID level, KID and class accuracy ahead; 7 is behind 5 on FID) and the cosine
    velocity term at weight 0.1 (docs/levers.md: ahead by 3.4 FID at guidance 3 and by 4.7 at 5, class
    accuracy level). lr 4e-3, which helped MSF, was level on the DiT; SwiGLU was level. ``demo-plus``'s
    counterpart, so that `msf compare --presets dit-demo-plus,demo-plus` gives each family its own best."""
    cfg = _dit_demo()
    cfg.train.cosine_loss_weight = 0.1
    cfg.model.scales[0].cfg_scale = 5.0
    cfg.model.samplers["paper"]["cfg_scale"] = [s.cfg_scale for s in _dit_demo().model.scales]
    cfg.preset, cfg.train.out_dir = "dit-demo-plus", "runs/dit-demo-plus"
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


# --------------------------------------------------------------------------- validation


def time_shifts(train: TrainConfig, model: ModelConfig) -> list[float] | None:
    """Each scale's training time shift: ``train.time_shift``, or SD3's rule, ``sqrt(d_k / d_ref)``
    for a scale of ``d_k`` latent elements (a larger signal keeps more of itself at a given noise
    level, so it needs its times moved towards the noise); None: no shift."""
    if train.time_shift_rule == "sd3":
        ch = model.autoencoder.channels
        return [math.sqrt(n * n * ch / train.time_shift_ref) for n in model.latent_sizes]
    return train.time_shift


def validate(cfg: Config) -> Config:
    """Check a config for consistency; raise :class:`ConfigError` naming the field."""
    m, t = cfg.model, cfg.train
    ae = m.autoencoder
    if m.num_classes < 1:
        raise ConfigError(f"model.num_classes must be >= 1, got {m.num_classes}")
    if not m.scales:
        raise ConfigError("model.scales: need at least one scale")
    sizes = m.image_sizes
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ConfigError(f"model.scales image sizes must be strictly increasing, got {sizes}")
    _choice("model.autoencoder.kind", ae.kind, ("identity", "sd-vae"))
    _choice("model.autoencoder.dtype", ae.dtype, ("fp32", "bf16"))
    if ae.factor < 1 or ae.channels < 1:
        raise ConfigError(
            f"model.autoencoder: factor and channels must be >= 1, got {ae.factor}, {ae.channels}"
        )
    for k, s in enumerate(m.scales):
        where = f"model.scales.{k}"
        if s.image_size % (ae.factor * s.patch_size):
            raise ConfigError(
                f"{where}.image_size={s.image_size} must be divisible by autoencoder factor x "
                f"patch size = {ae.factor} x {s.patch_size} = {ae.factor * s.patch_size}"
            )
        if s.depth < 1 or s.width < 1 or s.heads < 1 or s.patch_size < 1:
            raise ConfigError(f"{where}: depth, width, heads and patch_size must be >= 1")
        if s.width % s.heads:
            raise ConfigError(f"{where}.width={s.width} must be divisible by heads={s.heads}")
        if (s.width // s.heads) % 2:
            raise ConfigError(f"{where}: head dim width/heads must be even")
        if s.width % 4:
            raise ConfigError(f"{where}.width={s.width} must be divisible by 4 (2-D sin-cos)")
        _in_range(f"{where}.steps", s.steps, 1, INF, True, integer=True)
        _in_range(f"{where}.cfg_scale", s.cfg_scale, *CFG_RANGE, True, integer=False, hi_ok=True)
        _in_range(f"{where}.mlp_ratio", s.mlp_ratio, 0.0, INF, False, integer=False)
        if s.solver not in SOLVERS:
            raise ConfigError(f"{where}.solver must be one of {SOLVERS}, got {s.solver!r}")
        _choice(f"{where}.time_convention", s.time_convention, TIME_CONVENTIONS)
        if s.time_convention == "ddpm" and k > 0 and m.prior == "concat":
            raise ConfigError(f"{where}.time_convention='ddpm' (a converted DiT) is for a scale without a "
                              "prior: the base scale, or model.prior='none'")
        _choice(f"{where}.gelu", s.gelu, GELUS)
        _choice(f"{where}.norm", s.norm, NORMS)
        _choice(f"{where}.mlp", s.mlp, MLPS)
        _choice(f"{where}.pos_embed", s.pos_embed, POS_EMBEDS)
        if not isinstance(s.qk_norm, bool):
            raise ConfigError(f"{where}.qk_norm must be true or false, got {s.qk_norm!r}")
        if "rope" in s.pos_embed and (s.width // s.heads) % 4:
            raise ConfigError(f"{where}.pos_embed={s.pos_embed!r}: 2-D RoPE needs a head dim (width/heads) "
                              f"divisible by 4, got {s.width}/{s.heads} = {s.width // s.heads}")
        _in_range(f"{where}.shift", s.shift, 0.0, 100.0, False, integer=False, hi_ok=True)
        g = s.guidance_interval
        if not isinstance(g, (list, tuple)) or len(g) != 2 or not 0.0 <= g[0] <= g[1] <= 1.0:
            raise ConfigError(f"{where}.guidance_interval must be [a, b] with 0 <= a <= b <= 1 (times: "
                              f"0 data, 1 noise), got {g!r}")
    for name, given in m.samplers.items():
        if name == "default":
            raise ConfigError("model.samplers.default: 'default' names the scales' own settings; pick "
                              "another name")
        bad = [key for key in given if key not in SAMPLING_FIELDS]
        if bad:
            raise ConfigError(_unknown_key(f"model.samplers.{name}.{bad[0]}", bad[0], list(SAMPLING_FIELDS)))
        try:
            SamplerSettings.named(m, name)
        except ConfigError as e:
            raise ConfigError(f"model.samplers.{name}: {e}") from None
    _choice("model.base_mode", m.base_mode, BASE_MODES)
    _choice("model.prior", m.prior, PRIOR_MODES)
    _choice("model.normalize", m.normalize, NORMALIZE_MODES)
    if m.component_std is not None:
        if len(m.component_std) != m.num_scales or any(v <= 0 for v in m.component_std):
            raise ConfigError(
                f"model.component_std must hold {m.num_scales} positive values, "
                f"got {m.component_std}"
            )
    if m.class_names is not None and len(m.class_names) != m.num_classes:
        raise ConfigError(
            f"model.class_names has {len(m.class_names)} names for num_classes={m.num_classes}"
        )
    _in_range("model.prior_noise", m.prior_noise, 0.0, INF, True, integer=False)
    if t.scale != "all":
        try:
            k = int(t.scale)
        except ValueError:
            raise ConfigError(
                f"train.scale must be 'all' or a scale index, got {t.scale!r}"
            ) from None
        if not 0 <= k < m.num_scales:
            raise ConfigError(f"train.scale={k} is out of range for {m.num_scales} scales")
    if t.scale_steps is not None and len(t.scale_steps) != m.num_scales:
        raise ConfigError(
            f"train.scale_steps needs {m.num_scales} values (one per scale), got {t.scale_steps}"
        )
    if t.time_shift is not None:
        if not isinstance(t.time_shift, (list, tuple)) or len(t.time_shift) != m.num_scales:
            raise ConfigError(f"train.time_shift needs {m.num_scales} values (one per scale), got "
                              f"{t.time_shift}")
        for i, v in enumerate(t.time_shift):
            _in_range(f"train.time_shift[{i}]", v, 0.0, 100.0, False, integer=False, hi_ok=True)
    if t.repa_depth is not None:
        if len(t.repa_depth) != m.num_scales:
            raise ConfigError(f"train.repa_depth needs {m.num_scales} values (one per scale), "
                              f"got {t.repa_depth}")
        for i, (d, s) in enumerate(zip(t.repa_depth, m.scales)):
            _in_range(f"train.repa_depth[{i}]", d, 0, s.depth, True, integer=True, hi_ok=True)
    if t.repa_encoder and t.fsdp:
        raise ConfigError("train.repa_encoder: REPA does not run under train.fsdp yet (its projectors are "
                          "not sharded); use DDP (train.fsdp=false)")
    if t.repa_encoder and t.ckpt_format == "sharded":
        raise ConfigError("train.repa_encoder: REPA's projectors are saved in full checkpoints only; "
                          "set train.ckpt_format=full")
    _choice("train.time_shift_rule", t.time_shift_rule, ("none", "sd3"))
    if t.time_shift_rule != "none" and t.time_shift is not None:
        raise ConfigError(f"train.time_shift={t.time_shift} and train.time_shift_rule={t.time_shift_rule!r}: "
                          "set one of them")
    _choice("train.time_sampler", t.time_sampler, TIME_SAMPLERS)
    _choice("train.lr_schedule", t.lr_schedule, ("constant", "cosine"))
    _choice("train.on_nonfinite", t.on_nonfinite, ("stop", "skip"))
    _choice("train.ckpt_format", t.ckpt_format, ("full", "sharded"))
    _choice("train.precision", t.precision, PRECISIONS)
    _train_ranges(t)
    return cfg


INF = float("inf")
# (field, lowest, highest, is the lowest itself allowed); integers where the default is an integer
_TRAIN_RANGES = [
    ("lr", 0.0, INF, False), ("weight_decay", 0.0, INF, True), ("warmup_steps", 0, INF, True),
    ("min_lr_ratio", 0.0, 1.0, True), ("grad_clip", 0.0, INF, True), ("ema_decay", 0.0, 1.0, True),
    ("class_dropout", 0.0, 1.0, True), ("logit_mean", -INF, INF, True), ("logit_std", 0.0, INF, False),
    ("steps", 0, INF, True), ("batch_size", 1, INF, True), ("seed", 0, INF, True),
    ("log_every", 1, INF, True),
    ("ckpt_every", 0, INF, True), ("keep_last", 1, INF, True), ("keep_every", 0, INF, True),
    ("sample_every", 0, INF, True), ("eval_every", 0, INF, True), ("eval_samples", 2, INF, True),
    ("cosine_loss_weight", 0.0, INF, True), ("time_shift_ref", 1, INF, True), ("repa_weight", 0.0, INF, True),
    ("repa_projector", 1, INF, True),
]


def _in_range(name: str, value, lo: float, hi: float, lo_ok: bool, integer: bool,
              hi_ok: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value > lo or (lo_ok and value == lo)) \
        and (value < hi or (hi_ok and value == hi))
    if not ok:
        low = f"{'[' if lo_ok else '('}{lo:g}" if lo != -INF else "(-inf"
        high = f"{hi:g}{']' if hi_ok else ')'}" if hi != INF else "inf)"
        raise ConfigError(f"{name} must be {kind} in {low}, {high}, got {value!r}")


def _train_ranges(t: TrainConfig) -> None:
    """Every numeric train field within the range where it means something, with the range in the error."""
    for name, lo, hi, lo_ok in _TRAIN_RANGES:
        default = getattr(TrainConfig, name, None)
        _in_range(f"train.{name}", getattr(t, name), lo, hi, lo_ok, integer=isinstance(default, int),
                  hi_ok=name == "min_lr_ratio")
    if not isinstance(t.betas, (list, tuple)) or len(t.betas) != 2:
        raise ConfigError(f"train.betas must be two numbers [beta1, beta2] (AdamW), got {t.betas!r}")
    for i, b in enumerate(t.betas):
        _in_range(f"train.betas[{i}]", b, 0.0, 1.0, True, integer=False)
    for i, n in enumerate(t.scale_steps or []):
        _in_range(f"train.scale_steps[{i}]", n, 0, INF, True, integer=True)
    if t.num_workers is not None:
        _in_range("train.num_workers", t.num_workers, 0, INF, True, integer=True)
    if not str(t.out_dir).strip():
        raise ConfigError("train.out_dir must name a directory, got an empty string")
    bad = [m for m in str(t.eval_metrics).split(",") if m.strip() not in ("fid", "kid", "pr", "cas")]
    if bad or not str(t.eval_metrics).strip():
        raise ConfigError(f"train.eval_metrics={t.eval_metrics!r}: a comma-separated list of fid, kid, pr "
                          "and cas")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")


# --------------------------------------------------------------------------- (de)serialisation


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, checking keys and types."""
    return _coerce(cls, data, where or cls.__name__)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = [k for k in value if k not in fields]
        if unknown:
            raise ConfigError(_unknown_key(f"{where}.{unknown[0]}", unknown[0], list(fields)))
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = _coerce(hints[name], value[name], f"{where}.{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}.{name}: required field is missing")
        return tp(**kwargs)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: may not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is Any:
        return value
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        return {str(k): _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{where}.{i}") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


# Names DiT's, SiT's and diffusers' users type for the same setting: accepted in key=value overrides
KEY_ALIASES = {
    "learning_rate": "lr", "base_lr": "lr", "max_steps": "steps", "max_train_steps": "steps",
    "num_steps": "steps", "iterations": "steps", "global_batch_size": "batch_size", "global_seed": "seed",
    "results_dir": "out_dir", "output_dir": "out_dir", "data_path": "data", "data_dir": "data",
    "train_data_dir": "data", "checkpointing_steps": "ckpt_every", "ckpt_every_steps": "ckpt_every",
    "lr_warmup_steps": "warmup_steps", "lr_scheduler": "lr_schedule", "max_grad_norm": "grad_clip",
    "class_dropout_prob": "class_dropout", "ema_rate": "ema_decay", "adam_weight_decay": "weight_decay",
    "hidden_size": "width", "num_heads": "heads", "guidance_scale": "cfg_scale",
    "num_sampling_steps": "steps", "num_inference_steps": "steps",
}
# Names close in meaning but not the same setting: suggested, with the difference, never accepted
KEY_MEANINGS = {
    "epochs": ("steps", "msf counts optimizer steps, not epochs"),
    "num_epochs": ("steps", "msf counts optimizer steps, not epochs"),
    "batch": ("batch_size", "the global batch, over all processes"),
    "train_batch_size": ("batch_size", "msf's is the global batch, over all processes, not per device"),
    "mixed_precision": ("precision", "auto, bf16 or fp32"),
    "wd": ("weight_decay", ""), "ema": ("ema_decay", ""), "warmup": ("warmup_steps", ""),
    "clip": ("grad_clip", ""), "dropout": ("class_dropout", "the label dropout for guidance"),
}


def _unknown_key(where: str, key: str, valid: list[str]) -> str:
    meant = KEY_MEANINGS.get(key, (None, ""))
    near = [meant[0]] if meant[0] in valid else difflib.get_close_matches(key, valid, n=1)
    why = f" ({meant[1]})" if near and near[0] == meant[0] and meant[1] else ""
    hint = f"; did you mean {near[0]!r}{why}?" if near else "."
    return f"unknown config key {where!r}{hint} Valid keys here: {', '.join(valid)}"


def config_to_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2)


def config_from_json(text: str, source: str = "config") -> Config:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: not valid JSON ({e})") from None
    return validate(from_dict(Config, data, "config"))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` overrides (dotted paths, list indices: ``model.scales.0.depth=4``;
    ``*`` for every element: ``model.scales.*.qk_norm=true``). The names DiT's and diffusers' users
    type for the same setting are accepted (:data:`KEY_ALIASES`: ``train.learning_rate`` is ``train.lr``).

    Values are parsed as JSON where possible (numbers, lists, true/false/null),
    else taken as strings. The result is validated.
    """
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        _set(data, key.strip().split("."), 0, value)
    return validate(from_dict(Config, data, "config"))


def _set(node: Any, parts: list[str], i: int, value: Any) -> None:
    p, last, path = parts[i], i == len(parts) - 1, ".".join(parts[: i + 1])
    if isinstance(node, list):
        if p == "*":
            keys: list = list(range(len(node)))
        elif p.isdigit() and int(p) < len(node):
            keys = [int(p)]
        else:
            raise ConfigError(f"{path}: index must be 0..{len(node) - 1} or *")
    elif isinstance(node, dict):
        if p not in node and KEY_ALIASES.get(p) in node:
            p = KEY_ALIASES[p]
        if p not in node:
            raise ConfigError(_unknown_key(path, p, list(node)))
        keys = [p]
    else:
        raise ConfigError(f"{path}: {'.'.join(parts[:i])} has no sub-keys")
    for key in keys:
        if last:
            node[key] = copy.deepcopy(value)
        else:
            _set(node[key], parts, i + 1, value)
