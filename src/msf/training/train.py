"""Training: all scales at once or one alone, one process or many, resumable exactly.

Under teacher forcing (Algorithm 2) the scales are independent: each has its own
network, optimizer, EMA, learning-rate schedule and step count, and a job that
trains only scale k computes exactly what scale k sees in an all-scales job (an
all-scales job shares one batch of images, and one encode, between the scales).

Everything random in a step (which images, flips, times, noise, label dropout) is
a pure function of (seed, step): see ``msf.training.data.IndexStream`` and
``msf.method.flow.StepNoise``. So a run resumed from a checkpoint continues exactly as
the uninterrupted run would have, and N processes under torchrun compute the
same global batch as one process.

Run directory (``train.out_dir``)::

    config.json           the resolved config of the run
    checkpoints/          step_*.pt: weights, EMA, optimizer, step, history (resume)
    model/                the EMA pipeline: config.json + scale_k.safetensors (sampling)
    losses.json           loss per scale and step
    samples/, tb/         sample grids and TensorBoard logs, when enabled
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm

from msf.config import (
    SAMPLING_FIELDS,
    Config,
    ConfigError,
    TrainConfig,
    from_dict,
    time_shifts,
    to_dict,
    validate,
)
from msf.evaluation.quality_log import QualityLog
from msf.files import atomic_write_text
from msf.method.flow import StepNoise
from msf.method.models import DiT
from msf.method.pipeline import MSFPipeline, autocast
from msf.precision import resolve_precision
from msf.training.checkpoint import (
    CheckpointError,
    load_latest,
    load_sharded_into,
    prune,
    save_checkpoint,
    save_sharded_checkpoint,
)
from msf.training.data import ImageDataset, IndexStream, TrainingData, iterate_batches, load_dataset
from msf.training.distributed import (
    World,
    any_rank,
    barrier,
    close_world,
    describe,
    init_world,
    mean_over_ranks,
)
from msf.training.repa import AlignedNet, Projector, alignment_loss, default_depth, load_encoder, pooled

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from msf.training.imagefolder import ImageFolder
    from msf.training.latent_cache import LatentCache

# Train-config fields that may change on resume without changing what the run computes.
RESUMABLE_CHANGES = {
    "steps", "scale_steps", "log_every", "ckpt_every", "keep_last", "keep_every", "out_dir",
    "num_workers", "tensorboard", "sample_every", "on_nonfinite", "compile", "grad_checkpointing",
    "data", "strict_data", "fsdp", "deterministic", "ckpt_format", "wandb_project", "eval_every",
    "eval_samples", "eval_ref", "eval_metrics",
}


@dataclass
class TrainResult:
    pipeline: MSFPipeline | None  # the EMA weights (None on an FSDP run's other processes)
    history: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # k -> (step, loss)
    model_dir: Path | None = None
    checkpoint: Path | None = None
    seconds: float = 0.0
    steps: int = 0  # the last completed step
    images_per_second: float = 0.0
    skipped: int = 0  # steps skipped for a non-finite loss (train.on_nonfinite=skip)
    interrupted: bool = False  # stopped by Ctrl-C / SIGTERM, after saving a checkpoint
    time_capped: bool = False  # stopped by max_seconds before the last step
    total_steps: int = 0  # the step the run was to reach
    precision: str = ""  # train.precision as resolved on this machine ("bf16" or "fp32")


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP parameter (a DTensor), or the tensor itself."""
    return p.to_local() if hasattr(p, "to_local") else p


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """EMA of the weights; under FSDP each process updates its own shard."""
    torch._foreach_lerp_([_local(p) for p in ema.parameters()],
                         [_local(p.detach()) for p in model.parameters()], 1.0 - decay)


# An EMA that still holds more than this share of its random start samples worse than the raw weights
# (its zero-initialised output layers are scaled down by that share; a short run's samples are noise)
YOUNG_EMA = 0.1


def ema_start_share(cfg: Config, step: int) -> tuple[float, int]:
    """The share of a run's EMA that is still its starting point (the initial weights) after ``step``
    steps, and the updates that left it there: those of its least-trained scale."""
    updates = min(min(step, cfg.train.steps_for(k)) for k in trained_scales(cfg))
    return cfg.train.ema_decay ** max(updates, 0), updates


