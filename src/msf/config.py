"""Typed configs, ``key=value`` overrides, validation. The named presets are in :mod:`msf.presets`.

A :class:`Config` has two parts: ``model`` (everything needed to rebuild and sample
a pipeline; saved as ``config.json`` in every model directory) and ``train`` (the
recipe). Every field is declared with :func:`msf.fields.setting`, which says in one place what
validation, resuming and ``msf compare`` need to know of it; the lists they use derive from it.

Time convention (one, everywhere): ``t = 0`` is data, ``t = 1`` is noise,
``x_t = (1 - t) * c + t * e`` and the networks predict the velocity ``e - c``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msf.fields import (  # re-exported: from_dict and to_dict
    ConfigError,
    check_declarations,
    check_fields,
    fields_where,
    from_dict,
    in_range,
    setting,
    to_dict,
    unknown_key,
)
from msf.method.sampler import CFG_RANGE, FLOW_SOLVERS, MEANFLOW_STEPS, SOLVERS, SamplerSettings
from msf.method.sampler import evaluations as evaluations  # re-exported: a scale's sampling cost

BASE_MODES = ("image", "latent")
PRIOR_MODES = ("concat", "none")
NORMALIZE_MODES = ("none", "std")
TIME_SAMPLERS = ("uniform", "logit-normal")
# training: autocast dtype of the forward pass; "auto": bf16 where the hardware has it (msf.precision)
PRECISIONS = ("auto", "bf16", "fp32")
# sampling adds bf16 weight copies (msf.speed.inference_copy) to the autocast choices
SAMPLING_PRECISIONS = ("auto", "fp32", "bf16", "bf16-weights")
FEATURE_PRECISIONS = ("fp32", "bf16", "auto")  # the Inception network's; fp32 is the reference
TIME_CONVENTIONS = ("msf", "sit", "ddpm")  # how a scale's weights read time (models, convert)
GELUS = ("exact", "tanh")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POS_EMBEDS = ("sincos", "rope", "sincos+rope")
OBJECTIVES = ("flow", "meanflow")
EVAL_METRICS = ("fid", "kid", "pr", "cas")


@dataclass
class AutoencoderConfig:
    kind: str = setting("identity", choices=("identity", "sd-vae"))  # sd-vae: diffusers AutoencoderKL
    path: str | None = setting(None)  # local folder or hub id, for kinds that load weights
    channels: int = setting(3, "[1, inf)")
    factor: int = setting(1, "[1, inf)")  # spatial downsampling factor f
    scaling_factor: float = setting(1.0)  # checked against the VAE's own config when it loads
    sample_posterior: bool = setting(False)  # encode with a posterior sample instead of its mean
    dtype: str = setting("fp32", choices=("fp32", "bf16"))  # the precision the autoencoder runs in


@dataclass
class ScaleConfig:
    """One scale: its network, and the sampler defaults it is drawn with."""

    image_size: int = setting(within="[1, inf)")  # s_k; the latent size is image_size // autoencoder.factor
    depth: int = setting(within="[1, inf)")
    width: int = setting(within="[1, inf)")
    heads: int = setting(within="[1, inf)")
    patch_size: int = setting(2, "[1, inf)")
    mlp_ratio: float = setting(4.0, "(0, inf)")
    # Sampler defaults for this scale (overridable per call).
    steps: int = setting(50, "[1, inf)", sampling=True)  # network evaluations per CFG branch
    cfg_scale: float = setting(1.0, CFG_RANGE, sampling=True)
    solver: str = setting("euler", choices=SOLVERS, sampling=True)
    # time grid: 1 uniform (the paper's); > 1 more steps near the noise
    shift: float = setting(1.0, "(0, 100]", sampling=True)
    guidance_interval: list[float] = setting([0.0, 1.0], sampling=True)  # guide only at t in [a, b]
    # std of the noise on the generated prior, told to the network (0..model.prior_aug_max; 0: the clean
    # prior): a level to sweep like guidance, 0 until measured, the only value valid without augmentation
    prior_level: float = setting(0.0, "[0, inf)", sampling=True)
    # For weights imported from SiT or DiT (msf.interfaces.convert): "sit" feeds the network 1 - t and
    # negates its output; "ddpm" runs DiT's noise prediction at DDPM timesteps (models.ddpm_inputs).
    # Either way the network still gives msf's velocity at t.
    time_convention: str = setting("msf", choices=TIME_CONVENTIONS)
    gelu: str = setting("exact", choices=GELUS)  # "tanh": the approximation DiT and SiT trained with
    # Later DiT-family network options (msf.method.models); the defaults are the paper's DiT.
    qk_norm: bool = setting(False)  # RMSNorm on each head's queries and keys
    norm: str = setting("layernorm", choices=NORMS)
    mlp: str = setting("gelu", choices=MLPS)  # swiglu: hidden width 2/3 of mlp_ratio x width
    pos_embed: str = setting("sincos", choices=POS_EMBEDS)  # rope: 2-D rotary
    # what the network learns: rectified flow's velocity (eq. 5), or MeanFlow's average velocity over
    # [r, t] (msf.method.meanflow), sampled in 1-4 steps with solver "meanflow" at cfg_scale 1
    objective: str = setting("flow", choices=OBJECTIVES)


@dataclass
class ModelConfig:
    """Everything needed to rebuild and sample a pipeline; a model directory's ``config.json``."""

    num_classes: int = setting(within="[1, inf)")
    scales: list[ScaleConfig] = setting()
    autoencoder: AutoencoderConfig = setting(AutoencoderConfig())
    base_mode: str = setting("image", choices=BASE_MODES)  # c_0 = E(resize_image(x, s_0)) or down(z, n_0)
    prior: str = setting("concat", choices=PRIOR_MODES)  # how scale k > 0 sees its prior
    # conditioning augmentation: std of noise added to priors
    prior_noise: float = setting(0.0, "[0, inf)", cost=False)
    # conditioning augmentation with its level told (Ho et al. 2022; design.md): in training the prior is
    # noised at a level s ~ U[0, prior_aug_max] per sample and each residual network embeds s; sampling
    # noises the generated prior at model.scales.k.prior_level. Cost: one more embedder per residual scale
    prior_aug_max: float = setting(0.0, "[0, inf)")
    normalize: str = setting("none", choices=NORMALIZE_MODES, cost=False)  # std: components at unit variance
    # per-scale std, measured on data ("std")
    component_std: list[float] | None = setting(None, "(0, inf)", per_scale=True, cost=False)
    class_names: list[str] | None = setting(None, cost=False)
    # Named sampler settings besides the scales' defaults, e.g. {"paper": {"steps": [100, 50],
    # "cfg_scale": [1.4, 1.0], "solver": ["euler", "euler"]}}: `msf sample --sampler paper`.
    samplers: dict[str, dict[str, Any]] = setting({}, cost=False)

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
    """The recipe. ``resume=True``: a ``--resume`` may change it; ``cost=False``: it leaves a step's work
    as it is (:func:`msf.fields.setting`)."""

    scale: str = setting("all")  # "all", or one scale index: the scales train independently
    other_scales_from: str = setting("")  # model dir whose weights the scales this job does not train take
    # the weights a fresh run starts from ("": seeded at random): a model or run directory, a checkpoint, a
    # shipped name or hub id (its EMA weights); a scale made meanflow from a flow one starts as that flow
    # network (msf.training.checkpoint.take_initial_weights). nanoGPT's name for it, which says what it does;
    # `pretrained` (DMF's, timm's) and diffusers' `pretrained_model_name_or_path` are accepted for it
    init_from: str = setting("", resume=True, cost=False)
    steps: int = setting(1000, "[0, inf)", resume=True, cost=False)  # optimizer steps per scale
    scale_steps: list[int] | None = setting(None, "[0, inf)", per_scale=True, resume=True)  # overrides steps
    batch_size: int = setting(64, "[1, inf)")  # global batch: split evenly over the processes
    lr: float = setting(1e-4, "(0, inf)", cost=False)
    weight_decay: float = setting(0.0, "[0, inf)", cost=False)
    betas: list[float] = setting([0.9, 0.999], "[0, 1)", cost=False)
    warmup_steps: int = setting(0, "[0, inf)", cost=False)
    # after warm-up: "constant" (DiT) or "cosine" to min_lr_ratio
    lr_schedule: str = setting("constant", choices=("constant", "cosine"), cost=False)
    min_lr_ratio: float = setting(0.0, "[0, 1]", cost=False)
    grad_clip: float = setting(1.0, "[0, inf)")  # max global grad norm; 0 disables
    ema_decay: float = setting(0.9999, "[0, 1)", cost=False)
    class_dropout: float = setting(0.1, "[0, 1)", cost=False)  # label -> null class with this probability
    time_sampler: str = setting("uniform", choices=TIME_SAMPLERS, cost=False)
    logit_mean: float = setting(0.0, "(-inf, inf)", cost=False)
    logit_std: float = setting(1.0, "(0, inf)", cost=False)
    precision: str = setting("auto", choices=PRECISIONS)  # autocast dtype of the forward pass (msf.precision)
    balance_classes: bool = setting(True)  # sample classes uniformly, not by frequency
    random_flip: bool = setting(True, cost=False)  # mirror with probability 1/2 (DiT); off for text, digits
    seed: int = setting(0, "[0, inf)", cost=False)
    log_every: int = setting(10, "[1, inf)", resume=True, cost=False)
    # "emoji" (built-in), a .npz, or an image folder (one sub-folder per class)
    data: str = setting("emoji", resume=True)
    strict_data: bool = setting(False, resume=True)  # stop at an unreadable image instead of skipping it
    # data-loading processes for image folders; None: min(4, CPUs - 1)
    num_workers: int | None = setting(None, "[0, inf)", resume=True)
    # latent models: "auto" encodes image data once into a cache under $MSF_CACHE_DIR and trains from it,
    # "off" encodes every batch, or a folder for the cache (msf.training.latent_cache.training_cache).
    # resume: only where the latents come from (train.data may switch to a cache too); cost: a cache
    # takes the autoencoder's forward out of every step
    latent_cache: str = setting("auto", resume=True, cost=True)
    out_dir: str = setting("runs/msf", resume=True, cost=False)
    ckpt_every: int = setting(0, "[0, inf)", resume=True)  # steps between checkpoints; 0: only at the end
    keep_last: int = setting(3, "[1, inf)", resume=True)  # checkpoints kept, newest first ...
    keep_every: int = setting(0, "[0, inf)", resume=True)  # ... plus every M-th step's, for good (0: none)
    # "full": one .pt gathered to rank 0; "sharded": a DCP directory, per process
    ckpt_format: str = setting("full", choices=("full", "sharded"), resume=True)
    # a NaN/Inf loss: "stop" the run, or "skip" the step and count it
    on_nonfinite: str = setting("stop", choices=("stop", "skip"), resume=True)
    grad_checkpointing: bool = setting(False, resume=True)  # recompute activations in backward: less memory
    compile: bool = setting(False, resume=True)  # torch.compile each scale's network
    deterministic: bool = setting(False, resume=True)  # deterministic kernels only (GPU: bit-exact resume)
    fsdp: bool = setting(False, resume=True)  # shard weights, grads and optimizer state over processes
    tensorboard: bool = setting(True, resume=True)  # scalars and sample grids under <out_dir>/tb
    wandb_project: str = setting("", resume=True)  # also log to Weights & Biases under this project ("": off)
    sample_every: int = setting(0, "[0, inf)", resume=True)  # steps between sample grids (EMA); 0: off
    # Levers beyond the paper, off by default: the paper's recipe trains as before.
    # per scale: training times moved towards the noise (SD3's shift)
    time_shift: list[float] | None = setting(None, "(0, 100]", per_scale=True, cost=False)
    # or derived from each scale's size: "sd3" = sqrt(latent elements / time_shift_ref) (SD3's rule)
    time_shift_rule: str = setting("none", choices=("none", "sd3"), cost=False)
    time_shift_ref: int = setting(4096, "[1, inf)", cost=False)  # the rule's 1: a 256-px SD-VAE latent
    # weight of a velocity-direction term, mean(1 - cos(v, e - c)), in eq. 5
    cosine_loss_weight: float = setting(0.0, "[0, inf)", cost=False)
    # MeanFlow scales (model.scales.k.objective=meanflow): the share of (r, t) pairs with r = t (plain
    # flow matching), the power p of the adaptive weight 1 / (|error|^2 + 1e-3)^p, and per scale the
    # guidance w trained into the network (None: 1; w != 1 adds an unconditional forward per step)
    meanflow_flow_share: float = setting(0.75, "[0, 1]", cost=False)
    meanflow_weight_power: float = setting(1.0, "[0, inf)", cost=False)
    meanflow_guidance: list[float] | None = setting(None, CFG_RANGE, per_scale=True)
    # REPA (msf.training.repa): align early tokens with a frozen timm encoder's patch features ("": off)
    repa_encoder: str = setting("")  # a local folder (timm's save_for_hf layout) or a hub id
    repa_weight: float = setting(0.5, "[0, inf)")
    # per scale: the block aligned (1-based; 0: none); None: a third of each network's depth
    repa_depth: list[int] | None = setting(None, per_scale=True)
    repa_projector: int = setting(2048, "[1, inf)")  # hidden width of the projection MLP
    eval_every: int = setting(0, "[0, inf)", resume=True)  # steps between quality checks (FID, KID); 0: off
    eval_samples: int = setting(500, "[2, inf)", resume=True)  # samples per quality check, class-balanced
    # reference for them: .npz, folder or statistics file ("": train.data, built once)
    eval_ref: str = setting("", resume=True)
    eval_metrics: str = setting("fid,kid", resume=True)  # any of fid,kid,pr,cas

    def steps_for(self, k: int) -> int:
        return self.scale_steps[k] if self.scale_steps is not None else self.steps


