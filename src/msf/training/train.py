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

import copy
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from msf.config import Config, ConfigError, TrainConfig, to_dict, validate
from msf.method.flow import LossSettings, StepNoise
from msf.method.pipeline import MSFPipeline, autocast
from msf.precision import resolve_precision
from msf.training import run_log
from msf.training.checkpoint import (
    Checkpoints,
    claim_run_directory,
    load_network_states,
    network_states,
    take_initial_weights,
    take_other_scales,
)
from msf.training.data import (
    ImageDataset,
    IndexStream,
    TrainingData,
    iterate_batches,
    on_device,
    open_training_data,
)
from msf.training.distributed import (
    StopRequest,
    World,
    any_rank,
    close_world,
    gathered,
    init_world,
    shard_scales,
    wrap,
)
from msf.training.repa import alignment_terms, encoder_and_projectors, with_projector

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from msf.training.imagefolder import ImageFolder
    from msf.training.latent_cache import LatentCache


@dataclass
class TrainResult:
    """What :func:`train` returns: the EMA model, the loss history, where the run left its files, and how
    it ended."""

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


def trained_scales(cfg: Config) -> list[int]:
    """The scales this job trains: all, or the one ``train.scale`` names."""
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
    def create(cls, cfg: Config, world: World, data, bad_files: list[str], fresh: bool = True,
               autoencoder: nn.Module | None = None, networks: list[nn.Module] | None = None) -> TrainState:
        """Fresh networks (seeded; or the caller's), the EMA as their copy, FSDP shards, one AdamW per
        trained scale. ``fresh``: a run's start, which takes ``train.init_from``'s and
        ``train.other_scales_from``'s weights (a resumed run takes its checkpoint's instead).

        With ``model.normalize=std`` and no ``model.component_std`` yet, the std is measured on
        ``data`` here and written into ``cfg`` (the run's own copy), before the EMA copies the config.
        """
        tc, scales = cfg.train, trained_scales(cfg)
        torch.manual_seed(tc.seed)  # the same initial weights on every process
        own = None if networks is None else copy.deepcopy(list(networks))
        pipe = MSFPipeline(cfg.model, autoencoder=autoencoder, networks=own).to(world.device)
        if fresh and tc.init_from:  # before the std is measured: the weights come with theirs
            said = take_initial_weights(pipe, cfg, tc.init_from)
            if world.is_main:
                print(f"[msf] {said}", flush=True)
        if cfg.model.normalize == "std" and cfg.model.component_std is None:
            cfg.model.component_std = _measure_std(pipe, data, tc.seed, world.device, bad_files)
        pipe.config = cfg.model
        if fresh and tc.other_scales_from:
            take_other_scales(pipe, cfg, scales, Path(tc.other_scales_from))
        for k in scales:
            pipe.networks[k].grad_checkpointing = tc.grad_checkpointing
        ema = MSFPipeline(cfg.model, autoencoder=pipe.autoencoder,
                          networks=None if networks is None else copy.deepcopy(list(pipe.networks))
                          ).to(world.device)
        ema.networks.load_state_dict(pipe.networks.state_dict())
        ema.requires_grad_(False).eval()
        if tc.fsdp:
            shard_scales(pipe.networks, ema.networks, scales, tc.precision, world)
        fused = world.device.type == "cuda"  # one kernel per step on the GPU; the CPU keeps foreach
        def adamw(params):
            return torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                                     fused=fused or None)

        opts = {k: adamw(pipe.networks[k].parameters()) for k in scales}
        state = cls(step=0, pipe=pipe, ema=ema, opts=opts, history={k: [] for k in scales})
        if tc.repa_encoder:  # after the networks, so that their initial weights do not change
            state.encoder, state.projectors = encoder_and_projectors(cfg, pipe.networks, scales, world.device)
            state.projector_opts = {k: adamw(p.parameters()) for k, p in state.projectors.items()}
        pipe.train()
        return state

    def state_dict(self, sharded: bool = False) -> dict:
        """Full (unsharded) state dicts on the CPU; collective under FSDP: every process calls it.

        ``sharded``: this process's own tensors instead, nothing gathered or copied (FSDP's DTensor
        shards; without FSDP the weights themselves), for DCP to save or to load into in place.
        """
        return network_states(self.pipe.networks, self.ema.networks, self.opts, sharded) | {
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
        load_network_states(self.pipe.networks, self.ema.networks, self.opts, state)
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
        grids = {k: state.pipe.networks[k].grid for k in active if k in state.projectors}
        align = alignment_terms(state.encoder, images, grids, tc.repa_weight)  # REPA's terms, or None
        losses = state.pipe.training_losses(
            images, labels, active, settings=LossSettings.of(tc, state.pipe.config), latents=latents,
            noise=StepNoise(tc.seed, step, world.rank, world.size), nets=nets, align=align,
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

    Extension points: ``data`` replaces ``train.data`` (anything :class:`.data.TrainingData` takes: a
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
        if cfg.train.batch_size % world.size:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} (global) is not divisible by the "
                              f"{world.size} processes")
        if save and not resume:
            claim_run_directory(Path(cfg.train.out_dir), world, overwrite)
        if cfg.train.deterministic:
            # cuBLAS needs a fixed workspace for deterministic products; set before its first use
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        with run_log.printed_to(Path(cfg.train.out_dir) / "log.txt" if save and world.is_main else None):
            return _run(copy.deepcopy(cfg), world, data, progress, max_seconds, save, resume,
                        autoencoder=autoencoder, networks=networks)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        close_world(world)


def _run(cfg: Config, world: World, data, progress: bool, max_seconds: float | None, save: bool,
         resume: bool, autoencoder: nn.Module | None = None, networks: list[nn.Module] | None = None
         ) -> TrainResult:
    tc, dev, out = cfg.train, world.device, Path(cfg.train.out_dir)
    requested = tc.precision  # "auto" made concrete: config.json keeps what was asked, the rest what ran
    tc.precision = resolve_precision(requested, dev, what="train.precision", say=progress and world.is_main)
    run_log.warn_if_oversubscribed(world)

    # -- setup: the data (it completes the model config); networks, EMA, optimizers, or the checkpoint's
    data, bad_files = open_training_data(cfg, data, world=world, progress=progress and world.is_main), []
    ckpts = Checkpoints(out / "checkpoints", cfg, world, save)
    found = ckpts.latest() if resume else None  # checked against this run's config
    state = TrainState.create(cfg, world, data, bad_files, fresh=found is None,
                              autoencoder=autoencoder, networks=networks)
    if found is not None:
        state.load_state_dict(found[0])
    scales = trained_scales(cfg)
    nets = {k: wrap(with_projector(state.pipe.networks[k], state.projectors.get(k), cfg, k), tc, world)
            for k in scales}  # what the step calls: with REPA's projector, under DDP, compiled
    ckpts.save_config(requested)

    # -- the loop: a batch, a step, then the log line, sample grid, quality check and checkpoint when due
    total_steps, start_step = max(tc.steps_for(k) for k in scales), state.step
    stream = IndexStream(data.labels, tc.batch_size, seed=tc.seed, balance_classes=tc.balance_classes,
                         flip=tc.random_flip)
    bar = run_log.ProgressBar(progress and world.is_main, start_step, total_steps, max_seconds, world,
                              tc.precision)
    log = run_log.RunLog(cfg, world, state.history, state.opts, start_step, enabled=world.is_main and save)
    stop, interrupted, time_capped, started = StopRequest(), False, False, time.perf_counter()
    with stop.installed():
        for step, x, y, bad in iterate_batches(data, stream, start_step + 1, total_steps,
                                               **_loading(tc, world)):
            run_log.report_bad_files(bad, bad_files, world)
            out_of_time = max_seconds is not None and time.perf_counter() - started > max_seconds
            result = train_step(state, on_device(x, y, dev), tc, nets, world, stop.requested or out_of_time)
            if not result.finite:
                _nonfinite(result, step, tc, ckpts.last)
                state.skipped += 1
            else:
                log.add(result.losses, result.grad_norms)
                if step % tc.log_every == 0 or step == total_steps:
                    bar.log(step, log.write(step, list(result.losses)), time.perf_counter() - started)
                if save and tc.sample_every and step % tc.sample_every == 0:
                    log.samples(step, gathered(state.ema, cfg, world))
                if save and tc.eval_every and step % tc.eval_every == 0:
                    log.quality(step, gathered(state.ema, cfg, world))
                if tc.ckpt_every and step % tc.ckpt_every == 0:
                    ckpts.save(state)
            bar.advance()
            if result.stop:
                interrupted = stop.requested
                time_capped = out_of_time and not interrupted and state.step < total_steps
                break
    seconds = time.perf_counter() - started
    bar.close(interrupted, time_capped, state.step)
    _warn_if_ema_young(cfg, world, state.step, start_step, save)
    log.close()

    # -- the end: a last checkpoint, the EMA model directory, the losses. Under FSDP the main process gathers
    # whole weights and the others keep none: shards kept past the process group's end abort the exit
    if ckpts.saved_step != state.step:
        ckpts.save(state)
    result = TrainResult(
        pipeline=gathered(state.ema, cfg, world) if tc.fsdp else state.ema,
        history=state.history, checkpoint=ckpts.last, seconds=seconds, steps=state.step,
        images_per_second=(state.step - start_step) * tc.batch_size / max(seconds, 1e-9),
        skipped=state.skipped, interrupted=interrupted, time_capped=time_capped, total_steps=total_steps,
        precision=tc.precision)
    if save and world.is_main:
        result.model_dir = result.pipeline.save_pretrained(out / "model", extra={"train": to_dict(tc)})
        (out / "losses.json").write_text(json.dumps({str(k): v for k, v in state.history.items()}))
    if bad_files and world.is_main:
        run_log.write_bad_files(bad_files, out if save else None, cfg.model.image_size)
    return result


def _warn_if_ema_young(cfg: Config, world: World, step: int, start_step: int, save: bool) -> None:
    """Say so when the EMA weights are still mostly their random start (a short run)."""
    tc, out = cfg.train, Path(cfg.train.out_dir)
    share, updates = ema_start_share(cfg, step)
    if share > YOUNG_EMA and save and world.is_main and step > start_step:
        need = math.ceil(math.log(YOUNG_EMA) / math.log(tc.ema_decay)) if 0 < tc.ema_decay < 1 else 0
        warnings.warn(f"the EMA weights (train.ema_decay={tc.ema_decay:g}) still hold "
                      f"{share:.1%} of their random start after {updates} "
                      f"updates (about {need} make them useful): {out / 'model'} holds them, but `msf sample "
                      f"{out}` samples the raw weights of the last checkpoint until then", stacklevel=4)


def _nonfinite(result: StepResult, step: int, tc: TrainConfig, last_ckpt: Path | None) -> None:
    """Stop with a message that says what to do (``train.on_nonfinite=stop``), or let the step be skipped."""
    if tc.on_nonfinite == "stop":
        bad = [k for k, v in result.losses.items() if not torch.isfinite(v)]
        where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
        raise FloatingPointError(
            f"non-finite loss at step {step} (scale(s) {bad or 'on another process'}){where}. "
            f"Lower train.lr (now {tc.lr}), check the data, or set train.on_nonfinite=skip"
        )


def _loading(tc: TrainConfig, world: World) -> dict:
    """How this process loads its share of each batch: with ``train.num_workers`` loader processes, by
    default one fewer than the CPUs it may use (at most 4: PyTorch warns when more loader processes than
    CPUs compete with the step); on a GPU the next batch is loaded, and pinned, while the step runs."""
    workers = tc.num_workers if tc.num_workers is not None else max(0, min(4, run_log.cpus() - 1))
    gpu = world.device.type == "cuda"
    return dict(rank=world.rank, world=world.size, num_workers=workers, prefetch=2 if gpu else 0,
                pin_memory=gpu)


def _measure_std(pipe: MSFPipeline, data: TrainingData, seed: int, dev, bad_files: list[str]) -> list[float]:
    """Per-scale std of the components of 1,024 random training examples (``normalize=std``)."""
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:1024]
    inputs, _, bad = data.batch(pick, torch.zeros(len(pick), dtype=torch.bool))
    bad_files += bad
    if data.kind == "latents":
        z, base = inputs
        return pipe.measure_component_std(latents=(z.to(dev), None if base is None else base.to(dev)))
    return pipe.measure_component_std(inputs.to(dev))