def shard(net: nn.Module, precision: str = "fp32") -> None:
    """FSDP2: shard each transformer block, then the rest of the network.

    With ``precision="bf16"`` the weights are gathered in bf16 (half the traffic; autocast
    would round them to bf16 for its matrix products anyway) and the gradients are reduced
    in fp32. Inputs are not cast, so the times and the residual stream stay as autocast
    leaves them.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    for block in net.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(net, mp_policy=mp)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def trained_scales(cfg: Config) -> list[int]:
    if cfg.train.scale == "all":
        return list(range(cfg.model.num_scales))
    return [int(cfg.train.scale)]


def learning_rate(tc: TrainConfig, step: int, total: int) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio * lr`` at ``total``."""
    if tc.warmup_steps and step <= tc.warmup_steps:
        return tc.lr * step / tc.warmup_steps
    if tc.lr_schedule == "cosine":
        span = max(1, total - tc.warmup_steps)
        progress = min(1.0, (step - tc.warmup_steps) / span)
        return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return tc.lr


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a request to stop at the next step boundary.

    A second Ctrl-C interrupts at once (the last checkpoint stays intact).
    """

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        print(f"\n[msf] {name}: saving a checkpoint at the end of this step, then stopping "
              "(Ctrl-C again to abort now)", flush=True)

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for sig, old in self._old.items():
                signal.signal(sig, old)


def _check_resume(cfg: Config, found: tuple[dict, Path]) -> None:
    """A checkpoint must belong to this model; train changes that alter the run are warned about.

    The run then takes the checkpoint's measured ``model.component_std``.
    """
    saved, path = from_dict(Config, found[0]["config"], "checkpoint config"), found[1]
    a, b = to_dict(cfg.model), to_dict(saved.model)
    for d in (a, b):  # the measured std, and how the model samples: neither changes what training computes
        d["component_std"], d["samplers"] = None, {}
        for s in d["scales"]:
            for key in SAMPLING_FIELDS:
                s.pop(key)
    if a != b:
        diff = [k for k in a if a[k] != b[k]]
        raise CheckpointError(
            f"{path}: the checkpoint's model config differs from this run's in {diff}; "
            "resume with the config saved in the run directory (config.json)"
        )
    if cfg.train.scale != saved.train.scale:
        raise CheckpointError(
            f"{path}: the checkpoint trains scale {saved.train.scale!r}, this run {cfg.train.scale!r}"
        )
    ta, tb = to_dict(cfg.train), to_dict(saved.train)
    changed = [k for k in ta if ta[k] != tb[k] and k not in RESUMABLE_CHANGES]
    if ta["lr_schedule"] == "cosine" and (ta["steps"], ta["scale_steps"]) != (tb["steps"], tb["scale_steps"]):
        changed.append("steps (the cosine schedule spans the total)")
    if changed:
        warnings.warn(
            f"resuming with train settings changed from the checkpoint's: {changed}; "
            "the run will not equal an uninterrupted one", stacklevel=3,
        )
    cfg.model.component_std = saved.model.component_std


class _Logger:
    """Scalars and images on the main process: TensorBoard (if installed), Weights & Biases (if
    ``train.wandb_project`` is set) and a line per log step in ``<out_dir>/log.txt``."""

    def __init__(self, out: Path, cfg: Config, enabled: bool):
        self.writer = self.wandb = self.text = None
        if not enabled:
            return
        self.text = out / "log.txt"
        if cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed: no TensorBoard logs "
                              "(pip install tensorboard, or set train.tensorboard=false)", stacklevel=3)
            else:
                self.writer = SummaryWriter(str(out / "tb"))
        if cfg.train.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError(f"train.wandb_project={cfg.train.wandb_project!r}: Weights & Biases is not "
                                  "installed (pip install wandb), or set train.wandb_project=''") from None
            self.wandb = wandb.init(project=cfg.train.wandb_project, name=out.name, dir=str(out),
                                    config=to_dict(cfg), resume="allow")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(values, step=step)
        if self.text:
            with open(self.text, "a") as f:
                f.write(f"step {step} " + " ".join(f"{k}={v:.6g}" for k, v in values.items()) + "\n")

    def image(self, step: int, tag: str, path: Path) -> None:
        if self.writer:
            import numpy as np
            from PIL import Image

            self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step,
                                  dataformats="HWC")
        if self.wandb:
            import wandb

            self.wandb.log({tag: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()


class _Tee:
    """A stream that also appends what is written to a file; progress-bar redraws (``\\r``) stay on
    the terminal."""

    def __init__(self, stream, path: Path):
        self.stream, self.path = stream, path

    def write(self, text: str) -> int:
        if "\r" not in text and text:
            with open(self.path, "a") as f:
                f.write(text)
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _printed_to(path: Path | None):
    """While running, what is printed to stdout and stderr also goes to ``path`` (``<out_dir>/log.txt``)."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, path), _Tee(err, path)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err


# --------------------------------------------------------------------------- the state of a run


