"""Training: all scales at once or one alone, one process or many, resumable exactly.

Under teacher forcing (Algorithm 2) the scales are independent: each has its own
network, optimizer, EMA, learning-rate schedule and step count, and a job that
trains only scale k computes exactly what scale k sees in an all-scales job (an
all-scales job shares one batch of images, and one encode, between the scales).

Everything random in a step (which images, flips, times, noise, label dropout) is
a pure function of (seed, step): see ``msf.data.IndexStream`` and
``msf.flow.StepNoise``. So a run resumed from a checkpoint continues exactly as
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

import json
import math
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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

from msf.checkpoint import CheckpointError, load_latest, prune, save_checkpoint
from msf.config import Config, ConfigError, TrainConfig, from_dict, to_dict, validate
from msf.data import (
    ImageDataset,
    IndexStream,
    iterate_batches,
    load_dataset,
    prepare_data,
    to_model_range,
)
from msf.distributed import World, any_rank, barrier, close_world, init_world, mean_over_ranks
from msf.flow import StepNoise
from msf.latent_cache import LatentCache
from msf.pipeline import MSFPipeline, autocast

# Train-config fields that may change on resume without changing what the run computes.
RESUMABLE_CHANGES = {
    "steps", "scale_steps", "log_every", "ckpt_every", "keep_last", "keep_every", "out_dir",
    "num_workers", "tensorboard", "sample_every", "on_nonfinite", "compile", "grad_checkpointing",
    "data", "strict_data", "fsdp",
}


@dataclass
class TrainResult:
    pipeline: MSFPipeline  # holds the EMA weights
    history: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # k -> (step, loss)
    model_dir: Path | None = None
    checkpoint: Path | None = None
    seconds: float = 0.0
    steps: int = 0  # the last completed step
    images_per_second: float = 0.0
    skipped: int = 0  # steps skipped for a non-finite loss (train.on_nonfinite=skip)
    interrupted: bool = False  # stopped by Ctrl-C / SIGTERM, after saving a checkpoint


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP parameter (a DTensor), or the tensor itself."""
    return p.to_local() if hasattr(p, "to_local") else p


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """EMA of the weights; under FSDP each process updates its own shard."""
    torch._foreach_lerp_([_local(p) for p in ema.parameters()],
                         [_local(p.detach()) for p in model.parameters()], 1.0 - decay)


def shard(net: nn.Module) -> None:
    """FSDP2: shard each transformer block, then the rest of the network."""
    from torch.distributed.fsdp import fully_shard

    for block in net.blocks:
        fully_shard(block)
    fully_shard(net)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def trained_scales(cfg: Config) -> list[int]:
    if cfg.train.scale == "all":
        return list(range(cfg.model.num_scales))
    return [int(cfg.train.scale)]