@dataclass
class Config:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "custom"


for _cls in (AutoencoderConfig, ScaleConfig, ModelConfig, TrainConfig):
    check_declarations(_cls)
SAMPLING_FIELDS = fields_where(ScaleConfig, "sampling")  # a scale's sampler defaults (SamplerSettings')
RESUMABLE_FIELDS = fields_where(TrainConfig, "resume")  # train fields a --resume may change
# fields that leave the work of a training step as it is: msf compare pools such presets' step rates
COST_FREE_TRAIN = fields_where(TrainConfig, "cost", False)
COST_FREE_MODEL = fields_where(ModelConfig, "cost", False)


def time_shifts(train: TrainConfig, model: ModelConfig) -> list[float] | None:
    """Each scale's training time shift: ``train.time_shift``, or SD3's rule, ``sqrt(d_k / d_ref)``
    for a scale of ``d_k`` latent elements (a larger signal keeps more of itself at a given noise
    level, so it needs its times moved towards the noise); None: no shift."""
    if train.time_shift_rule == "sd3":
        ch = model.autoencoder.channels
        return [math.sqrt(n * n * ch / train.time_shift_ref) for n in model.latent_sizes]
    return train.time_shift


# --------------------------------------------------------------------------- validation


def validate(cfg: Config) -> Config:
    """Check a config for consistency; raise :class:`ConfigError` naming the field."""
    m, t = cfg.model, cfg.train
    if not m.scales:
        raise ConfigError("model.scales: need at least one scale")
    check_fields(m.autoencoder, "model.autoencoder")
    for k, s in enumerate(m.scales):
        check_fields(s, f"model.scales.{k}")
    check_fields(m, "model", m.num_scales)
    check_fields(t, "train", m.num_scales)
    _check_scales(m)
    _check_prior_augmentation(m)
    _check_samplers(m)
    _check_train(t, m)
    return cfg


