"""Hugging Face Hub ids and downloads: a model directory fetched by its id.

Anywhere msf takes a model directory it also takes a Hub id, ``owner/name`` or ``owner/name@revision``
(a branch, tag or commit); :func:`msf.interfaces.pretrained.model_path` tries, in order: an existing
local path, a model shipped with msf, then the Hub. :func:`download` fetches only the files a model
directory needs into the usual Hugging Face cache (``HF_HOME``, ``HF_HUB_CACHE``); with
``HF_HUB_OFFLINE=1`` it reads that cache and nothing else. Uploads are :mod:`msf.interfaces.hub`'s.

``huggingface_hub`` is optional (``pip install 'msf[hub]'``): it is imported here, when needed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import msf
from msf.method.model_dir import ModelDirError

MODEL_FILES = ["config.json", "scale_*.safetensors", "README.md"]  # what a download fetches

# owner/name, optionally @revision; \w is letters, digits and "_", as Hub names allow
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@\S+)?")


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``text`` has the form ``owner/name[@revision]`` and does not look
    local, else None. ``runs/missing`` where ``./runs`` is a directory is a local path that does not
    exist: answered at once as such, not after a network round trip blamed on the network."""
    if not _HUB_ID.fullmatch(text) or looks_local(text):
        return None
    repo_id, _, revision = text.partition("@")
    return repo_id, revision or None


def looks_local(text: str) -> bool:
    """Whether ``text`` reads as a local path: it starts with ``.``, ``/`` or ``~``, holds a path
    separator other than one ``owner/name`` slash, or its first part names an existing directory."""
    if text.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in text):
        return True
    parts = text.partition("@")[0].split("/")  # a revision may hold slashes: refs/pr/1
    if len(parts) > 2:
        return True
    return len(parts) == 2 and Path(parts[0]).expanduser().is_dir()


# ----------------------------------------------------------------------------------------- download


def cache_dir() -> Path:
    """The Hugging Face cache, read from the environment now: huggingface_hub reads it once, at import."""
    env = os.environ
    hub_cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if hub_cache:
        return Path(os.path.expandvars(hub_cache)).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the network, read now (huggingface_hub reads it at import)."""
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def import_huggingface_hub(purpose: str) -> Any:
    """``huggingface_hub``, or a :class:`ModelDirError` saying that ``purpose`` needs it and how to
    install it."""
    try:
        import huggingface_hub
    except ImportError:
        raise ModelDirError(f"{purpose} needs huggingface_hub: pip install 'msf[hub]'") from None
    return huggingface_hub


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local copy of the Hub model ``repo_id`` at ``revision`` (default ``main``), downloaded if
    need be; any failure is one :class:`ModelDirError` naming the id and what to do."""
    hf = import_huggingface_hub(f"{repo_id}: no such local directory or model shipped with msf; loading "
                                "it from the Hugging Face Hub")
    from huggingface_hub import errors

    where = f"{repo_id} (revision {revision or 'main'})"
    cache, no_network = cache_dir(), offline()
    try:
        # local_files_only: HF_HUB_OFFLINE as it is now, not as it was when huggingface_hub was imported
        folder = hf.snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=MODEL_FILES,
                                      local_files_only=no_network, library_name="msf",
                                      library_version=msf.__version__)
    except errors.LocalEntryNotFoundError as e:
        # IncompleteSnapshotError: huggingface_hub 1.x on; a partial snapshot reads as absent before
        incomplete = getattr(errors, "IncompleteSnapshotError", ())
        state = "is incomplete" if isinstance(e, incomplete) else "is not"
        if no_network:
            raise ModelDirError(
                f"{where}: no local directory of that name, and the model {state} in the Hugging Face cache "
                f"{cache}; HF_HUB_OFFLINE=1 forbids downloading it. Set HF_HUB_OFFLINE=0 on a machine with "
                "network (or copy the model directory here and pass its path), and check the id and revision"
            ) from None
        raise ModelDirError(f"{where}: the Hugging Face Hub could not be reached and the model {state} in "
                            f"the cache {cache}; check the network, or pass a local model directory"
                            ) from None
    except errors.RevisionNotFoundError:
        raise ModelDirError(f"{where}: the repo has no such revision; check the branch, tag or commit"
                            ) from None
    except errors.GatedRepoError:
        raise ModelDirError(f"{where}: the repo is gated; accept its terms on huggingface.co and log in "
                            "(`hf auth login`, or set HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise ModelDirError(f"{where}: no such model repo on the Hugging Face Hub, nor a local directory "
                            "of that name; check the id (a private repo needs `hf auth login` or HF_TOKEN)"
                            ) from None
    except errors.HFValidationError as e:
        raise ModelDirError(f"{repo_id!r} is neither a local path nor a valid Hugging Face Hub id ({e})"
                            ) from None
    except Exception as e:  # anything else the network or the disk does: still one line naming the id
        raise ModelDirError(f"{where}: download from the Hugging Face Hub failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    path = Path(folder)
    _check_complete(path, where, no_network)
    return path


def _check_complete(path: Path, where: str, no_network: bool) -> None:
    """A missing file named with the id, not as a path deep inside the cache."""
    hint = " (or not in the cached copy: HF_HUB_OFFLINE=1 kept it from being fetched)" if no_network else ""
    if not (path / "config.json").is_file():
        raise ModelDirError(f"{where}: config.json is not in the repo{hint}; an msf model repo holds "
                            "config.json and scale_K.safetensors, as push_to_hub uploads them")
    try:
        scales = len(json.loads((path / "config.json").read_text())["model"]["scales"])
    except (ValueError, KeyError, TypeError):
        return  # load_model_config says what is wrong with it
    missing = [f for f in (f"scale_{k}.safetensors" for k in range(scales)) if not (path / f).is_file()]
    if missing:
        raise ModelDirError(f"{where}: config.json has {scales} scales but {', '.join(missing)} is not in "
                            f"the repo{hint}")
