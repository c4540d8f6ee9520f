"""Import DiT and SiT checkpoints as msf K = 1 model directories.

facebookresearch/DiT and willisma/SiT train one and the same network, the DiT msf's
:mod:`msf.method.models` rebuilds; a checkpoint of either is a state dict in the reference layout.
:func:`convert_checkpoint` reads one and writes the model directory
:meth:`msf.method.pipeline.MSFPipeline.save_pretrained` writes (``config.json`` + ``scale_0.safetensors``),
so that ``msf sample``, ``msf eval`` and ``msf sweep`` run the paper's baseline.

The keys, reference -> msf:

* ``x_embedder.proj.{weight,bias}`` -> ``x_embedder.{weight,bias}`` (timm's ``PatchEmbed`` wraps the
  convolution msf holds directly);
* ``pos_embed`` (1, T, D) -> dropped: msf computes the same fixed 2-D sin-cos table, checked equal;
* ``t_embedder.mlp.{0,2}.*``, ``y_embedder.embedding_table.weight`` (classes + the null class),
  ``blocks.N.attn.{qkv,proj}.*``, ``blocks.N.mlp.{fc1,fc2}.*``, ``blocks.N.adaLN_modulation.1.*``,
  ``final_layer.linear.*``, ``final_layer.adaLN_modulation.1.*`` -> the same names;
* with learned sigma, ``final_layer.linear`` has 2C output channels per patch pixel: the rows of
  the last C (the variance) are dropped (``learned_sigma="drop"``) or the file refused (``"refuse"``):
  msf's samplers integrate an ODE, which needs no variance.

Depth, width, patch, MLP ratio, classes and input size come from the shapes (input size from
``pos_embed``'s token count); heads, which no shape shows, from DiT's and SiT's model table by
width (S 384/6, B 768/12, L 1024/16, XL 1152/16) unless given. The image size is the input size
times 8 (the SD VAE); every tensor is checked against the network those sizes describe.

What the outputs mean:

* **SiT** (linear interpolant, velocity prediction: its default and the released SiT-XL/2) is msf's
  rectified flow with time reversed: ``x_s = s * data + (1 - s) * noise`` at SiT time ``s``
  (0 = noise), fed to the time embedding as is (not times 1000), and the network predicts
  ``data - noise``. So msf's velocity at ``t`` is minus SiT's output at ``s = 1 - t``: exact, and
  what :class:`SiTNetwork` computes (``time_convention="sit"`` in the scale's config); with
  ``gelu="tanh"``, the GELU approximation it was trained with, the network is SiT's to float
  rounding. SiT never trains its learned-sigma channels (its forward drops them), so dropping
  them changes nothing.
* **DiT** is a 1000-step DDPM (linear betas) that predicts the noise epsilon (and a variance) at
  integer timesteps, its time embedding fed the timestep as is. Its path is msf's rescaled: at msf's
  ``t`` the DDPM state is msf's ``x`` divided by ``sqrt((1 - t)^2 + t^2)``, at the timestep of the
  same signal-to-noise ratio, and its noise prediction gives msf's velocity ``e - x0``
  (:class:`DDPMNetwork`, ``time_convention="ddpm"``; :func:`ddpm_inputs`). msf's Euler sampler then takes
  DDIM's (eta = 0) steps, exactly where the grid's times fall on DiT's integer timesteps, with the
  timestep interpolated in log-SNR between them elsewhere. Two approximations remain, both at the
  ends: the last timestep (999) is not pure noise, so at ``t = 1`` the network runs at timestep 999
  (as DiT's own samplers start there from pure noise); and DiT's published FIDs come from its
  250-step ancestral DDPM sampler with the learned variances, which msf does not have (it samples
  the same model's probability-flow ODE, as DiT's DDIM does).

Only tensors are read: ``torch.load(weights_only=True)`` (``argparse.Namespace`` allowed, for the
``args`` that DiT's and SiT's training checkpoints hold) or safetensors.

The two subclasses of :class:`msf.method.models.DiT` that read converted weights in msf's time are
here, with :func:`network_class`, which the pipeline asks for each scale's ``time_convention``; the
network itself computes in msf's time only.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from msf.config import SAMPLING_FIELDS, Config, ModelConfig, ScaleConfig, validate
from msf.method.model_dir import save_model_dir
from msf.method.models import DiT, sincos_pos_embed_2d
from msf.presets import SD_VAE, preset

KINDS = ("auto", "dit", "sit")
LEARNED_SIGMA = ("drop", "refuse")
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}  # DiT / SiT S, B, L, XL (models.py)
VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


class ConversionError(ValueError):
    """A file that is not a DiT or SiT checkpoint msf can convert; the message names it and why."""


# DiT's DDPM: 1000 timesteps, betas linear from 1e-4 to 0.02 (diffusion/gaussian_diffusion.py).
DDPM_STEPS = 1000
_DDPM_ALPHA_BAR = torch.cumprod(1 - torch.linspace(1e-4, 0.02, DDPM_STEPS, dtype=torch.float64), 0)
_DDPM_LOG_SNR = (_DDPM_ALPHA_BAR / (1 - _DDPM_ALPHA_BAR)).log()  # falls with the timestep
# msf's flow time of DiT's last timestep: beyond it (only t = 1) the network is run there, as DiT
# starts its own chain at timestep 999 from pure noise.
DDPM_T_MAX = float(1 / (1 + (_DDPM_ALPHA_BAR[-1] / (1 - _DDPM_ALPHA_BAR[-1])).sqrt()))


class SiTNetwork(DiT):
    """A DiT trained by SiT, in msf's time: SiT's time ``s = 1 - t`` (0 is noise) goes into the time
    embedding unscaled, and minus its output (SiT predicts data - noise) is msf's velocity."""

    time_scale = 1.0

    def forward(self, x: Tensor, t: Tensor, y: Tensor, prior: Tensor | None = None,
                tokens_at: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
        out = super().forward(x, 1 - t, y, prior, tokens_at)
        return -out if tokens_at is None else (-out[0], out[1])


class DDPMNetwork(DiT):
    """A DiT trained as DiT's 1000-step DDPM, in msf's time: run on msf's state rescaled, at the DDPM
    timestep of the same signal-to-noise ratio (:func:`ddpm_inputs`); its noise prediction gives msf's
    velocity. For a scale without a prior (a converted DiT is one scale)."""

    time_scale = 1.0

    def __init__(self, scale: ScaleConfig, input_size: int, channels: int, num_classes: int,
                 prior_channels: int = 0):
        if prior_channels:
            raise ValueError("time_convention 'ddpm' (a converted DiT) is for a scale without a prior")
        super().__init__(scale, input_size, channels, num_classes)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, prior: Tensor | None = None,
                tokens_at: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
        x_vp, timestep, t_eff = ddpm_inputs(x, t)
        out = super().forward(x_vp, timestep, y, prior, tokens_at)
        eps = (out if tokens_at is None else out[0]).to(x.dtype)  # in the state's precision
        t_eff = t_eff.view(-1, 1, 1, 1)
        velocity = eps - (x - t_eff * eps) / (1 - t_eff)  # e - x0, with x0 = (x - t e) / (1 - t)
        return velocity if tokens_at is None else (velocity, out[1])


def network_class(time_convention: str) -> type[DiT]:
    """The network a scale of this ``time_convention`` is built as: msf's DiT, or the subclass that
    reads SiT's or DDPM's weights in msf's time."""
    classes = {"msf": DiT, "sit": SiTNetwork, "ddpm": DDPMNetwork}
    if time_convention not in classes:
        raise ValueError(f"time_convention must be one of {list(classes)}, got {time_convention!r}")
    return classes[time_convention]


def ddpm_inputs(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """msf's state ``x`` at flow time ``t`` as DiT's DDPM sees it: ``(x_vp, timestep, t_eff)``.

    Both are Gaussian paths: msf's ``x = (1 - t) x0 + t e`` is DiT's ``sqrt(a) x0 + sqrt(1 - a) e``
    divided by ``sqrt(a) + sqrt(1 - a)``, where ``a = (1 - t)^2 / ((1 - t)^2 + t^2)`` (equal
    signal-to-noise ratios). The DDPM timestep with that ``a`` is interpolated in log-SNR between
    DiT's integer ones (exact at them). The noise DiT predicts there gives msf's velocity
    ``e - x0``, with ``x0 = (x - t e) / (1 - t)``; Euler steps on it are DDIM's (eta = 0) steps.
    ``t_eff`` is ``t`` clamped to DiT's timesteps (at most :data:`DDPM_T_MAX`).
    """
    t_eff = t.double().clamp(min=1e-12, max=DDPM_T_MAX)
    log_snr = 2 * ((1 - t_eff) / t_eff).log()
    table = _DDPM_LOG_SNR.to(t.device)
    # searchsorted wants a rising table: -log-SNR rises with the timestep
    i = torch.searchsorted(-table, -log_snr).clamp(1, DDPM_STEPS - 1)
    lo, hi = table[i - 1], table[i]
    timestep = ((i - 1) + (lo - log_snr) / (lo - hi)).clamp(0, DDPM_STEPS - 1)
    r = ((1 - t_eff) ** 2 + t_eff ** 2).sqrt()
    return x / r.to(x.dtype).view(-1, 1, 1, 1), timestep.float(), t_eff.to(x.dtype)


def convert_checkpoint(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    kind: str = "auto",
    image_size: int | None = None,
    learned_sigma: str = "drop",
    autoencoder: str = "ema",
    heads: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a DiT or SiT checkpoint at ``path`` into the msf model directory ``out_dir``; return it.

    ``kind``: ``"sit"``, ``"dit"`` or ``"auto"`` (from the
    training ``args`` a checkpoint holds, else the file name: ``SiT-...`` or ``DiT-...``).
    ``image_size`` is checked against the one the weights imply (needed only without ``pos_embed``).
    ``autoencoder``: ``"ema"`` or ``"mse"`` (``stabilityai/sd-vae-ft-*``) or a VAE folder or hub id.
    ``heads`` overrides the model table. An existing model directory is replaced only with ``overwrite``.
    """
    path, out_dir = Path(path), Path(out_dir)
    _choice("kind", kind, KINDS)
    _choice("learned_sigma", learned_sigma, LEARNED_SIGMA)
    if (out_dir / "config.json").exists() and not overwrite:
        raise ConversionError(f"{out_dir}: already a model directory; pass overwrite=True (--overwrite) "
                              "to replace it")
    state, args, source = load_checkpoint(path)
    kind = detect_kind(path, args) if kind == "auto" else kind
    if kind == "sit":
        _check_sit_args(path, args)

    scale, sigma = infer_scale(path, state, image_size, heads, "sit" if kind == "sit" else "ddpm")
    if sigma and learned_sigma == "refuse":
        why = ("SiT never trains them (its forward drops them)" if kind == "sit" else
               "DiT's DDPM sampler uses them for its step variances; msf's ODE samplers (DDIM's, for DiT) "
               "need none")
        raise ConversionError(
            f"{path}: final_layer.linear has 2 x {scale.patch_size}^2 x 4 outputs: learned-sigma channels, "
            f"which learned_sigma='refuse' asked to refuse. {why}; learned_sigma='drop' keeps the first 4 "
            f"channels, the {'velocity' if kind == 'sit' else 'noise prediction'}"
        )
    # the sampler settings of msf's DiT-XL/2 baseline: its default and its named ones (paper)
    baseline = preset("dit-xl2").model
    scale = dataclasses.replace(scale, **{f: getattr(baseline.scales[0], f) for f in SAMPLING_FIELDS})
    vae = dataclasses.replace(SD_VAE, path=VAES.get(autoencoder, autoencoder))
    classes = _key(path, state, "y_embedder.embedding_table.weight", 2).shape[0] - 1  # + the null class
    config = ModelConfig(num_classes=classes, scales=[scale], autoencoder=vae,
                         samplers=copy.deepcopy(baseline.samplers))
    if args and "num_classes" in args and args["num_classes"] != config.num_classes:
        raise ConversionError(f"{path}: args.num_classes={args['num_classes']}, but y_embedder."
                              f"embedding_table holds {config.num_classes} classes + the null class")

    validate(Config(model=config))
    # The network on the meta device: its shapes to check against, then our tensors assigned to it
    # (no 675M-parameter initialisation to throw away).
    with torch.device("meta"):
        net = network_class(scale.time_convention)(scale, config.latent_sizes[0], config.autoencoder.channels,
                                                   config.num_classes)
    ours = map_state(path, state, {k: tuple(v.shape) for k, v in net.state_dict().items()}, sigma,
                     scale.patch_size, config.autoencoder.channels)
    net.load_state_dict(ours, strict=True, assign=True)
    extra = {"converted_from": {"file": path.name, "kind": kind, "weights": source,
                                "learned_sigma": "dropped" if sigma else "none"}}
    return save_model_dir(out_dir, config, [net], extra=extra)


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict, str]:
    """``(state dict, training args or {}, where the weights came from)`` of a ``.pt`` or safetensors
    file: a raw state dict, or a training checkpoint ``{"model", "ema", "opt", "args"}`` (EMA preferred)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint does not exist")
    if path.suffix == ".safetensors":
        try:
            return _tensors(path, load_file(str(path))), {}, "state dict"
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        # Tensors and plain containers only; the training scripts' args are an argparse.Namespace.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: not a weights-only PyTorch checkpoint; msf reads tensors, never "
                              f"pickled objects ({first})") from None
    args, source = {}, "state dict"
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj):
        raw = obj.get("args")
        args = vars(raw) if isinstance(raw, argparse.Namespace) else raw if isinstance(raw, dict) else {}
        source = "ema" if "ema" in obj else "model"
        obj = obj[source]
    return _tensors(path, obj), args, source


def _tensors(path: Path, obj) -> dict[str, Tensor]:
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConversionError(f"{path}: not a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in obj):  # saved from a DDP wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def detect_kind(path: Path, args: dict) -> str:
    """``"sit"`` or ``"dit"``: the two share one layout, so the training args or the file name decide."""
    if "path_type" in args or "prediction" in args:  # SiT's transport arguments
        return "sit"
    model = str(args.get("model", ""))
    if model[:3].lower() in ("sit", "dit"):
        return model[:3].lower()
    found = set(re.findall(r"(?<![a-z])(sit|dit)(?![a-z])", path.name.lower()))
    if len(found) == 1:
        return found.pop()
    raise ConversionError(f"{path}: DiT and SiT checkpoints have the same keys and the file name says "
                          "neither; pass kind='sit' (--kind sit) or kind='dit'")


def _check_sit_args(path: Path, args: dict) -> None:
    """Only SiT's linear path with velocity prediction is msf's flow; its training args say which."""
    path_type, prediction = args.get("path_type", "Linear"), args.get("prediction", "velocity")
    if (path_type, prediction) != ("Linear", "velocity"):
        raise ConversionError(
            f"{path}: trained with path_type={path_type}, prediction={prediction}; only SiT's linear path "
            "with velocity prediction (its default, and the released SiT-XL/2) is msf's rectified flow"
        )


def _key(path: Path, state: dict[str, Tensor], key: str, dims: int) -> Tensor:
    if key not in state:
        raise ConversionError(f"{path}: key {key!r} is missing; not a DiT/SiT state dict? "
                              f"(its first keys: {list(state)[:4]})")
    t = state[key]
    if t.dim() != dims:
        raise ConversionError(f"{path}: {key} has shape {tuple(t.shape)}; expected {dims} dimensions")
    return t


def infer_scale(path: Path, state: dict[str, Tensor], image_size: int | None = None,
                heads: int | None = None, time_convention: str = "sit") -> tuple[ScaleConfig, bool]:
    """The msf scale whose network the reference-layout ``state`` describes (``time_convention``:
    ``"sit"`` or ``"ddpm"``, for DiT), and whether its output has learned-sigma channels."""
    width, channels, p, q = _key(path, state, "x_embedder.proj.weight", 4).shape
    if p != q:
        raise ConversionError(f"{path}: x_embedder.proj.weight has non-square patches {p} x {q}")
    if channels != SD_VAE.channels:
        raise ConversionError(f"{path}: x_embedder.proj.weight takes {channels} input channels; "
                              f"the SD VAE's latents have {SD_VAE.channels}")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = len(blocks)
    if depth == 0 or blocks != set(range(depth)):
        raise ConversionError(f"{path}: transformer blocks must be numbered 0..N-1, found {sorted(blocks)}")
    hidden = _key(path, state, "blocks.0.mlp.fc1.weight", 2).shape[0]
    out = _key(path, state, "final_layer.linear.weight", 2).shape[0]
    if out not in (p * p * channels, 2 * p * p * channels):
        raise ConversionError(f"{path}: final_layer.linear.weight has {out} outputs; a patch of {p} x {p} "
                              f"with {channels} channels needs {p * p * channels} (or twice: learned sigma)")
    heads = heads or HEADS_BY_WIDTH.get(width)
    if heads is None:
        raise ConversionError(f"{path}: width {width} is none of DiT's / SiT's models "
                              f"({sorted(HEADS_BY_WIDTH)}); pass heads= (--heads), no shape tells it")

    latent = _input_size(path, state, width, p)
    if latent is None and image_size is None:
        raise ConversionError(f"{path}: no pos_embed to tell the input size from; pass image_size=")
    factor = SD_VAE.factor
    if latent is not None and image_size is not None and image_size != latent * factor:
        raise ConversionError(f"{path}: pos_embed is a {latent // p} x {latent // p} token grid, a "
                              f"{latent * factor} px model; image_size={image_size} was asked for")
    scale = ScaleConfig(image_size=image_size or latent * factor, depth=depth, width=width, heads=heads,
                        patch_size=p, mlp_ratio=hidden / width, time_convention=time_convention, gelu="tanh")
    return scale, out == 2 * p * p * channels


def _input_size(path: Path, state: dict[str, Tensor], width: int, p: int) -> int | None:
    """The latent size ``pos_embed`` implies (None without one), its values checked against msf's table."""
    if "pos_embed" not in state:
        return None
    pos = state["pos_embed"]
    tokens = pos.shape[1] if pos.dim() == 3 else -1
    grid = int(round(tokens ** 0.5)) if tokens > 0 else 0
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != width or grid * grid != tokens:
        raise ConversionError(f"{path}: pos_embed has shape {tuple(pos.shape)}; expected (1, G*G, {width})")
    # msf recomputes the table instead of loading it: only DiT's fixed sin-cos table converts
    if not torch.allclose(pos[0].float(), sincos_pos_embed_2d(width, grid), atol=1e-5):
        raise ConversionError(f"{path}: pos_embed is not DiT's fixed 2-D sin-cos table (learned "
                              "positions?); msf's DiT cannot hold it")
    return grid * p


def map_state(path: Path, state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], sigma: bool,
              p: int, channels: int) -> dict[str, Tensor]:
    """The reference-layout ``state`` under msf's names, learned sigma dropped, every shape checked
    against ``expected`` (msf's names -> shapes)."""
    ours, unexpected = {}, []
    for key, t in state.items():
        if key == "pos_embed":
            continue  # checked in _input_size; msf's DiT computes it
        name = "x_embedder." + key[len("x_embedder.proj."):] if key.startswith("x_embedder.proj.") else key
        if name not in expected:
            unexpected.append(key)
            continue
        want = expected[name]
        if sigma and name.startswith("final_layer.linear."):
            t, want = _drop_sigma(t, p, channels), (2 * want[0], *want[1:])  # the file's rows: 2C
        if tuple(t.shape) != expected[name]:
            raise ConversionError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {want} "
                                  f"(msf's {name}, for the network the other shapes describe)")
        ours[name] = t.detach().float().contiguous()  # msf keeps fp32 weights
    missing = sorted(set(expected) - set(ours))
    if missing or unexpected:
        raise ConversionError(f"{path}: keys do not match a DiT/SiT network (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return ours


def _drop_sigma(t: Tensor, p: int, channels: int) -> Tensor:
    """Keep the first ``channels`` of 2 x ``channels`` outputs per patch pixel: rows are ordered
    (patch row, patch column, channel), as DiT's unpatchify reads them."""
    if t.shape[0] != 2 * p * p * channels:
        return t  # a wrong shape: map_state reports it with the key
    rest = t.shape[1:]
    return t.reshape(p, p, 2 * channels, *rest)[:, :, :channels].reshape(p * p * channels, *rest)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConversionError(f"{name} must be one of {allowed}, got {value!r}")
