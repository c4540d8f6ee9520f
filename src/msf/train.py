"""Training in one process: all scales at once, or one scale alone.

Under teacher forcing (Algorithm 2) the scales are independent: each has its own
network, optimizer, EMA and step count, and a job that trains only scale k
computes exactly what scale k would see in an all-scales job. An all-scales job
shares one batch of images (one encode) between the scales.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from msf.config import Config, ConfigError, validate
from msf.data import BatchSampler, ImageDataset, load_dataset, to_model_range, to_uint8
from msf.factorize import resize_image
from msf.pipeline import MSFPipeline, autocast


@dataclass
class TrainResult:
    pipeline: MSFPipeline  # holds the EMA weights
    history: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # k -> (step, loss)
    model_dir: Path | None = None
    seconds: float = 0.0
    steps: int = 0
    images_per_second: float = 0.0


def prepare_data(data: ImageDataset, image_size: int) -> ImageDataset:
    """Resize a dataset once to the model's image size (antialiased), if it differs."""
    if data.image_size == image_size:
        return data
    x = resize_image(to_model_range(data.images), image_size)
    return ImageDataset(to_uint8(x), data.labels, data.class_names)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_p = list(ema.parameters())
    torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - decay)


def trained_scales(cfg: Config) -> list[int]:
    if cfg.train.scale == "all":
        return list(range(cfg.model.num_scales))
    return [int(cfg.train.scale)]


def train(
    cfg: Config,
    *,
    data: ImageDataset | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    max_seconds: float | None = None,
    save: bool = True,
) -> TrainResult:
    """Train ``cfg`` and save the EMA pipeline to ``<train.out_dir>/model``.

    ``max_seconds`` stops early (at a step boundary) once that much time has passed.
    """
    validate(cfg)
    t = cfg.train
    torch.manual_seed(t.seed)
    data = load_dataset(t.data) if data is None else data
    if data.num_classes > cfg.model.num_classes:
        raise ConfigError(
            f"data has {data.num_classes} classes but model.num_classes={cfg.model.num_classes}"
        )
    if cfg.model.class_names is None and data.num_classes == cfg.model.num_classes:
        cfg.model.class_names = list(data.class_names)
    data = prepare_data(data, cfg.model.image_size)

    pipe = MSFPipeline(cfg.model).to(device)
    if cfg.model.normalize == "std" and cfg.model.component_std is None:
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(t.seed))[:1024]
        probe = to_model_range(data.images[pick]).to(device)
        cfg.model.component_std = pipe.measure_component_std(probe)
    pipe.config = cfg.model

    scales = trained_scales(cfg)
    emas = {k: copy.deepcopy(pipe.scales[k]).requires_grad_(False) for k in scales}
    opts = {
        k: torch.optim.AdamW(
            pipe.scales[k].parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay
        )
        for k in scales
    }
    total_steps = max(t.steps_for(k) for k in scales)
    sampler = BatchSampler(data, t.batch_size, balance_classes=t.balance_classes, seed=t.seed)
    history: dict[int, list[tuple[int, float]]] = {k: [] for k in scales}
    running = {k: 0.0 for k in scales}
    n_running = 0

    pipe.train()
    start = time.perf_counter()
    bar = tqdm(total=total_steps, disable=not progress, desc="train", dynamic_ncols=True)
    step = 0
    for step in range(1, total_steps + 1):
        active = [k for k in scales if step <= t.steps_for(k)]
        lr = t.lr * min(1.0, step / t.warmup_steps) if t.warmup_steps else t.lr
        x, y = sampler.next()
        x, y = x.to(device), y.to(device)
        with autocast(device, t.precision):
            losses = pipe.training_losses(
                x, y, active, class_dropout=t.class_dropout, time_sampler=t.time_sampler,
                logit_mean=t.logit_mean, logit_std=t.logit_std,
            )
        for k, loss in losses.items():
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"scale {k}: loss is {loss.item()} at step {step}; lower train.lr "
                    f"(now {t.lr}) or check the data"
                )
        sum(losses.values()).backward()
        for k in active:
            params = list(pipe.scales[k].parameters())
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            for g in opts[k].param_groups:
                g["lr"] = lr
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            ema_update(emas[k], pipe.scales[k], t.ema_decay)
            running[k] += losses[k].item()
        n_running += 1
        if step % t.log_every == 0 or step == total_steps:
            for k in active:
                history[k].append((step, running[k] / n_running))
            running = {k: 0.0 for k in scales}
            n_running = 0
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                {f"loss{k}": f"{history[k][-1][1]:.4f}" for k in active}
                | {"img/s": f"{step * t.batch_size / elapsed:.0f}"}
            )
        bar.update(1)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    bar.close()
    seconds = time.perf_counter() - start

    for k in scales:
        pipe.scales[k].load_state_dict(emas[k].state_dict())
    pipe.eval()
    result = TrainResult(
        pipeline=pipe, history=history, seconds=seconds, steps=step,
        images_per_second=step * t.batch_size / max(seconds, 1e-9),
    )
    if save:
        out = Path(t.out_dir)
        result.model_dir = pipe.save_pretrained(
            out / "model", extra={"train": json.loads(json.dumps(cfg.train.__dict__))}
        )
        (out / "losses.json").write_text(json.dumps({str(k): v for k, v in history.items()}))
    return result