@dataclass
class TrainState:
    """Everything a resumed run needs to continue as if never stopped.

    The step, every scale's raw weights (``pipe``, what the optimizers update) and EMA
    weights (``ema``, what samples), the optimizers, and the loss history. The randomness
    has no state to keep: each draw of step s (batch, flips, times, noise, label dropout)
    is a function of (seed, s), so the step is the RNG's position.
    """

    step: int
    pipe: MSFPipeline
    ema: MSFPipeline
    opts: dict[int, torch.optim.Optimizer]
    history: dict[int, list[tuple[int, float]]]
    skipped: int = 0  # steps skipped for a non-finite loss
    # REPA (train.repa_encoder): the frozen encoder, and per aligned scale its projector and optimizer
    encoder: nn.Module | None = None
    projectors: dict[int, nn.Module] = field(default_factory=dict)
    projector_opts: dict[int, torch.optim.Optimizer] = field(default_factory=dict)

    @classmethod
    def create(cls, cfg: Config, world: World, data, bad_files: list[str], load_other_scales: bool = True,
               autoencoder: nn.Module | None = None, networks: list[nn.Module] | None = None) -> TrainState:
        """Fresh networks (seeded; or the caller's), the EMA as their copy, FSDP shards, one AdamW per
        trained scale.

        With ``model.normalize=std`` and no ``model.component_std`` yet, the std is measured on
        ``data`` here and written into ``cfg`` (the run's own copy), before the EMA copies the config.
        """
        tc, scales = cfg.train, trained_scales(cfg)
        torch.manual_seed(tc.seed)  # the same initial weights on every process
        own = None if networks is None else copy.deepcopy(list(networks))
        pipe = MSFPipeline(cfg.model, autoencoder=autoencoder, networks=own).to(world.device)
        if cfg.model.normalize == "std" and cfg.model.component_std is None:
            cfg.model.component_std = _measure_std(pipe, data, tc.seed, world.device, bad_files)
        pipe.config = cfg.model
        if load_other_scales and tc.other_scales_from:
            _load_other_scales(pipe, cfg, scales, Path(tc.other_scales_from))
        for k in scales:
            pipe.networks[k].grad_checkpointing = tc.grad_checkpointing
        ema = MSFPipeline(cfg.model, autoencoder=pipe.autoencoder,
                          networks=None if networks is None else copy.deepcopy(list(pipe.networks))
                          ).to(world.device)
        ema.networks.load_state_dict(pipe.networks.state_dict())
        ema.requires_grad_(False).eval()
        if tc.fsdp:
            if not world.distributed:
                raise ConfigError("train.fsdp=true needs several processes: launch with torchrun")
            for k in scales:
                shard(pipe.networks[k], tc.precision)
                shard(ema.networks[k])  # never runs forward: its weights stay fp32
        fused = world.device.type == "cuda"  # one kernel per step on the GPU; the CPU keeps foreach
        def adamw(params):
            return torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                                     fused=fused or None)

        opts = {k: adamw(pipe.networks[k].parameters()) for k in scales}
        state = cls(step=0, pipe=pipe, ema=ema, opts=opts, history={k: [] for k in scales})
        if tc.repa_encoder:  # after the networks, so that their initial weights do not change
            state.encoder, state.projectors = _repa_parts(cfg, pipe, scales, world.device)
            state.projector_opts = {k: adamw(p.parameters()) for k, p in state.projectors.items()}
        return state

    def state_dict(self, sharded: bool = False) -> dict:
        """Full (unsharded) state dicts on the CPU; collective under FSDP: every process calls it.

        ``sharded``: this process's own tensors instead, nothing gathered or copied (FSDP's DTensor
        shards; without FSDP the weights themselves), for DCP to save or to load into in place.
        """
        scales, opt = range(self.pipe.num_scales), StateDictOptions() if sharded else _FULL
        return {
            "models": {str(k): get_model_state_dict(self.pipe.networks[k], options=opt) for k in scales},
            "emas": {str(k): get_model_state_dict(self.ema.networks[k], options=opt) for k in scales},
            "optimizers": {str(k): get_optimizer_state_dict(self.pipe.networks[k], o, options=opt)
                           for k, o in self.opts.items()},
            "history": {str(k): [list(p) for p in v] for k, v in self.history.items()},
            "step": self.step,
            "skipped": self.skipped,
        } | ({  # REPA's projectors: training state, not part of the model
            "projectors": {str(k): p.state_dict() for k, p in self.projectors.items()},
            "projector_optimizers": {str(k): o.state_dict() for k, o in self.projector_opts.items()},
        } if self.projectors else {})

    def load_state_dict(self, state: dict) -> None:
        """From a checkpoint file's state, or a sharded checkpoint's ``msf.json`` (its ``"dcp"``
        directory is read here, each process its own shards, resharded from any process count);
        collective under FSDP or with a sharded checkpoint: every process calls it."""
        load = StateDictOptions(full_state_dict=True)
        if "dcp" in state:
            into = self.state_dict(sharded=True)
            tensors = {key: into[key] for key in ("models", "emas", "optimizers")}
            load_sharded_into(state["dcp"], tensors)
            state, load = {**state, **tensors}, StateDictOptions()
        for k in range(self.pipe.num_scales):
            set_model_state_dict(self.pipe.networks[k], state["models"][str(k)], options=load)
            set_model_state_dict(self.ema.networks[k], state["emas"][str(k)], options=load)
        for k, opt in self.opts.items():
            set_optimizer_state_dict(self.pipe.networks[k], opt, state["optimizers"][str(k)], options=load)
        saved = state.get("projectors", {})
        for k, proj in self.projectors.items():  # a checkpoint from before REPA was on: fresh projectors
            if str(k) in saved:
                proj.load_state_dict(saved[str(k)])
                self.projector_opts[k].load_state_dict(state["projector_optimizers"][str(k)])
        self.history = {int(k): [tuple(p) for p in v] for k, v in state["history"].items()}
        self.step, self.skipped = int(state["step"]), int(state.get("skipped", 0))


# --------------------------------------------------------------------------- one step


@dataclass
class StepResult:
    losses: dict[int, torch.Tensor]  # per active scale, detached, on the device
    grad_norms: dict[int, torch.Tensor]  # before clipping (empty when clipping is off)
    finite: bool  # False: the loss was NaN/Inf on some process and nothing was updated
    stop: bool  # some process asked to stop (Ctrl-C, SIGTERM, time limit) after this step