def _check_scales(m: ModelConfig) -> None:
    """What one field's declaration cannot say: sizes, patches and heads that fit together."""
    sizes, ae = m.image_sizes, m.autoencoder
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ConfigError(f"model.scales image sizes must be strictly increasing, got {sizes}")
    for k, s in enumerate(m.scales):
        where, head_dim = f"model.scales.{k}", s.width // s.heads
        if s.image_size % (ae.factor * s.patch_size):
            raise ConfigError(
                f"{where}.image_size={s.image_size} must be divisible by autoencoder factor x "
                f"patch size = {ae.factor} x {s.patch_size} = {ae.factor * s.patch_size}"
            )
        if s.width % s.heads:
            raise ConfigError(f"{where}.width={s.width} must be divisible by heads={s.heads}")
        if head_dim % 2:
            raise ConfigError(f"{where}: head dim width/heads must be even")
        if s.width % 4:
            raise ConfigError(f"{where}.width={s.width} must be divisible by 4 (2-D sin-cos)")
        if "rope" in s.pos_embed and head_dim % 4:
            raise ConfigError(f"{where}.pos_embed={s.pos_embed!r}: 2-D RoPE needs a head dim (width/heads) "
                              f"divisible by 4, got {s.width}/{s.heads} = {head_dim}")
        if s.time_convention == "ddpm" and k > 0 and m.prior == "concat":
            raise ConfigError(f"{where}.time_convention='ddpm' (a converted DiT) is for a scale without a "
                              "prior: the base scale, or model.prior='none'")
        _check_objective(s, where)
        g = s.guidance_interval
        if len(g) != 2 or not 0.0 <= g[0] <= g[1] <= 1.0:
            raise ConfigError(f"{where}.guidance_interval must be [a, b] with 0 <= a <= b <= 1 (times: "
                              f"0 data, 1 noise), got {g!r}")


