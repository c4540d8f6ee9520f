"""Any model a user points at, as a pipeline: what `msf sample`, `sweep`, `app` and `info` accept.

* a model directory (``config.json`` + ``scale_k.safetensors``, written at the end of training);
* the name of a model shipped with msf, or a hub id (:mod:`msf.interfaces.pretrained`);
* a training checkpoint (``<run>/checkpoints/step_*.pt``), read with ``weights_only=True``, or a
  sharded one (``train.ckpt_format=sharded``: a ``step_*/`` directory), read whole in this process;
* a run directory (``msf train``'s ``train.out_dir``): its newest checkpoint, else its ``model/``.

A model directory holds the EMA weights; a checkpoint holds both, so ``weights="raw"`` (the
weights the optimizer updates) needs a checkpoint or a run directory. ``weights="auto"`` (the
command line's default) takes a checkpoint's EMA weights unless they are still mostly their random
start (a short run: ``msf.training.train.YOUNG_EMA``), and then its raw weights, saying so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from msf.config import Config, ConfigError, ModelConfig, from_dict, validate
from msf.interfaces.pretrained import model_path
from msf.method.model_dir import ModelDirError
from msf.method.pipeline import MSFPipeline, load_model_config
from msf.training.checkpoint import (
    CheckpointError,
    is_sharded_checkpoint,
    load_checkpoint,
    load_latest,
    read_sharded,
)

WEIGHTS = ("auto", "ema", "raw")


def resolve(spec: str | os.PathLike) -> tuple[str, Path]:
    """What ``spec`` is: ("model", dir), ("checkpoint", file or sharded directory) or ("run", dir); a
    missing path is left to :func:`msf.method.pipeline.load_model_config` to report (with the shipped models'
    names)."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".pt":
            raise ModelDirError(f"{path}: a file, but not a training checkpoint (.pt); give a model "
                                "directory, a run directory or a checkpoint")
        return "checkpoint", path
    if is_sharded_checkpoint(path):
        return "checkpoint", path
    if path.is_dir() and ((path / "checkpoints").is_dir() or (path / "model").is_dir()):
        return "run", path  # a model directory has neither
    return "model", model_path(spec)


@dataclass(frozen=True)
class Loaded:
    """What :func:`load_with_source` read: a checkpoint (file or sharded directory) or a model directory,
    which of its weights, and a checkpoint's training step."""

    path: Path
    weights: str  # "ema" or "raw"
    step: int | None = None  # None: a model directory, which records no step
    why: str = ""  # why "auto" took the raw weights

    def describe(self) -> str:
        """``the EMA weights of /runs/a/checkpoints/step_000000400.pt (step 400)``"""
        which = "EMA" if self.weights == "ema" else "raw"
        return (f"the {which} weights of {self.path}" + ("" if self.step is None else f" (step {self.step})")
                + (f": {self.why}" if self.why else ""))

    def meta(self) -> dict:
        """For the metadata of what is drawn with it: ``model`` as :func:`source` names it,
        ``model_weights`` and, where known, ``checkpoint_step`` (not ``weights``: a sample set keeps
        the weights' fingerprint under that name, and resumes by it)."""
        out = {"model": str(self.path) + ("" if self.weights == "ema" else f" ({self.weights} weights)"),
               "model_weights": self.weights}
        return out if self.step is None else {**out, "checkpoint_step": self.step}


def load_pipeline(spec: str | os.PathLike, weights: str = "ema", device: torch.device | str = "cpu"
                  ) -> MSFPipeline:
    """A pipeline from a model directory, shipped name, hub id, checkpoint or run directory."""
    return load_with_source(spec, weights, device)[0]