def train_step(state: TrainState, batch, tc: TrainConfig, nets: dict[int, nn.Module], world: World,
               stop_requested: bool = False) -> StepResult:
    """One step of the method for every scale still training (its step count not reached).

    Algorithms 1-2 and eq. 5 (``MSFPipeline.training_losses``: factorize, priors, the loss per
    scale), then backward, gradient clipping, the scheduled learning rate, AdamW and the EMA.
    ``batch`` is ``(images or (z, base) latents, labels)`` on the device. Every random draw
    comes from ``StepNoise(seed, step)``. The step waits on the host once: for the finiteness
    of the loss, agreed over all processes together with ``stop_requested``.
    """
    step = state.step + 1
    active = [k for k in state.opts if step <= tc.steps_for(k)]
    inputs, labels = batch
    images, latents = (None, inputs) if isinstance(inputs, tuple) else (inputs, None)
    with autocast(world.device, tc.precision):
        align = _repa_terms(state, images, active, tc)
        losses = state.pipe.training_losses(
            images, labels, active, latents=latents, class_dropout=tc.class_dropout,
            time_sampler=tc.time_sampler, logit_mean=tc.logit_mean, logit_std=tc.logit_std,
            noise=StepNoise(tc.seed, step, world.rank, world.size), nets=nets,
            time_shift=time_shifts(tc, state.pipe.config), cosine_weight=tc.cosine_loss_weight, align=align,
        )
    total = sum(losses.values())
    nonfinite, stop = any_rank([~torch.isfinite(total.detach()), stop_requested], world)
    if nonfinite:
        state.step = step
        return StepResult({k: v.detach() for k, v in losses.items()}, {}, False, stop)
    total.backward()
    grad_norms = {}
    for k in active:
        net, opt = state.pipe.networks[k], state.opts[k]
        proj, proj_opt = state.projectors.get(k), state.projector_opts.get(k)
        if tc.grad_clip > 0:  # over the network and its projector together, as REPA clips
            params = net.parameters() if proj is None else [*net.parameters(), *proj.parameters()]
            grad_norms[k] = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        for o in (opt, proj_opt) if proj_opt is not None else (opt,):
            for g in o.param_groups:
                g["lr"] = learning_rate(tc, step, tc.steps_for(k))
            o.step()
            o.zero_grad(set_to_none=True)
        ema_update(state.ema.networks[k], net, tc.ema_decay)
    state.step = step
    return StepResult({k: v.detach() for k, v in losses.items()}, grad_norms, True, stop)


# --------------------------------------------------------------------------- the loop


def train(
    cfg: Config,
    *,
    data: TrainingData | ImageDataset | ImageFolder | LatentCache | Dataset | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_seconds: float | None = None,
    save: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    autoencoder: nn.Module | None = None,
    networks: list[nn.Module] | None = None,
) -> TrainResult:
    """Train ``cfg``; checkpoints in ``<out_dir>/checkpoints``, the EMA pipeline in ``<out_dir>/model``.

    Extension points: ``data`` replaces ``train.data`` (anything :class:`.data.TrainingData`
    takes: a
    dataset following msf's protocol, or a torchvision-style one returning ``(image, label)``);
    ``autoencoder`` replaces the config's (an :class:`msf.method.autoencoder.Autoencoder`: ``encode``,
    ``decode``, ``factor``, ``channels``); ``networks`` replaces the per-scale DiTs (one module per
    scale, ``net(x_t, t, y, prior) -> velocity``; they are copied, and trained from their weights).

    ``device``: "cpu", "cuda", or None for CUDA when available. ``resume`` continues
    from the newest checkpoint in the run directory (or starts fresh, saying so,
    when there is none). A fresh run refuses a directory that holds an earlier run, unless
    ``overwrite`` deletes that run first. ``max_seconds`` stops early at a step boundary. ``cfg`` is
    not changed: the run's resolved config (class names from the data, measured
    component std) is the returned pipeline's and the run directory's. Under torchrun
    every process calls this; the main one writes files.
    """
    validate(cfg)
    world = init_world(None if device is None else str(device))
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if save and not resume:
            _claim_run_directory(Path(cfg.train.out_dir), world, overwrite)
        if cfg.train.deterministic:
            # cuBLAS needs a fixed workspace for deterministic products; set before its first use
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        with _printed_to(Path(cfg.train.out_dir) / "log.txt" if save and world.is_main else None):
            return _run(copy.deepcopy(cfg), world, data, progress, max_seconds, save, resume,
                        autoencoder=autoencoder, networks=networks)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        close_world(world)


