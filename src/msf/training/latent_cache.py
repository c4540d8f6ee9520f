"""The latent cache: encode a data set once, train on it many times. Written here (by ``msf extract``,
:mod:`msf.training.extract`, and by training itself: :func:`training_cache`), and read here.

For every image, and for its horizontal mirror, we store what training would
otherwise compute from the pixels each step: the target ``z = E(x)`` and, in the
``image`` base mode, the base ``E(resize_image(x, s_0))`` (Algorithm 1's inputs).

Layout of a cache directory::

    extract.json               the settings it is being made with (written first)
    shard_00000.z.npy          (count, 2, C, N, N)    [:, 0] as is, [:, 1] mirrored
    shard_00000.base.npy       (count, 2, C, n0, n0)  (image base mode only)
    shard_00000.labels.npy     (count,) int64
    shard_00000.json           written once the shard's files are: the shard is complete; byte sizes
    manifest.json              written last, when every shard is: format, model fields, shards, classes

A shard is a contiguous range of examples; under torchrun each process encodes
every ``world``-th shard. Files are written to a temporary name and renamed, and
a shard counts as done only once its ``.json`` exists, so an interrupted
extraction re-run skips the finished shards; a process encoding a shard holds a lock on
``.shard_00000.lock``, so that two jobs making the same cache share the work. Reading memory-maps
the ``.npy`` files (plain numpy, no pickles) after checking every file's size against its
record: a truncated shard is a clear error, not garbage.

**The cache training makes** (``train.latent_cache``): a model with a trained autoencoder, trained on
images, encodes them once into ``<cache root>/latents/<data>-<hash>`` (``auto``; the hash covers the
model fields of :func:`cache_key`, the autoencoder's files and the data's) or into a folder given,
and trains from it; ``off`` encodes every batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from msf.config import AutoencoderConfig, Config, ConfigError, to_dict
from msf.files import atomic_write_numpy, atomic_write_text
from msf.training.distributed import World, any_rank, barrier

FORMAT = "msf-latent-cache"
VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}
DTYPE, SHARD_SIZE = "float16", 10_000  # msf extract's defaults, and the cache training makes


class CacheError(ValueError):
    """A latent cache is missing, incomplete, damaged or made for another model."""


def cache_key(cfg: Config) -> dict:
    """The model fields a cache depends on: it can train any model that agrees on these."""
    m = cfg.model
    return {
        "autoencoder": to_dict(m.autoencoder),
        "image_sizes": [m.image_sizes[0], m.image_size],
        "base_mode": m.base_mode,
    }


class LatentCache:
    """A latent cache opened for training: memory-mapped shards, verified on open."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        file = self.path / "manifest.json"
        if not file.is_file():
            raise CacheError(f"{file}: missing; is {self.path} a latent cache made by `msf extract`?")
        try:
            m = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{file}: not valid JSON ({e})") from None
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise CacheError(f"{file}: not a version-{VERSION} msf latent cache")
        self.manifest = m
        self.class_names: list[str] = list(m["class_names"])
        self.z, self.base, labels, self.starts = [], [], [], []
        for name in m["shards"]:
            marker = self.path / f"{name}.json"
            if not marker.is_file():
                raise CacheError(f"{marker}: missing; the shard is incomplete, run extract again")
            rec = json.loads(marker.read_text())
            for f, size in rec["files"].items():
                p = self.path / f
                actual = p.stat().st_size if p.is_file() else None
                if actual != size:
                    raise CacheError(f"{p}: {'missing' if actual is None else f'{actual} bytes'}, "
                                     f"expected {size} bytes (truncated or damaged); delete "
                                     f"{marker.name} and run extract again to rebuild it")
            try:
                self.z.append(np.load(self.path / f"{name}.z.npy", mmap_mode="r", allow_pickle=False))
                has_base = (self.path / f"{name}.base.npy").is_file()
                self.base.append(np.load(self.path / f"{name}.base.npy", mmap_mode="r",
                                         allow_pickle=False) if has_base else None)
                labels.append(np.load(self.path / f"{name}.labels.npy", allow_pickle=False))
            except ValueError as e:
                raise CacheError(f"{self.path / name}: unreadable shard ({e})") from None
            if len(self.z[-1]) != rec["count"] or len(labels[-1]) != rec["count"]:
                raise CacheError(f"{self.path / name}: holds {len(self.z[-1])} examples, "
                                 f"its record says {rec['count']}")
            self.starts.append(rec["start"])
        self.labels = torch.from_numpy(np.concatenate(labels)).long()
        self.shard_size = int(m["shard_size"])
        if len(self.labels) != m["num_examples"]:
            raise CacheError(f"{file}: {len(self.labels)} examples in shards, "
                             f"manifest says {m['num_examples']}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check_model(self, cfg: Config) -> None:
        """The cache must have been made for this autoencoder, these sizes and this base mode."""
        want, have = cache_key(cfg), self.manifest["model"]
        for key in want:
            if want[key] != have[key]:
                raise CacheError(f"{self.path}: made for {key}={have[key]!r}, "
                                 f"this model needs {want[key]!r}; run msf extract for it")

    def get(self, indices: Tensor, flips: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(z, base)`` float32 tensors of the examples, mirrored where ``flips`` is True."""
        idx = indices.numpy()
        shard, row = idx // self.shard_size, idx % self.shard_size
        variant = flips.numpy().astype(np.int64)
        z = np.stack([self.z[s][r, v] for s, r, v in zip(shard, row, variant)])
        base = None
        if self.base[0] is not None:
            base = torch.from_numpy(np.stack([self.base[s][r, v] for s, r, v in
                                              zip(shard, row, variant)]).astype(np.float32))
        return torch.from_numpy(z.astype(np.float32)), base


# --------------------------------------------------------------------------- writing


def write_cache(cfg: Config, out: str | os.PathLike, world: World, data, *, shard_size: int = SHARD_SIZE,
                batch_size: int = 64, dtype: str = DTYPE, progress: bool = True) -> Path:
    """Encode ``data`` (a :class:`msf.training.data.TrainingData` of images) into a latent cache at ``out``:
    this process's shards, then, on the main one, the manifest. Resumes where an earlier run stopped."""
    if dtype not in DTYPES:
        raise CacheError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    from msf.method.pipeline import MSFPipeline

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(data)
    _claim(out, {"model": cache_key(cfg), "dtype": dtype, "shard_size": shard_size, "num_examples": n,
                 "class_names": data.class_names}, world)
    # the autoencoder alone: the scales' networks encode nothing and would cost memory and time
    pipe = MSFPipeline(cfg.model, networks=[nn.Identity()] * cfg.model.num_scales).to(world.device)
    shards = math.ceil(n / shard_size)
    mine = [s for s in range(world.rank, shards, world.size) if not _shard_done(out, s)]
    bar = tqdm(total=sum(min(shard_size, n - s * shard_size) for s in mine),
               disable=not progress, desc=f"extract (rank {world.rank})", unit="img")
    rows = [range(s * shard_size, min(n, (s + 1) * shard_size)) for s in range(shards)]
    bad = _encode_shards(pipe, data, out, mine, rows, batch_size, DTYPES[dtype], world.device, bar)
    bar.close()
    if bad:
        warnings.warn(f"{len(bad)} unreadable images were replaced by their neighbours; "
                      f"first: {bad[:5]}", stacklevel=2)
    barrier(world)
    if world.is_main:
        missing = [s for s in range(shards) if not _shard_done(out, s)]
        if missing:
            raise CacheError(f"{out}: shards {missing[:5]} are not complete; run extract again")
        manifest = {
            "format": FORMAT, "version": VERSION, "num_examples": n, "shard_size": shard_size,
            "shards": [f"shard_{s:05d}" for s in range(shards)], "dtype": dtype,
            "class_names": list(data.class_names), "model": cache_key(cfg),
        }
        # atomic: a manifest is either whole or absent, and only a complete cache has one
        atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    barrier(world)
    return out


def _write_npy(path: Path, array: np.ndarray) -> int:
    return atomic_write_numpy(path, np.save, array, allow_pickle=False).stat().st_size


def _shard_done(out: Path, s: int) -> bool:
    marker = out / f"shard_{s:05d}.json"
    if not marker.is_file():
        return False
    try:
        rec = json.loads(marker.read_text())
        return all((out / f).is_file() and (out / f).stat().st_size == size
                   for f, size in rec["files"].items())
    except (json.JSONDecodeError, KeyError, OSError):
        return False


def _claim(out: Path, settings: dict, world: World) -> None:
    """Shards are reused only by an extraction with the same settings: ``extract.json`` records them
    on the first run; a re-run with others (another autoencoder, size, dtype, data) is refused."""
    record = out / "extract.json"
    if record.is_file():
        old = json.loads(record.read_text())
        diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise CacheError(f"{out}: holds shards extracted with other settings ({'; '.join(diff)}); "
                             "use another --out, or delete the folder to start over")
    elif any(out.glob("shard_*.json")):
        raise CacheError(f"{out}: holds shards of an extraction that recorded no settings; "
                         "use another --out, or delete the folder to start over")
    barrier(world)
    if world.is_main and not record.is_file():
        atomic_write_text(record, json.dumps(settings, indent=2))
    barrier(world)
    if any_rank([not record.is_file()], world)[0]:  # every process must write into the same folder
        raise CacheError(f"{out}: not the same folder for every process (a disk of each node's own?); "
                         "put the cache on a folder all of them share")


def _encode_shards(pipe, data, out: Path, todo: list[int], rows: list[range], batch_size: int, dtype,
                   device, bar) -> list[str]:
    """Encode shards ``todo``. One that another process is encoding (another job making the same cache)
    is waited for at the end, and encoded here only if that process stopped before finishing it.
    Returns the files that could not be decoded."""
    bad: list[str] = []
    busy = []
    for s in todo:
        with _shard_lock(out, s, wait=False) as ours:
            if not ours:
                busy.append(s)
            elif not _shard_done(out, s):
                bad += _encode_shard(pipe, data, out, s, rows[s], batch_size, dtype, device, bar)
    for s in busy:
        with _shard_lock(out, s, wait=True):
            if not _shard_done(out, s):
                bad += _encode_shard(pipe, data, out, s, rows[s], batch_size, dtype, device, bar)
    return bad


@contextmanager
def _shard_lock(out: Path, s: int, wait: bool) -> Iterator[bool]:
    """Whether this process may encode shard ``s`` now: an exclusive lock on its lock file while it does.
    The system drops a lock with the process holding it, so a killed extraction leaves no claim behind."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no claims; two jobs making one cache at worst do the same work twice
        yield True
        return
    with open(out / f".shard_{s:05d}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            ours = True
        except BlockingIOError:
            ours = False
        except OSError:  # a file system without locks: as without fcntl
            ours = True
        yield ours  # closing the file releases the lock


def _encode_shard(pipe, data, out: Path, s: int, rows: range, batch_size: int, dtype,
                  device, bar) -> list[str]:
    """Encode examples ``rows`` (and their mirrors) into shard ``s``; its ``.json`` record last.
    Returns the files that could not be decoded."""
    zs, bases, labels, bad = [], [], [], []
    for b in range(rows.start, rows.stop, batch_size):
        idx = torch.arange(b, min(rows.stop, b + batch_size))
        x, y, unreadable = data.batch(idx, torch.zeros(len(idx), dtype=torch.bool))
        bad += unreadable
        x = x.to(device)
        pairs = [pipe.encode(x), pipe.encode(x.flip(-1))]
        zs.append(torch.stack([pairs[0][0], pairs[1][0]], 1).float().cpu().numpy())
        if pairs[0][1] is not None:
            bases.append(torch.stack([pairs[0][1], pairs[1][1]], 1).float().cpu().numpy())
        labels.append(y.numpy().astype(np.int64))
        bar.update(len(idx))
    name = f"shard_{s:05d}"
    files = {f"{name}.z.npy": _write_npy(out / f"{name}.z.npy", np.concatenate(zs).astype(dtype))}
    if bases:
        files[f"{name}.base.npy"] = _write_npy(out / f"{name}.base.npy", np.concatenate(bases).astype(dtype))
    files[f"{name}.labels.npy"] = _write_npy(out / f"{name}.labels.npy", np.concatenate(labels))
    record = {"start": rows.start, "count": len(rows), "files": files}
    atomic_write_text(out / f"{name}.json", json.dumps(record))
    return bad


# --------------------------------------------------------------------------- the cache training makes


def training_cache(cfg: Config, data, *, identity: Callable[[], tuple[str, str]] | None,
                   world: World | None = None, progress: bool = False) -> LatentCache | None:
    """The latent cache a run trains from, as ``train.latent_cache`` says; made or completed here (by
    every process of ``world``); None: train from the images, as always in pixel space.

    ``data``: the run's image data (a :class:`msf.training.data.TrainingData`); ``identity()``: a name
    for it and a key that changes with its contents (for ``auto``'s folder); None: a data set passed
    as an object msf cannot key a cache by.
    """
    setting = cfg.train.latent_cache
    if setting == "off" or cfg.model.autoencoder.kind == "identity":
        return None  # pixel space: its "encoding" is a multiplication, nothing to save
    explicit = setting != "auto"
    why = _ruled_out(cfg, identity is None and not explicit)
    if why and explicit:
        raise ConfigError(f"train.latent_cache={setting}: {why}; set train.latent_cache=off")
    world = world or current_world()
    if why:
        _say(progress and world.is_main, f"training from the images, not a latent cache: {why}")
        return None
    path = Path(setting).expanduser() if explicit else _from_main(lambda: auto_dir(cfg, *identity()), world)
    try:
        return _open_or_make(cfg, data, path, world, progress and world.is_main)
    except CacheError as e:
        raise CacheError(f"train.latent_cache={setting}: {e}") from None


def _ruled_out(cfg: Config, unknown: bool) -> str:
    """Why this run cannot train from a cache ("": it can)."""
    if cfg.model.autoencoder.sample_posterior:
        return "model.autoencoder.sample_posterior=true draws a new latent of each image every step"
    if cfg.train.repa_encoder:
        return "train.repa_encoder reads the images"
    if unknown:
        return ("the data set passed is neither images in memory nor an image folder: nothing to key "
                "a cache by")
    return ""


def _open_or_make(cfg: Config, data, path: Path, world: World, say: bool) -> LatentCache:
    """The cache at ``path``, made or completed first unless every process finds it complete."""
    cache = _complete(path)
    if any_rank([cache is None], world)[0]:
        _say(say, f"encoding train.data={cfg.train.data} once into a latent cache at {path} "
                  f"({len(data)} examples and their mirrors; later runs reuse it)")
        try:
            write_cache(cfg, path, world, data, shard_size=SHARD_SIZE, dtype=DTYPE, progress=say)
        except OSError as e:
            raise CacheError(f"could not write {path} ({e}); set MSF_CACHE_DIR or train.latent_cache to a "
                             "folder with room, or train.latent_cache=off") from None
        cache = LatentCache(path)
    else:
        _say(say, f"training from the latent cache at {path} ({len(cache)} examples, made before)")
    cache.check_model(cfg)
    if len(cache) != len(data) or cache.class_names != list(data.class_names):
        raise CacheError(f"{path}: made from other data ({len(cache)} examples of {cache.num_classes} "
                         f"classes; train.data={cfg.train.data} has {len(data)} of {len(data.class_names)})")
    return cache


def _complete(path: Path) -> LatentCache | None:
    """The cache at ``path`` if it is whole; None if it is absent, unfinished or damaged (made again)."""
    if not (path / "manifest.json").is_file():
        return None
    try:
        return LatentCache(path)
    except (ValueError, KeyError, OSError):  # CacheError included
        return None


def cache_root() -> Path:
    """``$MSF_CACHE_DIR``, else ``$XDG_CACHE_HOME/msf``, by default ``~/.cache/msf``."""
    root = os.environ.get("MSF_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "msf"
    return Path(root).expanduser()


def auto_dir(cfg: Config, name: str, data_key: str) -> Path:
    """Where ``train.latent_cache=auto`` keeps the cache of data ``name`` (whose contents ``data_key``
    identifies) for this model: another autoencoder, its weights changed, other sizes or other data
    make another folder."""
    key = json.dumps([VERSION, DTYPE, SHARD_SIZE, cache_key(cfg), autoencoder_files(cfg.model.autoencoder),
                      data_key], sort_keys=True)
    safe = re.sub(r"[^\w.-]+", "_", name).strip("._") or "data"
    return cache_root() / "latents" / f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def autoencoder_files(ae: AutoencoderConfig) -> list:
    """(name, size, modification time) of each file of a local or shipped autoencoder folder: one trained
    again in place is another autoencoder. A hub id names its weights by itself: []."""
    if not ae.path:
        return []
    from msf.method.autoencoder import shipped_autoencoders

    local = Path(ae.path).expanduser()
    if not local.exists():
        local = shipped_autoencoders() / ae.path
    if not local.is_dir():
        return []
    return sorted([str(f.relative_to(local)), st.st_size, st.st_mtime_ns]
                  for f in local.rglob("*") if f.is_file() for st in [f.stat()])


def current_world() -> World:
    """The torchrun world this process is already in (a world of one outside torchrun), on the device
    it set up (CUDA once initialised, else the CPU): for callers not handed their world."""
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    cuda = torch.cuda.is_initialized()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return World(rank=dist.get_rank() if on else 0, size=dist.get_world_size() if on else 1,
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")), device=dev)


def _from_main(make: Callable[[], Path], world: World) -> Path:
    """``make()`` on the main process, the same value on all: the data's files are listed once, and a
    node whose copy of them differs (other modification times) cannot pick another folder."""
    if not world.distributed:
        return make()
    import torch.distributed as dist

    box: list = [None]
    if world.is_main:
        try:
            box[0] = make()
        except Exception as e:  # raised on every process: the others would wait for the value forever
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def _say(on: bool, line: str) -> None:
    if on:
        print(f"[msf] {line}", file=sys.stderr, flush=True)
