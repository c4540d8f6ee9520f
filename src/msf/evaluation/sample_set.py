"""Sample sets for evaluation: many samples into one ADM-format ``.npz``.

ADM's evaluator (and DiT's ``sample_ddp.py``) read ``arr_0``, uint8 N x H x W x 3,
with the class labels in ``arr_1``. We write that, plus a JSON ``settings`` entry with
the settings that produced it.

The set is cut into chunks of ``batch_size`` samples. Chunk ``c`` gets labels and
noise from ``(seed, c)`` alone, so the set does not depend on how many processes
drew it, and each finished chunk is a file under ``<out>.parts/``. A re-run with the
same settings skips the finished chunks; under ``torchrun`` rank ``r`` draws chunks
``r, r + world, ...`` and rank 0 merges. Labels are exactly class-balanced (each
class ``N / C`` times, the remainder spread over the first classes) and shuffled, where
ADM draws them uniformly at random: the same in expectation, without the noise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from msf import speed
from msf.config import SAMPLING_PRECISIONS, SamplerSettings
from msf.files import atomic_write_numpy, atomic_write_text
from msf.precision import resolve_precision
from msf.training.data import to_uint8
from msf.training.distributed import World, barrier

if TYPE_CHECKING:
    from msf.method.pipeline import MSFPipeline

SETTINGS = "settings.json"  # in <out>.parts/: the settings its chunks were drawn with


@dataclass
class SampleSetResult:
    path: Path | None  # None on ranks other than 0
    num_samples: int
    generated: int  # samples this process drew in this call
    resumed: int  # samples of this process found finished from an earlier call
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.generated / max(self.seconds, 1e-9)


def balanced_labels(num_samples: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """``num_samples`` labels, each class equally often (+-1), in a seeded random order."""
    labels = np.arange(num_samples) % num_classes
    return np.random.default_rng(seed).permutation(labels).astype(np.int64)


def chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1, dtype=np.uint64)[0] >> 1)


def weights_fingerprint(pipe: torch.nn.Module) -> str:
    """A cheap identity of the weights (shapes and leading values), to refuse mixing models."""
    h = hashlib.sha256()
    for name, p in sorted(pipe.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_precision(precision: str) -> None:
    if precision not in SAMPLING_PRECISIONS:
        raise ValueError(f"precision must be one of {SAMPLING_PRECISIONS}, got {precision!r}")


def inference_nets(pipe: MSFPipeline, precision: str, compile: bool = False) -> tuple[dict | None, str]:
    """How to sample at ``precision``: per-scale networks for ``MSFPipeline.sample(nets=...)``
    and its autocast ``precision`` ("fp32", or "bf16" for both bf16 paths; "auto" resolved by
    :func:`msf.precision.resolve_precision`).

    The networks are bf16 weight copies for "bf16-weights", compiled copies (inductor
    freezing) with ``compile``, and None (the pipeline's own) otherwise.
    """
    from msf.speed import compile_for_inference, inference_copy

    _check_precision(precision)
    precision = resolve_precision(precision, pipe.device, what="sampling precision")
    autocast = "fp32" if precision == "fp32" else "bf16"
    if compile:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        return {k: compile_for_inference(net, dtype) for k, net in enumerate(pipe.networks)}, autocast
    if precision == "bf16-weights":
        return {k: inference_copy(net) for k, net in enumerate(pipe.networks)}, autocast
    return None, autocast


def parts_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _check_settings(parts: Path, settings: dict) -> None:
    file = parts / SETTINGS
    if file.is_file():
        old = json.loads(file.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{parts}: holds chunks drawn with other settings ({changes}). "
                f"Use another output path, or delete {parts} to start over."
            )
    else:
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_text(file, json.dumps(settings, indent=2))


def _changes(out: Path, settings: dict) -> str:
    try:
        old = read_meta(out)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return "not a sample set msf can read"
    diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
    return ", ".join(diff) or "none recorded"


def _finished(out: Path, settings: dict) -> bool:
    """``out`` is a complete set drawn with ``settings`` (same weights included)."""
    if not out.is_file():
        return False
    try:
        meta = read_meta(out)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False
    return all(meta.get(k) == v for k, v in settings.items())


def _chunk_file(parts: Path, c: int) -> Path:
    return parts / f"chunk_{c:06d}.npz"


def _chunk_done(file: Path, n: int) -> bool:
    try:
        with np.load(file, allow_pickle=False) as d:
            return d["arr_0"].shape[0] == n and d["arr_1"].shape[0] == n
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False  # a partial write from a crash: draw it again


def _save_npz(path: Path, **arrays) -> None:
    atomic_write_numpy(path, np.savez, **arrays)


@torch.no_grad()
def sample_set(
    pipe: MSFPipeline, out: str | os.PathLike, num_samples: int, *, batch_size: int = 64, seed: int = 0,
    steps=None, cfg_scale=None, solver=None, shift=None, guidance_interval=None, prior_level=None,
    sampler_name: str | None = None, precision: str = "auto", compile: bool = False, tf32: bool = True,
    labels: np.ndarray | None = None, meta: dict | None = None, world: World | None = None,
    overwrite: bool = False, keep_parts: bool = False, progress: bool = True,
) -> SampleSetResult:
    """Draw ``num_samples`` class-balanced samples from ``pipe`` into the ADM-format ``out``.

    ``steps``, ``cfg_scale``, ``solver``, ``shift``, ``guidance_interval``, ``prior_level``: as in
    :meth:`msf.config.SamplerSettings.of` (one value or one per scale; unset: the model's defaults, or
    its named settings ``sampler_name``, e.g. "paper"). ``precision``: "auto" (bf16 autocast where the
    hardware runs bf16 natively, else fp32; the settings record the answer), "fp32", "bf16" (autocast) or
    "bf16-weights"; ``compile`` compiles the networks first (:func:`inference_nets`); ``tf32``: fp32 on a
    GPU runs its matrix products in TF32. ``labels`` replaces the balanced labels (e.g. a reference's own,
    where its classes are imbalanced); ``meta`` (e.g. the model directory) is stored beside the settings.
    A finished set at ``out`` with the same settings and weights is returned at once, one with other
    settings refused unless ``overwrite``; an interrupted run resumes from its finished chunks, and chunks
    drawn with other settings are refused.
    """
    world = world or World(device=pipe.device)
    out = Path(out)
    precision = _check_request(out, precision, num_samples, batch_size, pipe.device)
    sampler = SamplerSettings.of(pipe.config, steps, cfg_scale, solver, shift=shift,
                                 guidance_interval=guidance_interval, name=sampler_name,
                                 prior_level=prior_level)
    labels, label_source = _labels(pipe, num_samples, seed, labels)
    settings = {  # what a finished set or chunk must have been drawn with to be kept
        "num_samples": num_samples, "batch_size": batch_size, "seed": seed, **sampler.to_dict(),
        "precision": precision, "compile": compile,
        "tf32": tf32 if pipe.device.type == "cuda" and precision == "fp32" else None,
        "weights": weights_fingerprint(pipe), "image_size": pipe.config.image_size, "labels": label_source,
    }
    chunks = range(0, -(-num_samples // batch_size))
    mine = [c for c in chunks if c % world.size == world.rank]
    size = {c: min(batch_size, num_samples - c * batch_size) for c in chunks}
    if _finished(out, settings):  # every rank reads it: they agree without a barrier
        return SampleSetResult(out if world.is_main else None, num_samples, 0,
                               sum(size[c] for c in mine), 0.0)
    parts = _start_parts(out, settings, overwrite, world)
    todo = [c for c in mine if not _chunk_done(_chunk_file(parts, c), size[c])]
    done_here = sum(size[c] for c in mine if c not in todo)
    bar = _progress_bar(progress and world.is_main, sum(size[c] for c in mine), done_here, out.name)
    generated, seconds = _draw_chunks(pipe, parts, todo, labels, batch_size, seed, sampler, precision,
                                      compile, tf32, bar)
    barrier(world)
    if not world.is_main:
        return SampleSetResult(None, num_samples, generated, done_here, seconds)
    _merge(parts, out, chunks, batch_size, labels, dict(settings, **(meta or {})), pipe.config.image_size,
           keep_parts)
    return SampleSetResult(out, num_samples, generated, done_here, seconds)


def _check_request(out: Path, precision: str, num_samples: int, batch_size: int, device: torch.device
                   ) -> str:
    """Refuse a request that cannot be drawn, before anything is; returns the precision, "auto" resolved."""
    if out.suffix != ".npz":
        raise ValueError(f"{out}: the sample set is written as an .npz file; name it *.npz")
    _check_precision(precision)
    precision = resolve_precision(precision, device, what="sampling precision")
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    return precision


def _start_parts(out: Path, settings: dict, overwrite: bool, world: World) -> Path:
    """The chunk folder of ``out``, its settings checked (or recorded) by rank 0 before any rank draws.
    A finished set at ``out`` is from other settings here: refused unless ``overwrite``."""
    if out.exists() and not overwrite:
        raise ValueError(f"{out}: exists, drawn with other settings ({_changes(out, settings)}); "
                         "name another output, or pass --overwrite to replace it")
    parts = parts_dir(out)
    if world.is_main:
        _check_settings(parts, settings)
    barrier(world)
    return parts


def _progress_bar(show: bool, total: int, done: int, name: str):
    """A progress bar over this process's samples, ``done`` of them already drawn (None: not shown)."""
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="img", desc=f"sampling {name}")