def _run(cfg: Config, world: World, data, progress: bool, max_seconds: float | None, save: bool,
         resume: bool, autoencoder: nn.Module | None = None, networks: list[nn.Module] | None = None
         ) -> TrainResult:
    tc, dev = cfg.train, world.device
    # "auto" made concrete here: checkpoints and the model directory record what ran, config.json keeps
    # what was asked (a resume on another machine resolves it anew)
    requested = tc.precision
    tc.precision = resolve_precision(requested, dev, what="train.precision", say=progress and world.is_main)
    if tc.batch_size % world.size:
        raise ConfigError(f"train.batch_size={tc.batch_size} (global) is not divisible by the "
                          f"{world.size} processes")
    out = Path(tc.out_dir)
    ckpts = _Checkpoints(out / "checkpoints", cfg, world, enabled=save)
    _warn_if_oversubscribed(world)

    # -- data, and the model config it completes (class names; component std from the data or the checkpoint)
    given = data is not None
    data = _open_data(cfg, data)
    if tc.eval_every and not tc.eval_ref and (given or data.kind == "latents"):
        # said now, not at the first quality check N steps into the run
        what = "a dataset object was passed" if given else f"train.data={tc.data} is a latent cache"
        raise ConfigError(f"train.eval_every={tc.eval_every}: {what}, not images msf can build a reference "
                          "from; set train.eval_ref (an .npz, a folder, or msf reference --stats output)")
    if tc.repa_encoder and data.kind == "latents":
        raise ConfigError(f"train.repa_encoder: train.data={tc.data} is a latent cache; REPA's encoder needs "
                          "the images (train on the image data, or turn REPA off)")
    found = ckpts.latest() if resume else None
    if found is not None:
        _check_resume(cfg, found)

    # -- networks, EMA, optimizers; then the checkpoint's state, if resuming
    bad_files: list[str] = []
    state = TrainState.create(cfg, world, data, bad_files, load_other_scales=found is None,
                              autoencoder=autoencoder, networks=networks)
    if found is not None:
        state.load_state_dict(found[0])
    scales = trained_scales(cfg)
    nets = {k: _wrap(AlignedNet(state.pipe.networks[k], state.projectors[k], _repa_depth(cfg, k))
                     if k in state.projectors else state.pipe.networks[k], tc, world) for k in scales}
    if save and world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        asked = to_dict(cfg)
        asked["train"]["precision"] = requested
        (out / "config.json").write_text(json.dumps(asked, indent=2))
    losses = _LossLog(state, scales, tc, world, _Logger(out, cfg, world.is_main and save))

    # -- the loop: a step, then its log, sample grid and checkpoint when due
    total_steps, start_step = max(tc.steps_for(k) for k in scales), state.step
    stream = IndexStream(data.labels, tc.batch_size, seed=tc.seed, balance_classes=tc.balance_classes,
                         flip=tc.random_flip)
    stop, interrupted, time_capped = StopRequest(), False, False
    quality = None  # msf.evaluation.quality_log, made at the first check
    if progress and world.is_main:
        print(f"[msf] training on {describe(dev)}, {world.size} process(es), precision {tc.precision}",
              flush=True)
    bar = tqdm(total=total_steps, initial=start_step, disable=not (progress and world.is_main),
               desc="train", dynamic_ncols=True)
    started = time.perf_counter()
    logged = (start_step, started)  # the step and time of the last log line
    state.pipe.train()
    with stop.installed():
        # on a GPU, the next batch is gathered (and pinned) while the step runs
        gpu = dev.type == "cuda"
        for step, x, y, bad in iterate_batches(data, stream, start_step + 1, total_steps, rank=world.rank,
                                               world=world.size, num_workers=_workers(tc.num_workers),
                                               prefetch=2 if gpu else 0, pin_memory=gpu):
            if bad:
                _report_bad_files(bad, bad_files, world)
            x = tuple(None if v is None else v.to(dev, non_blocking=True) for v in x) \
                if isinstance(x, tuple) else x.to(dev, non_blocking=True)
            out_of_time = max_seconds is not None and time.perf_counter() - started > max_seconds
            result = train_step(state, (x, y.to(dev)), tc, nets, world, stop.requested or out_of_time)
            if not result.finite:
                _nonfinite(result, step, tc, ckpts.last)
                state.skipped += 1
            else:
                losses.add(result)
                if step % tc.log_every == 0 or step == total_steps:
                    # over this log window: a rate since the start would carry the first steps'
                    # compilation (train.compile: a minute at paper sizes) for the whole run
                    now = time.perf_counter()
                    rate = (step - logged[0]) * tc.batch_size / max(now - logged[1], 1e-9)
                    logged = (step, now)
                    bar.set_postfix(losses.write(step, list(result.losses), rate))
                    if max_seconds is not None:
                        _honour_cap(bar, step, start_step, total_steps, time.perf_counter() - started,
                                    max_seconds)
                if save and tc.sample_every and step % tc.sample_every == 0:
                    plain = _gathered(state.ema, cfg, world)
                    if plain is not None:
                        path = _sample_grid(plain, out / "samples" / f"step_{step:09d}.png")
                        losses.logger.image(step, "samples", path)
                if save and tc.eval_every and step % tc.eval_every == 0:
                    plain = _gathered(state.ema, cfg, world)
                    if plain is not None:
                        quality = quality or QualityLog(cfg, out, dev)
                        losses.logger.scalars(step, quality.check(plain, step))
                    barrier(world)  # the others wait while the main process samples and scores
                if tc.ckpt_every and step % tc.ckpt_every == 0:
                    ckpts.save(state)
            bar.total = max(bar.total, bar.n + 1)  # the time cap's estimate can fall short: never n > total
            bar.update(1)
            if result.stop:
                interrupted = stop.requested
                time_capped = out_of_time and not interrupted and state.step < total_steps
                break
    if not interrupted:  # the last step is known now, whatever the cap's estimate said: n of n
        bar.total = bar.n
    if time_capped:
        bar.set_description(f"train (time cap: {bar.n} of {total_steps} steps)")
    bar.close()
    seconds = time.perf_counter() - started
    if time_capped and world.is_main:
        warnings.warn(f"the time cap ({max_seconds / 60:g} min) stopped training at step {state.step} of "
                      f"{total_steps}: a model trained this little samples poorly. Give it more time "
                      "(--minutes) or fewer steps (train.steps=...)", stacklevel=3)
    share, updates = ema_start_share(cfg, state.step)
    if share > YOUNG_EMA and save and world.is_main and state.step > start_step:
        need = math.ceil(math.log(YOUNG_EMA) / math.log(tc.ema_decay)) if 0 < tc.ema_decay < 1 else 0
        warnings.warn(f"the EMA weights (train.ema_decay={tc.ema_decay:g}) still hold "
                      f"{share:.1%} of their random start after {updates} "
                      f"updates (about {need} make them useful): {out / 'model'} holds them, but `msf sample "
                      f"{out}` samples the raw weights of the last checkpoint until then", stacklevel=3)
    losses.logger.close()

    # -- the end: a last checkpoint, the EMA model directory, the losses
    if ckpts.saved_step != state.step:
        ckpts.save(state)
    result = TrainResult(
        pipeline=None, history=state.history, checkpoint=ckpts.last, seconds=seconds, steps=state.step,
        images_per_second=(state.step - start_step) * tc.batch_size / max(seconds, 1e-9),
        skipped=state.skipped, interrupted=interrupted, time_capped=time_capped, total_steps=total_steps,
        precision=tc.precision,
    )
    # Under FSDP the main process gathers whole weights; the others return none: shards kept past
    # the process group's end hold its threads, and the process aborted at exit (seen in about 1
    # full-suite run in 4).
    result.pipeline = _gathered(state.ema, cfg, world) if tc.fsdp else state.ema
    if save and world.is_main:
        result.model_dir = result.pipeline.save_pretrained(out / "model", extra={"train": to_dict(tc)})
        (out / "losses.json").write_text(json.dumps({str(k): v for k, v in state.history.items()}))
    if bad_files and world.is_main:
        _write_bad_files(bad_files, out if save else None, cfg.model.image_size)
    return result


