"""Models shipped inside the package: ``msf sample <name>`` works right after install, offline.

A shipped model is an ordinary model directory (``config.json`` + one safetensors file per
scale, :mod:`msf.method.model_dir`) under ``msf/pretrained/<name>/``, with a ``README.md``
that gives its recipe, training time and scores. Anywhere msf takes a model directory, it also
takes such a name, or a Hugging Face Hub id ``owner/name[@revision]``
(:mod:`msf.interfaces.hub_download`): a local path wins, then a shipped name, then the Hub.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from msf.interfaces import hub_download


def pretrained_dir() -> Path:
    return Path(str(resources.files("msf") / "pretrained"))


def available() -> list[str]:
    """The names of the shipped models."""
    root = pretrained_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def model_path(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """The model directory ``name_or_path`` names: an existing local path, else a model shipped with msf,
    else (a string ``owner/name[@revision]``) the Hugging Face Hub's copy, downloaded if need be.

    Anything else comes back as the path it looks like, for the caller's "does not exist".
    ``revision`` (a branch, tag or commit) pins a Hub model; it is an error for a local one.
    """
    path = Path(name_or_path).expanduser()
    text = str(name_or_path)
    hub_id = None
    if isinstance(name_or_path, str) and not path.exists():  # a Path object is always local
        hub_id = hub_download.parse_hub_id(text)
    if hub_id is None:
        if revision is not None:
            raise ValueError(f"{text}: revision={revision!r} pins a Hugging Face Hub model (owner/name); "
                             "this is a local directory or a shipped model")
        if path.exists() or os.sep in text or text.startswith("."):
            return path
        shipped = pretrained_dir() / text
        return shipped if (shipped / "config.json").is_file() else path
    repo_id, pinned = hub_id
    if pinned is not None and revision is not None and pinned != revision:
        raise ValueError(f"{text}: two revisions given, {pinned!r} in the id and revision={revision!r}")
    return hub_download.download(repo_id, pinned or revision)
