"""Train a small KL autoencoder (diffusers' ``AutoencoderKL``) on msf's data: the latent space MSF
generates in, for domains no public VAE covers.

``msf train-autoencoder`` trains on the sources ``msf train`` reads (built-in sets, ``.npz``, image
folders) with a reconstruction loss plus a weighted KL term, checkpoints atomically and resumes
exactly. At the end it measures the latent's shift (mean) and scale (1 / std) on the data and writes
them into the diffusers folder's ``config.json`` (``shift_factor``, ``scaling_factor``), the folder
that ``model.autoencoder.path`` takes: a model then refuses any other scale.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from msf.config import PRECISIONS, ConfigError, apply_overrides, from_dict, to_dict
from msf.fields import check_declarations, check_fields, setting
from msf.files import atomic_write_text
from msf.precision import resolve_precision
from msf.training.checkpoint import load_latest, prune, save_checkpoint
from msf.training.data import IndexStream, TrainingData, iterate_batches, load_dataset
from msf.training.distributed import StopRequest

FOLDER = "autoencoder"  # the diffusers folder inside out_dir


@dataclass
class AutoencoderTrainConfig:
    """A small ``AutoencoderKL``: ``log2(factor) + 1`` blocks of ``width``, ``2 width``, then ``4 width``
    channels, one ResNet layer each, ``channels`` latent channels."""

    data: str = setting("emoji")  # as train.data: "emoji", a .npz, or an image folder
    image_size: int = setting(32, "[8, inf)")
    factor: int = setting(4, choices=(2, 4, 8))  # spatial downsampling f
    channels: int = setting(4, "[1, inf)")  # latent channels
    width: int = setting(32, "[8, inf)")
    steps: int = setting(2000, "[0, inf)", resume=True)
    batch_size: int = setting(32, "[1, inf)")
    lr: float = setting(5e-4, "(0, inf)")
    lr_decay_from: int = setting(0, "[0, inf)", resume=True)  # 0: constant; else linear to 0 at `steps`
    kl_weight: float = setting(1e-6, "[0, inf)")  # on the KL per latent element, against the per-pixel loss
    loss: str = setting("l1", choices=("l1", "mse"))
    random_flip: bool = setting(True)
    seed: int = setting(0, "[0, inf)")
    precision: str = setting("auto", choices=PRECISIONS)
    log_every: int = setting(50, "[1, inf)", resume=True)
    ckpt_every: int = setting(500, "[0, inf)", resume=True)
    keep_last: int = setting(2, "[1, inf)", resume=True)
    out_dir: str = setting("runs/autoencoder", resume=True)

    def __post_init__(self) -> None:
        check_fields(self, "autoencoder")


check_declarations(AutoencoderTrainConfig)


def autoencoder_config(overrides: list[str], base: AutoencoderTrainConfig | None = None
                       ) -> AutoencoderTrainConfig:
    """The defaults (or ``base``) with ``key=value`` overrides (``steps=500 factor=8``), checked."""
    return apply_overrides(base or AutoencoderTrainConfig(), overrides)


@dataclass
class AutoencoderResult:
    path: Path | None  # the diffusers folder (None when nothing was saved)
    steps: int
    seconds: float
    history: list[float]
    scaling_factor: float
    shift_factor: float
    psnr: float  # of reconstructions (posterior means) of up to 1,024 training images, in dB
    interrupted: bool = False

    def overrides(self) -> str:
        """The ``key=value`` settings of ``msf train`` that take this autoencoder."""
        return (f"model.autoencoder.kind=sd-vae model.autoencoder.path={self.path} "
                f"model.autoencoder.scaling_factor={self.scaling_factor}")


def build_vae(cfg: AutoencoderTrainConfig):
    """A freshly initialised ``AutoencoderKL`` of ``cfg``'s shape (weights from ``cfg.seed``)."""
    from diffusers import AutoencoderKL

    blocks = int(math.log2(cfg.factor)) + 1
    widths = [cfg.width * min(2 ** i, 4) for i in range(blocks)]
    torch.manual_seed(cfg.seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=tuple(widths),
                         layers_per_block=1, latent_channels=cfg.channels, norm_num_groups=min(32, cfg.width),
                         sample_size=cfg.image_size)


def reconstruction_loss(vae, x: Tensor, cfg: AutoencoderTrainConfig, generator: torch.Generator
                        ) -> tuple[Tensor, Tensor]:
    """(total, reconstruction): the per-pixel loss of a decoded posterior sample, plus ``kl_weight``
    times the KL to N(0, I) per latent element."""
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(x.device)
    recon = vae.decode(z).sample
    rec = F.l1_loss(recon.float(), x) if cfg.loss == "l1" else F.mse_loss(recon.float(), x)
    kl = posterior.kl().float().mean() / z[0].numel()
    return rec + cfg.kl_weight * kl, rec


