"""Writing a file so that a crash at any moment leaves the old file or the new one, never half.

Checkpoints, model directories, latent-cache shards, sample sets and reference statistics
all go through :func:`atomic_write`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` a temporary file beside ``path``, fsync it, rename it over ``path``, and
    fsync the directory so that the rename itself survives a power cut.

    The temporary name starts with a dot, so listings of finished files never see it; it is
    removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        # mkstemp (and some writers, e.g. safetensors) make the file 0600; give it the mode a plain open()
        # would (0666 less the umask), so that colleagues on a shared cluster can read weights and samples
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _umask() -> int:
    try:  # Linux: read it without setting it (os.umask sets it process-wide, racing other threads)
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_numpy(path: str | os.PathLike, save: Callable, *args, **kwargs) -> Path:
    """``np.save`` / ``np.savez`` through an open file (given a path, numpy would add a suffix)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            save(f, *args, **kwargs)

    return atomic_write(path, write)
