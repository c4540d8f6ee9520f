"""Any model a user points at, as a pipeline: what `msf sample`, `sweep`, `app` and `info` accept.

* a model directory (``config.json`` + ``scale_k.safetensors``, written at the end of training);
* the name of a model shipped with msf, or a hub id (:mod:`msf.pretrained`);
* a training checkpoint (``<run>/checkpoints/step_*.pt``), read with ``weights_only=True``, or a
  sharded one (``train.ckpt_format=sharded``: a ``step_*/`` directory), read whole in this process;
* a run directory (``msf train``'s ``train.out_dir``): its newest checkpoint, else its ``model/``.

A model directory holds the EMA weights; a checkpoint holds both, so ``weights="raw"`` (the
weights the optimizer updates) needs a checkpoint or a run directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from msf.checkpoint import CheckpointError, is_sharded_checkpoint, load_checkpoint, load_latest, read_sharded
from msf.config import Config, ConfigError, ModelConfig, from_dict, validate
from msf.pipeline import ModelDirError, MSFPipeline, load_model_config
from msf.pretrained import model_path

WEIGHTS = ("ema", "raw")


def resolve(spec: str | os.PathLike) -> tuple[str, Path]:
    """What ``spec`` is: ("model", dir), ("checkpoint", file or sharded directory) or ("run", dir); a
    missing path is left to :func:`msf.pipeline.load_model_config` to report (with the shipped models'
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


def load_pipeline(spec: str | os.PathLike, weights: str = "ema", device: torch.device | str = "cpu"
                  ) -> MSFPipeline:
    """A pipeline from a model directory, shipped name, hub id, checkpoint or run directory."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights: {weights!r} must be one of {WEIGHTS}")
    kind, path = resolve(spec)
    if kind == "run":
        found = load_latest(path / "checkpoints")  # the newest that loads; a damaged one is passed over
        if found is None:
            if weights == "raw":
                raise ModelDirError(f"{path}: no checkpoint in {path / 'checkpoints'}, and {path / 'model'} "
                                    "holds only the EMA weights; drop --weights raw")
            return MSFPipeline.from_pretrained(path / "model", device=device)
        return _pipeline_of(found[0], found[1], weights, device)
    if kind == "checkpoint":
        return from_checkpoint(path, weights, device)
    if weights == "raw":
        load_model_config(path)  # a missing or broken directory says so first
        raise ModelDirError(f"{path}: a model directory holds only the EMA weights; for the raw weights, "
                            "give the run directory or one of its checkpoints")
    return MSFPipeline.from_pretrained(path, device=device)


def from_checkpoint(path: str | os.PathLike, weights: str = "ema", device: torch.device | str = "cpu"
                    ) -> MSFPipeline:
    """The pipeline saved in a training checkpoint: its EMA weights, or its raw ones."""
    return _pipeline_of(load_checkpoint(path), Path(path), weights, device)


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