def _check_objective(s: ScaleConfig, where: str) -> None:
    """A scale's sampler defaults against what its network predicts (a velocity, or a mean velocity)."""
    lo, hi = MEANFLOW_STEPS
    if s.objective == "flow" and s.solver == "meanflow":
        raise ConfigError(f"{where}.solver='meanflow' is for a scale with objective=meanflow; this scale's "
                          f"network predicts the velocity: pick one of {FLOW_SOLVERS}")
    if s.objective == "meanflow" and (s.solver != "meanflow" or not lo <= s.steps <= hi or s.cfg_scale != 1):
        raise ConfigError(f"{where}.objective='meanflow' samples in {lo} to {hi} jumps of its own solver at "
                          "cfg_scale 1 (its guidance is trained in: train.meanflow_guidance): set "
                          f"{where}.solver=meanflow, {where}.steps={lo}..{hi} and {where}.cfg_scale=1 (now "
                          f"{s.solver!r}, {s.steps}, {s.cfg_scale:g})")
    if s.objective == "meanflow" and s.time_convention != "msf":
        raise ConfigError(f"{where}.objective='meanflow' trains msf's own network: time_convention must be "
                          f"'msf', got {s.time_convention!r}")


def _check_prior_augmentation(m: ModelConfig) -> None:
    """``prior_aug_max`` against the other ways a prior is seen; each scale's ``prior_level`` within it."""
    if m.prior_aug_max > 0:
        if m.prior_noise > 0:
            raise ConfigError(f"model.prior_noise={m.prior_noise:g} and model.prior_aug_max="
                              f"{m.prior_aug_max:g}: set one of them (prior_noise: one fixed level the "
                              "network is not told; prior_aug_max: a random level it is told), e.g. "
                              "model.prior_noise=0")
        if m.prior == "none" or m.num_scales == 1:
            raise ConfigError(f"model.prior_aug_max={m.prior_aug_max:g}: no scale sees a prior to augment "
                              f"(model.prior={m.prior!r}, {m.num_scales} scale(s)); set it to 0")
        for k, s in enumerate(m.scales[1:], 1):
            if s.time_convention != "msf":
                raise ConfigError(f"model.prior_aug_max: scale {k} is a converted network "
                                  f"(time_convention={s.time_convention!r}) with no level input; set it to 0")
    for k, s in enumerate(m.scales):
        top = 0.0 if k == 0 or m.prior == "none" else m.prior_aug_max
        if s.prior_level > top:
            why = "scale 0 has no prior" if k == 0 else f"model.prior_aug_max={m.prior_aug_max:g}"
            raise ConfigError(f"model.scales.{k}.prior_level={s.prior_level:g} must be in [0, {top:g}]: "
                              f"the levels its network was trained with ({why})")


