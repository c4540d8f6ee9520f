"""Training checkpoints: atomic, pruned, verified on load, never unpickling code.

A checkpoint is one file ``<out_dir>/checkpoints/step_000001000.pt`` holding
everything a resumed run needs to continue as if never stopped: every scale's
weights, EMA weights and optimizer state, the step, the loss history, and the
resolved config (no RNG states: every random draw of step s is a function of the
seed and s, see ``msf.train.TrainState``). It is written with ``torch.save`` through
``msf.files.atomic_write`` (a temporary file, fsync'ed, renamed), so a crash or SIGKILL at any moment
leaves either the old set of checkpoints or the new one, never a torn file; it
is read back with ``torch.load(weights_only=True)``, which loads tensors and
plain containers only.

(Model directories for sampling are safetensors + JSON, see ``msf.pipeline``.)
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from pathlib import Path

import torch

from msf.files import atomic_write

FORMAT = "msf-train-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step_(\d{9})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not belong to this run."""


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:09d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``."""
    payload = {"format": FORMAT, "version": VERSION, "step": step, **state}
    return atomic_write(checkpoint_path(Path(directory), step), lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        # mmap: under torchrun every process reads the checkpoint; mapped, they share one copy of it
        # in the page cache instead of each holding its own (9.4 GB for a paper-size scale-1 job)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds for a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an msf training checkpoint (field 'format')")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')}, expected {VERSION}")
    return state


def load_latest(directory: str | os.PathLike) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads; a damaged newer one is reported and passed over.

    None when there is no checkpoint; an error naming each file and its problem when there are
    checkpoints but none loads (a fresh start would silently throw the run away).
    """
    problems = []
    for step, path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path), path
        except CheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint of step {step}: {e}", stacklevel=2)
            problems.append(str(e))
    if problems:
        raise CheckpointError(f"{directory}: no checkpoint can be resumed from:\n  " + "\n  ".join(problems)
                              + "\nMove them away to start afresh, or restore a good copy.")
    return None


def _looks_whole(path: Path) -> bool:
    """Cheap check, without loading: a file ``torch.save`` finished (a zip with its directory)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("data.pkl") for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def prune(directory: str | os.PathLike, keep_last: int, keep_every: int = 0) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and those of every ``keep_every``-th step.

    Damaged files never count toward ``keep_last`` (so they never cause a good one to be deleted),
    and are left where they are for the user to look at.
    """
    ckpts = [(step, path) for step, path in list_checkpoints(directory) if _looks_whole(path)]
    removed = []
    for step, path in ckpts[:-keep_last] if keep_last > 0 else ckpts:
        if keep_every and step % keep_every == 0:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