def train_autoencoder(cfg: AutoencoderTrainConfig, *, device: str | None = None, progress: bool = True,
                      resume: bool = False, max_seconds: float | None = None) -> AutoencoderResult:
    """Train, checkpoint and save an autoencoder; ``resume`` continues the newest checkpoint exactly."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(cfg.precision, dev, what="precision", say=progress)
    data = TrainingData(load_dataset(cfg.data, cfg.image_size), cfg.image_size)
    if data.kind == "latents":
        raise ConfigError(f"data={cfg.data}: a latent cache; an autoencoder trains on images")
    out, ckpts = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
    vae = build_vae(cfg).to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, history = 0, []
    found = load_latest(ckpts) if resume else None
    if found is not None:
        state, _ = found
        _check_same_run(cfg, state, found[1])
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, history = int(state["step"]), list(state["history"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(to_dict(cfg), indent=2))

    def save() -> None:
        save_checkpoint(ckpts, step, {"model": vae.state_dict(), "opt": opt.state_dict(),
                                      "history": history, "config": to_dict(cfg)})
        prune(ckpts, cfg.keep_last)

    stream = IndexStream(data.labels, cfg.batch_size, seed=cfg.seed, balance_classes=False,
                         flip=cfg.random_flip)
    stop, started, interrupted = StopRequest(), time.perf_counter(), False
    with stop.installed():
        for s, x, _, _ in iterate_batches(data, stream, step + 1, cfg.steps):
            noise = torch.Generator().manual_seed(cfg.seed * 1_000_003 + s)  # a function of (seed, step)
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, s)
            with torch.autocast(dev.type, torch.bfloat16, enabled=precision == "bf16"):
                loss, rec = reconstruction_loss(vae, x.to(dev), cfg, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            step, history = s, history + [rec.item()]
            if progress and (s % cfg.log_every == 0 or s == cfg.steps):
                print(f"[msf] autoencoder step {s}/{cfg.steps}: reconstruction {cfg.loss} {history[-1]:.4f}",
                      flush=True)
            if cfg.ckpt_every and s % cfg.ckpt_every == 0:
                save()
            out_of_time = max_seconds is not None and time.perf_counter() - started > max_seconds
            if stop.requested or out_of_time:
                interrupted = stop.requested
                break
    seconds = time.perf_counter() - started
    if found is None or step > int(found[0]["step"]):
        save()
    return _finish(vae.eval(), data, cfg, out, step, seconds, history, interrupted)


def learning_rate(cfg: AutoencoderTrainConfig, step: int) -> float:
    """``lr``, then after ``lr_decay_from`` falling linearly to ``lr / (steps - lr_decay_from + 1)``."""
    if not cfg.lr_decay_from or step <= cfg.lr_decay_from or cfg.steps <= cfg.lr_decay_from:
        return cfg.lr
    return cfg.lr * (cfg.steps - step + 1) / (cfg.steps - cfg.lr_decay_from + 1)


def _check_same_run(cfg: AutoencoderTrainConfig, state: dict, path: Path) -> None:
    saved = from_dict(AutoencoderTrainConfig, state["config"], f"{path}: config")
    changed = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(saved, f.name)
               and not f.metadata["rule"].resume]
    if changed:
        raise ConfigError(f"{path}: this checkpoint was trained with other settings ({', '.join(changed)}); "
                          "start afresh in another out_dir, or resume with the same ones")


@torch.no_grad()
def latent_statistics(vae, data: TrainingData, count: int = 1024, seed: int = 0
                      ) -> tuple[float, float, float]:
    """(shift, scale, PSNR in dB) over up to ``count`` training images: the posterior means' mean and
    1 / std, and how well their decodings reproduce the images."""
    dev = next(vae.parameters()).device
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]
    x, _, _ = data.batch(pick, torch.zeros(len(pick), dtype=torch.bool))
    means, errors = [], []
    for chunk in x.split(64):
        z = vae.encode(chunk.to(dev)).latent_dist.mean
        means.append(z.float().cpu())
        recon = vae.decode(z).sample.float().clamp(-1, 1).cpu()
        errors.append(((recon - chunk) / 2).pow(2).flatten(1).mean(1))  # on [0, 1] pixels
    z, mse = torch.cat(means), torch.cat(errors)
    psnr = float((-10 * torch.log10(mse.clamp_min(1e-12))).mean())
    return float(z.mean()), float(1 / z.std()), psnr


def _finish(vae, data: TrainingData, cfg: AutoencoderTrainConfig, out: Path, step: int, seconds: float,
            history: list[float], interrupted: bool) -> AutoencoderResult:
    """Measure the latent's shift and scale, store them in the diffusers folder, report PSNR."""
    shift, scale, psnr = latent_statistics(vae, data, seed=cfg.seed)
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    folder, tmp = out / FOLDER, out / f".{FOLDER}.tmp"
    vae.save_pretrained(str(tmp), safe_serialization=True)
    atomic_write_text(tmp / "quality.json", json.dumps({"psnr_db": psnr, "steps": step, "images": min(
        len(data), 1024)}, indent=2))
    if folder.exists():  # the finished folder is swapped in whole: never half an old, half a new one
        old = out / f".{FOLDER}.old"
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    return AutoencoderResult(folder, step, seconds, history, scale, shift, psnr, interrupted)
