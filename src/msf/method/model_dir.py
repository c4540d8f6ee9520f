"""A model directory on disk: what ``MSFPipeline.save_pretrained`` writes and ``from_pretrained`` reads.

    model_dir/
      config.json            # {"format": "msf-pipeline", "version": 1, "model": {...}}
      scale_0.safetensors    # weights of scale 0's network (EMA weights after training)
      scale_1.safetensors
      ...

JSON and safetensors only: reading one never unpickles. Every error is a :class:`ModelDirError`
that names the file. This module sits below the pipeline, the converter and the Hub code, which all
read or write the format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from msf.config import Config, ConfigError, ModelConfig, from_dict, to_dict, validate
from msf.files import atomic_write, atomic_write_text

FORMAT = "msf-pipeline"
FORMAT_VERSION = 1


class ModelDirError(ValueError):
    """A model directory is missing, incomplete or corrupted; the message names the file."""


def save_model_dir(path: str | os.PathLike, config: ModelConfig, networks: Sequence[nn.Module],
                   extra: dict | None = None) -> Path:
    """Write ``config.json`` and one ``scale_k.safetensors`` per network (atomically each); ``extra``
    adds top-level entries to ``config.json`` (the training config, where converted weights came from)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for k, net in enumerate(networks):
        state = {n: p.detach().contiguous().cpu() for n, p in net.state_dict().items()}
        atomic_write(path / f"scale_{k}.safetensors", lambda p, s=state: save_file(s, str(p)))
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": to_dict(config)}
    meta.update(extra or {})
    atomic_write_text(path / "config.json", json.dumps(meta, indent=2))
    return path


def read_model_config(path: Path) -> ModelConfig:
    """The validated model config in the directory ``path``'s ``config.json``."""
    file = path / "config.json"
    if not file.is_file():
        raise ModelDirError(f"{file}: missing; is {path} a model directory written by msf?")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelDirError(f"{file}: field 'format' must be {FORMAT!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise ModelDirError(
            f"{file}: field 'version' is {meta.get('version')!r}; this msf reads {FORMAT_VERSION}"
        )
    if "model" not in meta:
        raise ModelDirError(f"{file}: field 'model' is missing")
    try:
        model = from_dict(ModelConfig, meta["model"], "model")
        validate(Config(model=model))
    except ConfigError as e:
        raise ModelDirError(f"{file}: {e}") from None
    return model


def load_weights(path: Path, networks: Sequence[nn.Module]) -> None:
    """Load each ``scale_k.safetensors`` of ``path`` into ``networks[k]``, checked first: present,
    readable, the names and shapes of the network, finite."""
    for k, net in enumerate(networks):
        file = path / f"scale_{k}.safetensors"
        if not file.is_file():
            raise ModelDirError(f"{file}: missing (the config has {len(networks)} scales)")
        try:
            state = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelDirError(f"{file}: not a readable safetensors file ({e})") from None
        expected = net.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ModelDirError(
                f"{file}: weights do not match config.json's scale {k} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        for name, t in state.items():
            if t.shape != expected[name].shape:
                raise ModelDirError(
                    f"{file}: {name} has shape {tuple(t.shape)}, config.json's scale {k} "
                    f"needs {tuple(expected[name].shape)}"
                )
            # a NaN or Inf anywhere makes the sum non-finite: one reduction per tensor,
            # confirmed element-wise only then
            if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
                raise ModelDirError(f"{file}: {name} holds NaN or Inf values; the weights are "
                                    "damaged (or training diverged before they were saved)")
        net.load_state_dict(state)