def _draw_chunks(pipe: MSFPipeline, parts: Path, chunks: list[int], labels: np.ndarray, batch_size: int,
                 seed: int, sampler: SamplerSettings, precision: str, compile: bool, tf32: bool, bar
                 ) -> tuple[int, float]:
    """Draw ``chunks``, each from its own seed, into their files in ``parts``; returns the samples drawn
    and the seconds taken (from after the networks are prepared)."""
    nets, autocast = inference_nets(pipe, precision, compile) if chunks else (None, "fp32")
    start, generated = time.perf_counter(), 0
    for c in chunks:
        y = labels[c * batch_size:(c + 1) * batch_size]
        gen = torch.Generator().manual_seed(chunk_seed(seed, c))
        with speed.tf32(pipe.device, tf32):
            images = pipe.sample(torch.from_numpy(y), settings=sampler, generator=gen,
                                 precision=autocast, nets=nets)
        _save_npz(_chunk_file(parts, c), arr_0=to_uint8(images).numpy(), arr_1=y)
        generated += len(y)
        if bar is not None:
            bar.update(len(y))
            bar.set_postfix(img_s=f"{generated / (time.perf_counter() - start):.2f}")
    if bar is not None:
        bar.close()
    return generated, time.perf_counter() - start


def _labels(pipe, num_samples: int, seed: int, labels: np.ndarray | None) -> tuple[np.ndarray, str]:
    """The set's labels (balanced unless given) and how they were made, for the settings record."""
    if labels is None:
        return balanced_labels(num_samples, pipe.config.num_classes, seed), "balanced"
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (num_samples,):
        raise ValueError(f"labels: need {num_samples} labels, got shape {labels.shape}")
    pipe.check_labels(torch.from_numpy(labels))
    return labels, "given:" + hashlib.sha256(labels.tobytes()).hexdigest()[:16]


def _merge(parts: Path, out: Path, chunks: range, batch_size: int, labels: np.ndarray, info: dict,
           image_size: int, keep_parts: bool) -> None:
    """The finished chunks into one ADM-format file (``arr_0`` images, ``arr_1`` labels, ``settings``)."""
    merged = np.empty((len(labels), image_size, image_size, 3), dtype=np.uint8)
    for c in chunks:
        with np.load(_chunk_file(parts, c), allow_pickle=False) as d:
            merged[c * batch_size:(c + 1) * batch_size] = d["arr_0"]
    info = dict(info, created=time.strftime("%Y-%m-%d %H:%M:%S"))
    _save_npz(out, arr_0=merged, arr_1=labels, settings=np.array(json.dumps(info)))
    if not keep_parts:
        shutil.rmtree(parts)


def read_meta(path: str | os.PathLike) -> dict:
    """The settings stored in a sample set written by :func:`sample_set` ({} for other files)."""
    with np.load(path, allow_pickle=False) as d:
        return json.loads(str(d["settings"])) if "settings" in d.files else {}