def _honour_cap(bar, step: int, start_step: int, total_steps: int, elapsed: float,
                max_seconds: float) -> None:
    """Point the progress bar at the step the time cap will stop at, so its remaining time is right."""
    reach = start_step + int((step - start_step) * max_seconds / max(elapsed, 1e-9))
    if reach < total_steps:
        bar.total = max(reach, step + 1)
        bar.set_description(f"train (time cap: ~{bar.total} of {total_steps} steps)")
        bar.refresh()


def _write_bad_files(reads: list[str], out: Path | None, image_size: int) -> None:
    """Each unreadable file once, with why, in ``<out_dir>/unreadable_images.txt``; say where."""
    from msf.training.imagefolder import decode_problem

    files = list(dict.fromkeys(reads))
    where = f"first: {files[:5]}"
    if out is not None:
        lines = "".join(f"{f}\t{decode_problem(f, image_size) or 'readable now'}\n" for f in files)
        where = f"the list, with reasons: {atomic_write_text(out / 'unreadable_images.txt', lines)}"
    warnings.warn(f"{len(files)} unreadable image file(s) were replaced by their neighbours "
                  f"({len(reads)} reads); {where}", stacklevel=3)


class _Checkpoints:
    """The run's checkpoints: the newest to resume from, and saving (atomic, then pruned)."""

    def __init__(self, directory: Path, cfg: Config, world: World, enabled: bool):
        self.directory, self.cfg, self.world, self.enabled = directory, cfg, world, enabled
        self.last: Path | None = None  # the newest good checkpoint, for error messages and the result
        self.saved_step = -1

    def latest(self) -> tuple[dict, Path] | None:
        found = load_latest(self.directory)
        if found is None and self.world.is_main:
            print(f"[msf] no checkpoint in {self.directory}: starting from scratch", flush=True)
        if found is not None:
            self.last, self.saved_step = found[1], int(found[0]["step"])
        return found

    def save(self, state: TrainState) -> None:
        if not self.enabled:
            return
        if self.cfg.train.ckpt_format == "sharded":  # every process writes its own shards, none gathers
            meta = state.state_dict(sharded=True)
            tensors = {key: meta.pop(key) for key in ("models", "emas", "optimizers")}
            self.last = save_sharded_checkpoint(self.directory, state.step, tensors, {
                "config": to_dict(self.cfg), **meta, "world_size": self.world.size})
        else:
            full = state.state_dict()  # collective under FSDP: every process takes part
            if self.world.is_main:
                self.last = save_checkpoint(self.directory, state.step, {
                    "config": to_dict(self.cfg), **full, "world_size": self.world.size})
        if self.world.is_main:
            prune(self.directory, self.cfg.train.keep_last, self.cfg.train.keep_every)
        self.saved_step = state.step
        barrier(self.world)


DIVERGED_LOGS = 5  # logged losses whose median must exceed twice the first for a divergence warning