def _check_samplers(m: ModelConfig) -> None:
    """``model.samplers``: named settings of the sampler fields only, each valid for this model."""
    for name, given in m.samplers.items():
        if name == "default":
            raise ConfigError("model.samplers.default: 'default' names the scales' own settings; pick "
                              "another name")
        bad = [key for key in given if key not in SAMPLING_FIELDS]
        if bad:
            raise ConfigError(unknown_key(f"model.samplers.{name}.{bad[0]}", bad[0], list(SAMPLING_FIELDS)))
        try:
            SamplerSettings.named(m, name)
        except ConfigError as e:
            raise ConfigError(f"model.samplers.{name}: {e}") from None
    if m.class_names is not None and len(m.class_names) != m.num_classes:
        raise ConfigError(f"model.class_names has {len(m.class_names)} names for num_classes={m.num_classes}")


def _check_train(t: TrainConfig, m: ModelConfig) -> None:
    """The train fields that depend on each other or on the model."""
    if t.scale != "all":
        try:
            k = int(t.scale)
        except ValueError:
            raise ConfigError(f"train.scale must be 'all' or a scale index, got {t.scale!r}") from None
        if not 0 <= k < m.num_scales:
            raise ConfigError(f"train.scale={k} is out of range for {m.num_scales} scales")
    for i, (d, s) in enumerate(zip(t.repa_depth or [], m.scales)):
        in_range(f"train.repa_depth[{i}]", d, (0, s.depth, True, True), integer=True)
    if t.repa_encoder and t.fsdp:
        raise ConfigError("train.repa_encoder: REPA does not run under train.fsdp yet (its projectors are "
                          "not sharded); use DDP (train.fsdp=false)")
    if t.repa_encoder and t.ckpt_format == "sharded":
        raise ConfigError("train.repa_encoder: REPA's projectors are saved in full checkpoints only; "
                          "set train.ckpt_format=full")
    for k, (w, s) in enumerate(zip(t.meanflow_guidance or [], m.scales)):
        if w != 1 and s.objective != "meanflow":
            raise ConfigError(f"train.meanflow_guidance[{k}]={w:g}: scale {k} trains rectified flow, guided "
                              f"when sampled (model.scales.{k}.cfg_scale); set 1 for it")
        if w != 1 and t.class_dropout == 0:
            raise ConfigError(f"train.meanflow_guidance[{k}]={w:g} needs the unconditional branch it guides "
                              "with: set train.class_dropout > 0")
    if t.time_shift_rule != "none" and t.time_shift is not None:
        raise ConfigError(f"train.time_shift={t.time_shift} and train.time_shift_rule={t.time_shift_rule!r}: "
                          "set one of them")
    if len(t.betas) != 2:
        raise ConfigError(f"train.betas must be two numbers [beta1, beta2] (AdamW), got {t.betas!r}")
    if not str(t.latent_cache).strip():
        raise ConfigError("train.latent_cache must be auto, off or a folder, got an empty string")
    if not str(t.out_dir).strip():
        raise ConfigError("train.out_dir must name a directory, got an empty string")
    bad = [name for name in str(t.eval_metrics).split(",") if name.strip() not in EVAL_METRICS]
    if bad or not str(t.eval_metrics).strip():
        raise ConfigError(f"train.eval_metrics={t.eval_metrics!r}: a comma-separated list of fid, kid, pr "
                          "and cas")
    src = Path(t.init_from).expanduser().resolve()
    if t.init_from and Path(t.out_dir).resolve() in (src, *src.parents):
        raise ConfigError(f"train.init_from={t.init_from} lies in train.out_dir={t.out_dir}: the run would "
                          "write over the model it starts from (--overwrite: delete it); pick another one")


# --------------------------------------------------------------------------- (de)serialisation


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
    "pretrained": "init_from", "pretrained_model_name_or_path": "init_from",
}
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
    out = from_dict(type(cfg), data, "config")  # a Config, or another config class (the autoencoder's)
    return validate(out) if isinstance(out, Config) else out


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
            raise ConfigError(unknown_key(path, p, list(node)))
        keys = [p]
    else:
        raise ConfigError(f"{path}: {'.'.join(parts[:i])} has no sub-keys")
    for key in keys:
        if last:
            node[key] = copy.deepcopy(value)
        else:
            _set(node[key], parts, i + 1, value)
