"""Models shipped inside the package: ``msf sample <name>`` works right after install, offline.

A shipped model is an ordinary model directory (``config.json`` + one safetensors file per
scale, as :meth:`msf.pipeline.MSFPipeline.save_pretrained` writes it) under
``msf/pretrained/<name>/``, with a ``README.md`` that gives its recipe, training time and scores.
Anywhere msf takes a model directory, it also takes such a name.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def pretrained_dir() -> Path:
    return Path(str(resources.files("msf") / "pretrained"))


def available() -> list[str]:
    """The names of the shipped models."""
    root = pretrained_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def model_path(name_or_path: str | os.PathLike) -> Path:
    """``name_or_path`` itself when it exists or looks like a path; else the shipped model of that name."""
    path = Path(name_or_path).expanduser()
    text = str(name_or_path)
    if path.exists() or os.sep in text or text.startswith("."):
        return path
    shipped = pretrained_dir() / text
    return shipped if (shipped / "config.json").is_file() else path