class _LossLog:
    """Per-scale losses summed on the device between logs (no wait on the host per step), then
    averaged over steps and processes into the history, the progress bar and TensorBoard."""

    def __init__(self, state: TrainState, scales: list[int], tc: TrainConfig, world: World, logger: _Logger):
        self.state, self.scales, self.tc, self.world, self.logger = state, scales, tc, world, logger
        self.running = torch.zeros(len(scales), dtype=torch.float64, device=world.device)
        self.count = 0
        self.grad_norms: dict[int, torch.Tensor] = {}
        self.warned: set[int] = set()

    def add(self, result: StepResult) -> None:
        self.running += torch.stack([result.losses[k].double() if k in result.losses
                                     else self.running.new_zeros(()) for k in self.scales])
        self.count += 1
        self.grad_norms |= result.grad_norms

    def write(self, step: int, active: list[int], rate: float) -> dict[str, str]:
        mean = mean_over_ranks(self.running / self.count, self.world).cpu()
        for i, k in enumerate(self.scales):
            if k in active:
                self.state.history[k].append((step, float(mean[i])))
        self.running.zero_()
        self.count = 0
        last = {k: self.state.history[k][-1][1] for k in active}
        self._warn_if_diverged(step, active)
        lr = {f"lr/scale{k}": learning_rate(self.tc, step, self.tc.steps_for(k)) for k in active}
        self.logger.scalars(step, {f"loss/scale{k}": v for k, v in last.items()}
                            | {f"grad_norm/scale{k}": float(self.grad_norms.get(k, 0.0)) for k in active}
                            | lr | {"images_per_second": rate})
        return {f"loss{k}": f"{v:.4f}" for k, v in last.items()} | {"img/s": f"{rate:.0f}"}

    def _warn_if_diverged(self, step: int, active: list[int]) -> None:
        # a flow-matching loss falls from its first value in a healthy run; staying above twice that is
        # divergence (at lr 8e-3 the demo's base went from 2.4 to 675 with finite values, which nothing
        # else reports). The median of the last logs, not the last: a long run's loss can spike for a
        # window and come back (demo's residual, 45 minutes: a narrow band of small t, docs/compare_emoji.md)
        for k in active:
            h = self.state.history[k]
            recent = sorted(v for _, v in h[1:][-DIVERGED_LOGS:])
            if k in self.warned or len(recent) < DIVERGED_LOGS or not recent[len(recent) // 2] > 2 * h[0][1]:
                continue
            self.warned.add(k)
            if self.world.is_main:
                warnings.warn(
                    f"scale {k}'s loss has stayed above twice its first ({h[0][1]:.3g} at step {h[0][0]}): "
                    f"median {recent[len(recent) // 2]:.3g} over the {DIVERGED_LOGS} logs to step {step}. "
                    f"Training looks diverged: lower train.lr (now {self.tc.lr}) and start again, or resume "
                    "from a checkpoint saved before the rise", stacklevel=2)


def _nonfinite(result: StepResult, step: int, tc: TrainConfig, last_ckpt: Path | None) -> None:
    """Stop with a message that says what to do (``train.on_nonfinite=stop``), or let the step be skipped."""
    if tc.on_nonfinite == "stop":
        bad = [k for k, v in result.losses.items() if not torch.isfinite(v)]
        where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
        raise FloatingPointError(
            f"non-finite loss at step {step} (scale(s) {bad or 'on another process'}){where}. "
            f"Lower train.lr (now {tc.lr}), check the data, or set train.on_nonfinite=skip"
        )


RUN_FILES = ("checkpoints", "model", "samples", "tb", "losses.json", "config.json", "unreadable_images.txt")


def _claim_run_directory(out: Path, world: World, overwrite: bool) -> None:
    """A fresh run never mixes with an earlier one: refuse the directory, or delete that run first."""
    found = [out / name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return
    if not overwrite:
        raise ConfigError(
            f"{out}: holds an earlier run ({', '.join(p.name for p in found)}). Continue it with --resume, "
            "train into another train.out_dir, or pass --overwrite to delete that run first"
        )
    if world.is_main:
        for p in found:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    barrier(world)


def _open_data(cfg: Config, data) -> TrainingData:
    """The training data (``train.data`` unless given); fills in ``model.class_names`` from it
    when the config has none and the class counts agree."""
    tc = cfg.train
    data = TrainingData(load_dataset(tc.data, cfg.model.image_size, tc.strict_data) if data is None else data,
                        cfg.model.image_size)
    m, names = cfg.model, data.class_names
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    if data.num_classes != m.num_classes:
        raise ConfigError(
            f"train.data={tc.data}: {data.num_classes} classes ({shown}), but model.num_classes="
            f"{m.num_classes}: set model.num_classes={data.num_classes} (and model.class_names=null)"
        )
    if m.class_names is None:
        m.class_names = list(names)
    elif data.names_given and list(m.class_names) != list(names):
        raise ConfigError(
            f"train.data={tc.data}: its classes are {shown}, but model.class_names are "
            f"{', '.join(m.class_names[:3])}, ...: set model.class_names=null to take the data's names"
        )
    if data.kind == "latents":
        data.source.check_model(cfg)
    return data


def _repa_depth(cfg: Config, k: int) -> int:
    d = cfg.train.repa_depth
    return default_depth(cfg.model.scales[k].depth) if d is None else d[k]


def _repa_parts(cfg: Config, pipe: MSFPipeline, scales: list[int], dev: torch.device
                ) -> tuple[nn.Module, dict[int, nn.Module]]:
    """REPA's frozen encoder, and a projector for each trained scale with a block to align."""
    encoder = load_encoder(cfg.train.repa_encoder).to(dev)
    projectors = {}
    for k in scales:
        if not _repa_depth(cfg, k):
            continue
        if not isinstance(pipe.networks[k], DiT):
            raise ConfigError(f"train.repa_encoder: scale {k}'s network is not msf's DiT, which REPA reads "
                              "its tokens from; set train.repa_depth to 0 for that scale")
        projectors[k] = Projector(cfg.model.scales[k].width, cfg.train.repa_projector, encoder.dim).to(dev)
    return encoder, projectors


def _repa_terms(state: TrainState, images: torch.Tensor | None, active: list[int], tc: TrainConfig
                ) -> dict[int, Callable[[torch.Tensor], torch.Tensor]] | None:
    """Per aligned scale, REPA's term as a function of its projected tokens (None without REPA)."""
    if state.encoder is None:
        return None
    feats = state.encoder(images)

    def term(grid: int) -> Callable[[torch.Tensor], torch.Tensor]:
        target = pooled(feats, grid)
        return lambda z: tc.repa_weight * alignment_loss(z, target)

    return {k: term(state.pipe.networks[k].grid) for k in active if k in state.projectors}


def _wrap(net: nn.Module, tc: TrainConfig, world: World) -> nn.Module:
    """What the step calls for a scale's network: DDP across processes (FSDP shards in place), compiled."""
    if world.distributed and not tc.fsdp:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[world.device.index] if world.device.type == "cuda" else None,
            gradient_as_bucket_view=True)  # the gradients live in the buckets: one copy, not two
    # static shapes: the scales' networks share DiT.forward, so the second scale's other token grid would
    # otherwise recompile it with symbolic sizes; this way each scale compiles once, for its own sizes
    return torch.compile(net, dynamic=False) if tc.compile else net


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _busy_cpus(window: float = 0.3) -> float | None:
    """How many CPUs other processes keep busy now (from /proc/stat over ``window`` seconds, minus our
    own use); None where that cannot be read. Not the load average: it lags by a minute, and would
    blame, say, the install that ran just before."""
    def sample() -> tuple[float, float, float]:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = [float(v) for v in Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:13]]
        return sum(fields), fields[3] + fields[4], sum(own)  # all, idle + iowait, our user + system

    try:
        before = sample()
        time.sleep(window)
        return _others_busy(before, sample(), _cpus())
    except (OSError, ValueError, IndexError):
        return None