def learning_rate(t: TrainConfig, step: int, total: int) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio * lr`` at ``total``."""
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    if t.lr_schedule == "cosine":
        span = max(1, total - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return t.lr


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


def _check_resume(cfg: Config, saved: Config, path: Path) -> None:
    """A checkpoint must belong to this model; train changes that alter the run are warned about."""
    a, b = to_dict(cfg.model), to_dict(saved.model)
    a["component_std"] = b["component_std"] = None
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


class _Logger:
    """TensorBoard scalars and images on the main process, if tensorboard is installed."""

    def __init__(self, out: Path, enabled: bool):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("tensorboard is not installed: no TensorBoard logs "
                          "(pip install tensorboard, or set train.tensorboard=false)", stacklevel=3)
            return
        self.writer = SummaryWriter(str(out / "tb"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def image(self, step: int, tag: str, path: Path) -> None:
        if self.writer:
            import numpy as np
            from PIL import Image

            self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step,
                                  dataformats="HWC")

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def train(
    cfg: Config,
    *,
    data=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_seconds: float | None = None,
    save: bool = True,
    resume: bool = False,
) -> TrainResult:
    """Train ``cfg``; checkpoints in ``<out_dir>/checkpoints``, the EMA pipeline in ``<out_dir>/model``.

    ``device``: "cpu", "cuda", or None for CUDA when available. ``resume`` continues
    from the newest checkpoint in the run directory (or starts fresh, saying so,
    when there is none). ``max_seconds`` stops early at a step
    boundary. Under torchrun every process calls this; the main one writes files.
    """
    validate(cfg)
    t = cfg.train
    world = init_world(None if device is None else str(device))
    try:
        return _train(cfg, t, world, data, progress, max_seconds, save, resume)
    finally:
        close_world(world)


def _train(cfg: Config, t: TrainConfig, world: World, data, progress: bool,
           max_seconds: float | None, save: bool, resume: bool) -> TrainResult:
    dev = world.device
    if t.batch_size % world.size:
        raise ConfigError(f"train.batch_size={t.batch_size} (global) is not divisible by the "
                          f"{world.size} processes")
    out = Path(t.out_dir)
    ckpt_dir = out / "checkpoints"

    state, state_path = None, None
    if resume:
        found = load_latest(ckpt_dir)
        if found is None:
            if world.is_main:
                print(f"[msf] no checkpoint in {ckpt_dir}: starting from scratch", flush=True)
        else:
            state, state_path = found
            saved = from_dict(Config, state["config"], "checkpoint config")
            _check_resume(cfg, saved, state_path)
            cfg.model.component_std = saved.model.component_std

    data = load_dataset(t.data, cfg.model.image_size, t.strict_data) if data is None else data
    if data.num_classes > cfg.model.num_classes:
        raise ConfigError(
            f"data has {data.num_classes} classes but model.num_classes={cfg.model.num_classes}"
        )
    if cfg.model.class_names is None and data.num_classes == cfg.model.num_classes:
        cfg.model.class_names = list(data.class_names)
    if isinstance(data, ImageDataset):
        data = prepare_data(data, cfg.model.image_size)
    if isinstance(data, LatentCache):
        data.check_model(cfg)

    bad_files: list[str] = []
    torch.manual_seed(t.seed)  # the same initial weights on every process
    pipe = MSFPipeline(cfg.model).to(dev)
    if cfg.model.normalize == "std" and cfg.model.component_std is None:
        cfg.model.component_std = _measure_std(pipe, data, t.seed, dev, bad_files)
    pipe.config = cfg.model

    scales = trained_scales(cfg)
    if t.other_scales_from and state is None:
        _load_other_scales(pipe, cfg, scales, Path(t.other_scales_from))
    for k in scales:
        pipe.scales[k].grad_checkpointing = t.grad_checkpointing
    ema = MSFPipeline(cfg.model, autoencoder=pipe.autoencoder).to(dev)  # shares the autoencoder
    ema.scales.load_state_dict(pipe.scales.state_dict())
    ema.requires_grad_(False).eval()
    if t.fsdp:
        if not world.distributed:
            raise ConfigError("train.fsdp=true needs several processes: launch with torchrun")
        for k in scales:
            shard(pipe.scales[k])
            shard(ema.scales[k])
    opts = {
        k: torch.optim.AdamW(pipe.scales[k].parameters(), lr=t.lr, betas=tuple(t.betas),
                             weight_decay=t.weight_decay)
        for k in scales
    }
    history: dict[int, list[tuple[int, float]]] = {k: [] for k in scales}
    start_step, skipped = 0, 0
    if state is not None:
        load = StateDictOptions(full_state_dict=True)
        for k in range(pipe.num_scales):
            set_model_state_dict(pipe.scales[k], state["models"][str(k)], options=load)
            set_model_state_dict(ema.scales[k], state["emas"][str(k)], options=load)
        for k in scales:
            set_optimizer_state_dict(pipe.scales[k], opts[k], state["optimizers"][str(k)],
                                     options=load)
        history = {int(k): [tuple(p) for p in v] for k, v in state["history"].items()}
        start_step, skipped = int(state["step"]), int(state.get("skipped", 0))

    nets: dict[int, nn.Module] = {}
    for k in scales:
        net: nn.Module = pipe.scales[k]
        if world.distributed and not t.fsdp:
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        if t.compile:
            net = torch.compile(net)
        nets[k] = net

    total_steps = max(t.steps_for(k) for k in scales)
    stream = IndexStream(data.labels, t.batch_size, seed=t.seed, balance_classes=t.balance_classes)
    logger = _Logger(out, t.tensorboard and world.is_main and save)
    if save and world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    saved_step = start_step if state is not None else -1

    def checkpoint(step: int) -> Path | None:
        nonlocal saved_step
        if not save:
            return None
        saved_step, path = step, None
        # Gathering full state dicts is collective under FSDP: every process takes part.
        models = {str(k): get_model_state_dict(s, options=_FULL) for k, s in enumerate(pipe.scales)}
        emas = {str(k): get_model_state_dict(s, options=_FULL) for k, s in enumerate(ema.scales)}
        optims = {str(k): get_optimizer_state_dict(pipe.scales[k], o, options=_FULL)
                  for k, o in opts.items()}
        if world.is_main:
            path = save_checkpoint(ckpt_dir, step, {
                "config": to_dict(cfg),
                "models": models,
                "emas": emas,
                "optimizers": optims,
                "history": {str(k): [list(p) for p in v] for k, v in history.items()},
                "skipped": skipped,
                "world_size": world.size,
            })
            prune(ckpt_dir, t.keep_last, t.keep_every)
        barrier(world)
        return path

    running = torch.zeros(len(scales), dtype=torch.float64)
    n_running, grad_norms = 0, {k: 0.0 for k in scales}
    stop = StopRequest()
    step, last_ckpt, interrupted = start_step, state_path, False
    bar = tqdm(total=total_steps, initial=start_step, disable=not (progress and world.is_main),
               desc="train", dynamic_ncols=True)
    started = time.perf_counter()
    pipe.train()
    with stop.installed():
        batches = iterate_batches(data, stream, start_step + 1, total_steps, rank=world.rank,
                                  world=world.size, num_workers=t.num_workers)
        for step, x, y, bad in batches:
            if bad:
                first = not bad_files
                bad_files += bad
                if first and world.is_main:
                    warnings.warn(f"unreadable images skipped (first: {bad[:3]}); "
                                  "set train.strict_data=true to stop instead", stacklevel=2)
            active = [k for k in scales if step <= t.steps_for(k)]
            if isinstance(x, tuple):  # (z, base) from the latent cache
                latents = tuple(None if v is None else v.to(dev, non_blocking=True) for v in x)
                x = None
            else:
                latents, x = None, x.to(dev, non_blocking=True)
            with autocast(dev, t.precision):
                losses = pipe.training_losses(
                    x, y.to(dev), active, latents=latents, class_dropout=t.class_dropout,
                    time_sampler=t.time_sampler, logit_mean=t.logit_mean, logit_std=t.logit_std,
                    noise=StepNoise(t.seed, step, world.rank, world.size), nets=nets,
                )
            total = sum(losses.values())
            if any_rank(not bool(torch.isfinite(total)), world):
                bad_k = [k for k, v in losses.items() if not torch.isfinite(v)]
                if t.on_nonfinite == "stop":
                    where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
                    raise FloatingPointError(
                        f"non-finite loss at step {step} (scale(s) {bad_k or 'on another process'})"
                        f"{where}. Lower train.lr (now {t.lr}), check the data, or set "
                        "train.on_nonfinite=skip"
                    )
                skipped += 1
                for k in active:
                    opts[k].zero_grad(set_to_none=True)
                bar.update(1)
                continue
            total.backward()
            for k in active:
                if t.grad_clip > 0:
                    grad_norms[k] = float(torch.nn.utils.clip_grad_norm_(
                        pipe.scales[k].parameters(), t.grad_clip))
                for g in opts[k].param_groups:
                    g["lr"] = learning_rate(t, step, t.steps_for(k))
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
                ema_update(ema.scales[k], pipe.scales[k], t.ema_decay)
            running += torch.tensor([losses[k].item() if k in losses else 0.0 for k in scales],
                                    dtype=torch.float64)
            n_running += 1

            if step % t.log_every == 0 or step == total_steps:
                mean = mean_over_ranks((running / n_running).to(dev), world).cpu()
                for i, k in enumerate(scales):
                    if k in active:
                        history[k].append((step, float(mean[i])))
                running.zero_()
                n_running = 0
                rate = (step - start_step) * t.batch_size / (time.perf_counter() - started)
                bar.set_postfix({f"loss{k}": f"{history[k][-1][1]:.4f}" for k in active}
                                | {"img/s": f"{rate:.0f}"})
                logger.scalars(step, {f"loss/scale{k}": history[k][-1][1] for k in active}
                               | {f"grad_norm/scale{k}": grad_norms[k] for k in active}
                               | {f"lr/scale{k}": learning_rate(t, step, t.steps_for(k)) for k in active}
                               | {"images_per_second": rate})
            if t.sample_every and step % t.sample_every == 0 and save:
                plain = _gathered(ema, cfg, world)
                if plain is not None:
                    path = _sample_grid(plain, out / "samples" / f"step_{step:09d}.png", dev)
                    logger.image(step, "samples", path)
            if t.ckpt_every and step % t.ckpt_every == 0:
                last_ckpt = checkpoint(step)
            bar.update(1)
            out_of_time = max_seconds is not None and time.perf_counter() - started > max_seconds
            if any_rank(stop.requested, world) or out_of_time:
                interrupted = stop.requested
                break
    bar.close()
    seconds = time.perf_counter() - started
    logger.close()

    if save and saved_step != step:
        last_ckpt = checkpoint(step)
    if t.fsdp:
        ema = _gathered(ema, cfg, world) or ema
    result = TrainResult(
        pipeline=ema, history=history, checkpoint=last_ckpt, seconds=seconds, steps=step,
        images_per_second=(step - start_step) * t.batch_size / max(seconds, 1e-9),
        skipped=skipped, interrupted=interrupted,
    )
    if save and world.is_main:
        result.model_dir = ema.save_pretrained(out / "model", extra={"train": to_dict(t)})
        (out / "losses.json").write_text(json.dumps({str(k): v for k, v in history.items()}))
    if bad_files and world.is_main:
        warnings.warn(f"{len(bad_files)} unreadable image reads were replaced by their neighbours; "
                      f"first: {bad_files[:5]}", stacklevel=2)
    return result


def _measure_std(pipe: MSFPipeline, data, seed: int, dev, bad_files: list[str]) -> list[float]:
    """Per-scale std of the components of 1,024 random training examples (``normalize=std``)."""
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:1024]
    if isinstance(data, LatentCache):
        z, base = data.get(pick, torch.zeros(len(pick), dtype=torch.bool))
        return pipe.measure_component_std(latents=(z.to(dev), None if base is None else base.to(dev)))
    if isinstance(data, ImageDataset):
        images = data.images[pick]
    else:
        items = [data[int(i)] for i in pick]
        images = torch.stack([it[0] for it in items])
        bad_files += [it[2] for it in items if it[2]]
    return pipe.measure_component_std(to_model_range(images).to(dev))


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
            pipe.scales[k].load_state_dict(other.scales[k].state_dict())
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
    states = [get_model_state_dict(s, options=_FULL) for s in ema.scales]
    if not world.is_main:
        return None
    plain = MSFPipeline(cfg.model, autoencoder=ema.autoencoder)
    for net, st in zip(plain.scales, states):
        net.load_state_dict(st)
    return plain.to(world.device).requires_grad_(False).eval()


def _sample_grid(pipe: MSFPipeline, path: Path, device) -> Path:
    from msf.viz import save_sample_grid

    n = min(pipe.config.num_classes, 10)
    labels = [c for c in range(n) for _ in range(4)]
    images = pipe.sample(labels, seed=0, precision="bf16" if device.type != "cpu" else "fp32")
    return save_sample_grid(images, labels, pipe.config.class_names, path)