def load_with_source(spec: str | os.PathLike, weights: str = "ema", device: torch.device | str = "cpu"
                     ) -> tuple[MSFPipeline, Loaded]:
    """:func:`load_pipeline`, and what it read: a run directory's newest checkpoint is only known once
    read, so the two are answered together."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights: {weights!r} must be one of {WEIGHTS}")
    kind, path = resolve(spec)
    if kind == "run":
        found = load_latest(path / "checkpoints")  # the newest that loads; a damaged one is passed over
        if found is None:
            if weights == "raw":
                raise ModelDirError(f"{path}: no checkpoint in {path / 'checkpoints'}, and {path / 'model'} "
                                    "holds only the EMA weights; drop --weights raw")
            return (MSFPipeline.from_pretrained(path / "model", device=device),
                    Loaded((path / "model").resolve(), "ema"))
        state, file = found
    elif kind == "checkpoint":
        state, file = load_checkpoint(path), path
    else:
        if weights == "raw":
            load_model_config(path)  # a missing or broken directory says so first
            raise ModelDirError(f"{path}: a model directory holds only the EMA weights; for the raw weights, "
                                "give the run directory or one of its checkpoints")
        return MSFPipeline.from_pretrained(path, device=device), Loaded(path.resolve(), "ema")
    step = state.get("step")
    why = ""
    if weights == "auto":
        weights, why = _auto_weights(state, Path(file))
    return (_pipeline_of(state, Path(file), weights, device),
            Loaded(Path(file).resolve(), weights, step if isinstance(step, int) else None, why))


def _auto_weights(state: dict, path: Path) -> tuple[str, str]:
    """A checkpoint's EMA weights, or its raw ones while the EMA still holds over ``YOUNG_EMA`` of its
    random start (the EMA of a run of a few hundred steps at decay 0.995 samples noise)."""
    from msf.training.train import YOUNG_EMA, ema_start_share

    cfg = _config_of(state, path)
    share, updates = ema_start_share(cfg, int(state.get("step", 0)))
    if share <= YOUNG_EMA:
        return "ema", ""
    return "raw", (f"its EMA (decay {cfg.train.ema_decay:g}, {updates} updates) still holds {share:.1%} of "
                   "its random start (--ema-weights takes it anyway)")


def from_checkpoint(path: str | os.PathLike, weights: str = "ema", device: torch.device | str = "cpu"
                    ) -> MSFPipeline:
    """The pipeline saved in a training checkpoint: its EMA weights, or its raw ones."""
    state = load_checkpoint(path)
    if weights == "auto":
        weights = _auto_weights(state, Path(path))[0]
    return _pipeline_of(state, Path(path), weights, device)


def _config_of(state: dict, path: Path) -> Config:
    try:
        cfg = from_dict(Config, state["config"], "checkpoint config")
        validate(cfg)
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{path}: not a checkpoint msf train wrote ({e})") from None
    return cfg


def _pipeline_of(state: dict, path: Path, weights: str, device: torch.device | str) -> MSFPipeline:
    pipe = MSFPipeline(_config_of(state, path).model)
    key = "emas" if weights == "ema" else "models"
    if "dcp" in state:  # sharded: read the one set of weights asked for, whole, in this process
        state = read_sharded(state["dcp"], keys=[key])
    for k, net in enumerate(pipe.networks):
        try:
            net.load_state_dict(state[key][str(k)])
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: scale {k}'s {weights} weights do not fit its config ({e})"
                                  ) from None
    return pipe.to(device)


def load_config(spec: str | os.PathLike) -> ModelConfig:
    """The model config of what :func:`load_pipeline` would load, without building the networks
    (to check sampler settings before any work)."""
    kind, path = resolve(spec)
    if kind == "run":
        found = load_latest(path / "checkpoints")
        if found is None:
            return load_model_config(path / "model")
        return _config_of(found[0], found[1]).model
    if kind == "checkpoint":
        return _config_of(load_checkpoint(path), path).model
    return load_model_config(path)


def source(spec: str | os.PathLike, weights: str = "ema") -> str:
    """A name for what was loaded, recorded with sample sets (a run directory names its newest checkpoint)."""
    kind, path = resolve(spec)
    if kind == "run":
        found = load_latest(path / "checkpoints")
        path = found[1] if found is not None else path / "model"
    return str(path.resolve()) + ("" if weights == "ema" else f" ({weights} weights)")