def _others_busy(before: tuple[float, float, float], after: tuple[float, float, float], cpus: int
                 ) -> float | None:
    """CPUs busy with other processes between two (all, idle, own) tick counts."""
    total, idle, own = (b - a for a, b in zip(before, after))
    if total <= 0:
        return None
    return max(0.0, (total - idle - own) / total * cpus)


def _warn_if_oversubscribed(world: World) -> None:
    """On a busy CPU machine, several threads per process spin waiting for cores: say so, and what to set."""
    if world.device.type != "cpu" or not world.is_main or torch.get_num_threads() < 2:
        return
    threads, cpus, load = torch.get_num_threads(), _cpus(), _busy_cpus()
    if load is not None and load + threads * world.size > cpus + 0.5:
        warnings.warn(
            f"the machine is busy ({load:.1f} of {cpus} CPUs in use by other processes) and each of the "
            f"{world.size} training process(es) uses {threads} threads: threads then spin waiting for a "
            "core, and a step can run many times slower (0.1 s -> 9 s seen on 2 cores). When sharing the "
            "machine, set OMP_NUM_THREADS=1 (docs/benchmarks.md, 'On a shared machine')", stacklevel=4)


def _workers(configured: int | None) -> int:
    """``train.num_workers``, or by default one fewer than the CPUs this process may use (at most 4):
    PyTorch warns when more loader processes than CPUs compete with the training step."""
    if configured is not None:
        return configured
    return max(0, min(4, _cpus() - 1))


def _report_bad_files(bad: list[str], seen: list[str], world: World) -> None:
    if not seen and world.is_main:
        warnings.warn(f"unreadable images skipped (first: {bad[:3]}); "
                      "set train.strict_data=true to stop instead", stacklevel=3)
    seen += bad


def _measure_std(pipe: MSFPipeline, data: TrainingData, seed: int, dev, bad_files: list[str]) -> list[float]:
    """Per-scale std of the components of 1,024 random training examples (``normalize=std``)."""
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:1024]
    inputs, _, bad = data.batch(pick, torch.zeros(len(pick), dtype=torch.bool))
    bad_files += bad
    if data.kind == "latents":
        z, base = inputs
        return pipe.measure_component_std(latents=(z.to(dev), None if base is None else base.to(dev)))
    return pipe.measure_component_std(inputs.to(dev))


def _load_other_scales(pipe: MSFPipeline, cfg: Config, scales: list[int], src: Path) -> None:
    """Take the scales this job does not train from another run's model directory.

    This is how per-scale jobs meet: train scale 0 in one job, then scale 1 with
    ``train.other_scales_from=<scale-0 run>/model``, and the second run's model
    directory holds both.
    """
    other = MSFPipeline.from_pretrained(src, autoencoder=pipe.autoencoder)
    a, b = to_dict(cfg.model), to_dict(other.config)
    for key in ("num_classes", "autoencoder", "base_mode", "prior", "normalize"):
        if a[key] != b[key]:
            raise ConfigError(f"train.other_scales_from={src}: model.{key} is {b[key]!r} there, "
                              f"{a[key]!r} here")
    if [s["image_size"] for s in a["scales"]] != [s["image_size"] for s in b["scales"]]:
        raise ConfigError(f"train.other_scales_from={src}: its scale sizes differ from this run's")
    for k in range(pipe.num_scales):
        if k not in scales:
            if a["scales"][k] != b["scales"][k]:
                raise ConfigError(f"train.other_scales_from={src}: scale {k} differs "
                                  f"({b['scales'][k]} there, {a['scales'][k]} here)")
            pipe.networks[k].load_state_dict(other.networks[k].state_dict())
    if cfg.model.normalize == "std" and other.config.component_std != cfg.model.component_std:
        raise ConfigError(f"train.other_scales_from={src}: its component_std "
                          f"{other.config.component_std} differs from this run's "
                          f"{cfg.model.component_std} (different data or seed?)")


def _gathered(ema: MSFPipeline, cfg: Config, world: World) -> MSFPipeline | None:
    """The EMA pipeline with whole (unsharded) weights, on the main process; None elsewhere.

    Without FSDP that is ``ema`` itself; with FSDP the shards are gathered (collective).
    """
    if not cfg.train.fsdp:
        return ema if world.is_main else None
    states = [get_model_state_dict(s, options=_FULL) for s in ema.networks]
    if not world.is_main:
        return None
    plain = MSFPipeline(cfg.model, autoencoder=ema.autoencoder)
    for net, st in zip(plain.networks, states):
        net.load_state_dict(st)
    return plain.to(world.device).requires_grad_(False).eval()


def _sample_grid(pipe: MSFPipeline, path: Path) -> Path:
    from msf.interfaces.viz import save_sample_grid

    n = min(pipe.config.num_classes, 10)
    labels = [c for c in range(n) for _ in range(4)]
    images = pipe.sample(labels, seed=0, precision="auto")
    return save_sample_grid(images, labels, pipe.config.class_names, path)
