"""Training checkpoints: atomic, pruned, verified on load, never unpickling code.

A checkpoint is one file ``<out_dir>/checkpoints/step_000001000.pt`` holding
everything a resumed run needs to continue as if never stopped: every scale's
weights, EMA weights and optimizer state, the step, the loss history, and the
resolved config (no RNG states: every random draw of step s is a function of the
seed and s, see ``msf.training.train.TrainState``). It is written with ``torch.save`` through
``msf.files.atomic_write`` (a temporary file, fsync'ed, renamed), so a crash or SIGKILL at any moment
leaves either the old set of checkpoints or the new one, never a torn file; it
is read back with ``torch.load(weights_only=True)``, which loads tensors and
plain containers only.

``train.ckpt_format=sharded`` writes a directory ``step_000001000/`` instead, with
torch.distributed.checkpoint (DCP): every process writes its own shards of the weights and
optimizer state (nothing is gathered to one process), and ``msf.json`` holds the rest (step,
history, config). It is written under a temporary name (``.step_000001000.partial``) and renamed
once DCP's ``.metadata`` and then ``msf.json`` are written, so only a finished one is ever listed.
It loads into any number of processes (DCP reshards), or whole into one (:func:`read_sharded`).
Its ``.metadata`` is read with an unpickler that admits DCP's own metadata classes only.

(Model directories for sampling are safetensors + JSON, see ``msf.method.pipeline``.)

Also here, a run's bookkeeping: :class:`Checkpoints` (the newest to resume from; saving, then
pruning), claiming the run directory, taking the scales a job does not train from another run, and the
weights a fresh run starts from (``train.init_from``).
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import re
import shutil
import types
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist
from torch import nn

from msf.config import RESUMABLE_FIELDS, SAMPLING_FIELDS, Config, ConfigError, ModelConfig, from_dict, to_dict
from msf.files import atomic_write, atomic_write_text
from msf.training.distributed import World, barrier, full_state

if TYPE_CHECKING:
    from msf.method.pipeline import MSFPipeline

FORMAT = "msf-train-checkpoint"
VERSION = 1
MARKER = "msf.json"  # a sharded checkpoint's own file, written last: its presence marks a finished save
_NAME = re.compile(r"^step_(\d{9})\.pt$")
_DIR_NAME = re.compile(r"^step_(\d{9})$")
_TEMP_DIR = re.compile(r"^\.step_(\d{9})\.(partial|old)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not belong to this run."""


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:09d}.pt"


def sharded_checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:09d}"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A directory that is (or, damaged, was meant to be) a sharded checkpoint."""
    path = Path(path)
    return path.is_dir() and ((path / MARKER).is_file() or bool(_DIR_NAME.match(path.name)))


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in ``directory``, files and sharded directories, oldest first.

    Temporary names (a save not finished) start with a dot and are never listed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name) or (_DIR_NAME.match(p.name) if p.is_dir() else None)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``."""
    payload = {"format": FORMAT, "version": VERSION, "step": step, **state}
    return atomic_write(checkpoint_path(Path(directory), step), lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint file's whole state; for a sharded directory, its ``msf.json`` (step, history,
    config) with ``"dcp"``: the directory, whose tensors :func:`load_sharded_into` or
    :func:`read_sharded` read. Either way the checkpoint is checked to be complete first."""
    path = Path(path)
    if path.is_dir():
        return _sharded_meta(path)
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
    """Cheap check, without loading: a file ``torch.save`` finished (a zip with its directory), or a
    sharded directory with its marker, DCP's metadata and every shard file, whole."""
    if path.is_dir():
        try:
            _sharded_meta(path)
        except CheckpointError:
            return False
        return True
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
        if path.is_dir():
            # renamed out of the listing first: a crash while deleting leaves no half directory behind
            # that would look like a damaged checkpoint
            gone = path.with_name(f".{path.name}.old")
            shutil.rmtree(gone, ignore_errors=True)
            os.replace(path, gone)
            shutil.rmtree(gone, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    for p in Path(directory).iterdir() if Path(directory).is_dir() else ():
        if _TEMP_DIR.match(p.name) and p.is_dir():  # a sharded save or deletion cut short earlier
            shutil.rmtree(p, ignore_errors=True)
    return removed


# --------------------------------------------------------------------------- sharded checkpoints (DCP)


def _in_group() -> bool:
    return dist.is_available() and dist.is_initialized()


# DCP warns on every single-process save or load, which is what msf means by them
_SINGLE_PROCESS_WARNING = "torch.distributed is .*assuming the intent"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_sharded_checkpoint(directory: str | os.PathLike, step: int, tensors: dict, meta: dict) -> Path:
    """Write the checkpoint of ``step`` as a DCP directory; collective: every process calls it.

    ``tensors`` (nested dicts of tensors, DTensors under FSDP, and plain values) is written by
    DCP, each process its own shards (replicated tensors once); ``meta`` (plain JSON) goes to
    ``msf.json``. Everything lands in ``.step_<step>.partial`` first; the main process renames it
    once DCP's ``.metadata`` (written after every shard) and then ``msf.json`` are on disk.
    Needs a file system every process sees (on several nodes: a shared one).
    """
    directory = Path(directory)
    final = sharded_checkpoint_path(directory, step)
    tmp, old = directory / f".{final.name}.partial", directory / f".{final.name}.old"
    group = _in_group()
    main = not group or dist.get_rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this step cut short earlier
        tmp.mkdir(parents=True)
    if group:
        dist.barrier()  # nobody writes into the directory before it is emptied
    dcp = _dcp().dcp
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not group)
    # dcp.save returns on every process only after the main one wrote .metadata
    if main:
        atomic_write_text(tmp / MARKER, json.dumps(
            {"format": FORMAT, "version": VERSION, "step": step, "ckpt_format": "sharded", **meta}))
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resume from an older checkpoint got here)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(directory)
        shutil.rmtree(old, ignore_errors=True)
    return final


class _MetadataUnpickler(pickle.Unpickler):
    """DCP pickles its ``.metadata``; admit the classes it is made of and nothing else (no code)."""

    ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "TensorStorageMetadata", "TensorProperties", "BytesStorageMetadata",
            "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str):
        if name in self.ALLOWED.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


def _dcp_metadata(path: Path):
    try:
        with open(path / ".metadata", "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: DCP's .metadata is missing") from None
    except Exception as e:  # a damaged pickle raises many kinds
        raise CheckpointError(f"{path}: DCP's .metadata is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(md, _dcp().Metadata) or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"{path}: DCP's .metadata holds no checkpoint metadata")
    return md


def _sharded_meta(path: Path) -> dict:
    """``msf.json`` of a sharded checkpoint, after checking, without reading the shards, that every
    shard file DCP's metadata names is there and long enough."""
    try:
        meta = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MARKER}: not a finished sharded checkpoint") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: {MARKER} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an msf training checkpoint (field 'format' of {MARKER})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')}, expected {VERSION}")
    need: dict[str, int] = {}
    for info in _dcp_metadata(path).storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        try:
            have = (path / name).stat().st_size
        except OSError:
            raise CheckpointError(f"{path}: shard file {name} is missing") from None
        if have < size:
            raise CheckpointError(f"{path}: shard file {name} is cut short ({have} of {size} bytes)")
    return {**meta, "dcp": str(path)}


@functools.cache
def _dcp():
    """torch.distributed.checkpoint, and msf's reader and planner for it, on first use: importing it
    takes 0.7 s, which sampling from a model directory or a full checkpoint need not wait for."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

    class Reader(dcp.FileSystemReader):
        """DCP's reader, with ``.metadata`` read by :class:`_MetadataUnpickler`."""

        def read_metadata(self, *args, **kwargs) -> Metadata:
            md = _dcp_metadata(Path(self.path))
            md.storage_meta = md.storage_meta or StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class Planner(dcp.DefaultLoadPlanner):
        """DCP's planner, reading plain values (optimizer settings) with ``weights_only=True``."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            # DCP would unpickle these without restriction; load them safely, and hand DCP a copy of
            # the now plain value (torch.save of plain data), which its own torch.load only rebuilds
            plain = torch.load(value, weights_only=True)
            buf = io.BytesIO()
            torch.save(plain, buf)
            buf.seek(0)
            super().load_bytes(read_item, buf)

    return types.SimpleNamespace(dcp=dcp, Reader=Reader, Planner=Planner, Metadata=Metadata,
                                 TensorStorageMetadata=TensorStorageMetadata)


def _dcp_load(path: Path, into: dict, single: bool) -> None:
    d = _dcp()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
            d.dcp.load(into, storage_reader=d.Reader(path), planner=d.Planner(),
                       no_dist=single or not _in_group())
    except CheckpointError:
        raise
    except Exception as e:  # DCP wraps each process's failure in its own exception type
        raise CheckpointError(f"{path}: the sharded checkpoint does not load ({type(e).__name__}: "
                              f"{str(e).strip()[:2000]})") from None


def load_sharded_into(path: str | os.PathLike, into: dict) -> None:
    """Fill ``into`` (nested dicts of tensors, DTensors under FSDP, shaped as saved) in place from a
    sharded checkpoint; collective under torch.distributed. Each process reads the pieces its
    shards need, whatever the number of processes that wrote it (DCP reshards)."""
    _dcp_load(Path(path), into, single=False)


def read_sharded(path: str | os.PathLike, keys: Sequence[str] | None = None) -> dict:
    """The whole state of a sharded checkpoint in this one process, shaped as a checkpoint file's
    (``models``, ``emas``, ``optimizers``, ``step``, ``history``, ...); with ``keys``, only those
    top-level entries' tensors (``["emas"]`` for sampling). No process group is needed."""
    path = Path(path)
    meta = _sharded_meta(path)
    md = _dcp_metadata(path)
    state: dict = {}
    for fqn, item in md.state_dict_metadata.items():
        where = (md.planner_data or {}).get(fqn, (fqn,))
        if keys is not None and where[0] not in keys:
            continue
        _set(state, where, torch.empty(item.size, dtype=item.properties.dtype)
             if isinstance(item, _dcp().TensorStorageMetadata) else None)
    _dcp_load(path, state, single=True)
    meta.pop("dcp")
    return {**meta, **state}


def _set(root: dict, where: Sequence, value) -> None:
    """``root[where[0]][where[1]]... = value``, making dicts (str keys) and lists (int keys) on the way."""
    node = root
    for key, nxt in zip(where[:-1], where[1:]):
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            if node[key] is None:
                node[key] = [] if isinstance(nxt, int) else {}
            node = node[key]
        else:
            node = node.setdefault(key, [] if isinstance(nxt, int) else {})
    if isinstance(node, list):
        node.extend([None] * (where[-1] + 1 - len(node)))
    node[where[-1]] = value


# ---------------------------------------------------------------------- a run's checkpoints and directory


def network_states(networks: Sequence[nn.Module], emas: Sequence[nn.Module],
                   opts: dict[int, torch.optim.Optimizer], sharded: bool = False) -> dict:
    """Every scale's raw and EMA weights and its optimizer's state (``models``, ``emas``, ``optimizers``):
    whole, on the CPU (collective under FSDP: every process calls it), or with ``sharded`` this process's
    own tensors, nothing gathered or copied, for DCP to save or to load into in place."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opt, scales = StateDictOptions() if sharded else full_state(), range(len(networks))
    return {
        "models": {str(k): get_model_state_dict(networks[k], options=opt) for k in scales},
        "emas": {str(k): get_model_state_dict(emas[k], options=opt) for k in scales},
        "optimizers": {str(k): get_optimizer_state_dict(networks[k], o, options=opt)
                       for k, o in opts.items()},
    }


def load_network_states(networks: Sequence[nn.Module], emas: Sequence[nn.Module],
                        opts: dict[int, torch.optim.Optimizer], state: dict) -> None:
    """The weights and optimizer states of :func:`network_states` back in place, from a checkpoint file's
    state or a sharded checkpoint's ``msf.json`` (its ``"dcp"`` directory is read here, each process its
    own shards, resharded from any process count); collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    load = StateDictOptions(full_state_dict=True)
    if "dcp" in state:
        tensors = network_states(networks, emas, opts, sharded=True)
        load_sharded_into(state["dcp"], tensors)
        state, load = {**state, **tensors}, StateDictOptions()
    for k in range(len(networks)):
        set_model_state_dict(networks[k], state["models"][str(k)], options=load)
        set_model_state_dict(emas[k], state["emas"][str(k)], options=load)
    for k, opt in opts.items():
        set_optimizer_state_dict(networks[k], opt, state["optimizers"][str(k)], options=load)


class _Saveable(Protocol):
    """What the run's checkpoints save: ``msf.training.train.TrainState``."""

    step: int

    def state_dict(self, sharded: bool = False) -> dict: ...


class Checkpoints:
    """A run's checkpoints (``<out_dir>/checkpoints``): the newest to resume from, and saving (atomic,
    then pruned); also the run's ``config.json``."""

    def __init__(self, directory: Path, cfg: Config, world: World, enabled: bool):
        self.directory, self.cfg, self.world, self.enabled = directory, cfg, world, enabled
        self.last: Path | None = None  # the newest good checkpoint, for error messages and the result
        self.saved_step = -1

    def latest(self) -> tuple[dict, Path] | None:
        """The newest good checkpoint and its path, checked against this run's config."""
        found = load_latest(self.directory)
        if found is None and self.world.is_main:
            print(f"[msf] no checkpoint in {self.directory}: starting from scratch", flush=True)
        if found is not None:
            check_resume(self.cfg, found)
            self.last, self.saved_step = found[1], int(found[0]["step"])
        return found

    def save_config(self, precision_asked: str) -> None:
        """``<out_dir>/config.json``: the run's resolved config, with the precision as asked ("auto" stays
        "auto", so that a resume on another machine resolves it anew)."""
        if self.enabled and self.world.is_main:
            out = self.directory.parent
            out.mkdir(parents=True, exist_ok=True)
            asked = to_dict(self.cfg)
            asked["train"]["precision"] = precision_asked
            (out / "config.json").write_text(json.dumps(asked, indent=2))

    def save(self, state: _Saveable) -> None:
        """Collective: every process calls it (FSDP gathers, or each process writes its shards)."""
        if not self.enabled:
            return
        if self.cfg.train.ckpt_format == "sharded":  # every process writes its own shards, none gathers
            meta = state.state_dict(sharded=True)
            tensors = {key: meta.pop(key) for key in ("models", "emas", "optimizers")}
            self.last = save_sharded_checkpoint(self.directory, state.step, tensors, {
                "config": to_dict(self.cfg), **meta, "world_size": self.world.size})
        else:
            full = state.state_dict()  # collective under FSDP: every process takes part
            if self.world.is_main:
                self.last = save_checkpoint(self.directory, state.step, {
                    "config": to_dict(self.cfg), **full, "world_size": self.world.size})
        if self.world.is_main:
            prune(self.directory, self.cfg.train.keep_last, self.cfg.train.keep_every)
        self.saved_step = state.step
        barrier(self.world)


def check_resume(cfg: Config, found: tuple[dict, Path]) -> None:
    """A checkpoint must belong to this model; train changes that alter the run are warned about.

    The run then takes the checkpoint's measured ``model.component_std``.
    """
    saved, path = from_dict(Config, found[0]["config"], "checkpoint config"), found[1]
    a, b = to_dict(cfg.model), to_dict(saved.model)
    for d in (a, b):  # the measured std, and how the model samples: neither changes what training computes
        d["component_std"], d["samplers"] = None, {}
        for s in d["scales"]:
            for key in SAMPLING_FIELDS:
                s.pop(key)
    if a != b:
        diff = [k for k in a if a[k] != b[k]]
        raise CheckpointError(
            f"{path}: the checkpoint's model config differs from this run's in {diff}; "
            "resume with the config saved in the run directory (config.json)"
        )
    if cfg.train.scale != saved.train.scale:
        raise CheckpointError(
            f"{path}: the checkpoint trains scale {saved.train.scale!r}, this run {cfg.train.scale!r}"
        )
    ta, tb = to_dict(cfg.train), to_dict(saved.train)
    changed = [k for k in ta if ta[k] != tb[k] and k not in RESUMABLE_FIELDS]
    if ta["lr_schedule"] == "cosine" and (ta["steps"], ta["scale_steps"]) != (tb["steps"], tb["scale_steps"]):
        changed.append("steps (the cosine schedule spans the total)")
    if changed:
        warnings.warn(
            f"resuming with train settings changed from the checkpoint's: {changed}; "
            "the run will not equal an uninterrupted one", stacklevel=4,
        )
    cfg.model.component_std = saved.model.component_std


RUN_FILES = ("checkpoints", "model", "samples", "tb", "losses.json", "config.json", "unreadable_images.txt")


def claim_run_directory(out: Path, world: World, overwrite: bool) -> None:
    """A fresh run never mixes with an earlier one: refuse the directory, or delete that run first."""
    found = [out / name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return
    if not overwrite:
        raise ConfigError(
            f"{out}: holds an earlier run ({', '.join(p.name for p in found)}). Continue it with --resume, "
            "train into another train.out_dir, or pass --overwrite to delete that run first"
        )
    if world.is_main:
        for p in found:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    barrier(world)


def _check_same_model(mine: dict, theirs: dict, where: str) -> None:
    """What every scale's weights assume (classes, autoencoder, priors, scale sizes) alike in two model
    configs (as dicts); ``where`` names the setting that brought the other one."""
    for key in ("num_classes", "autoencoder", "base_mode", "prior", "normalize"):
        if mine[key] != theirs[key]:
            raise ConfigError(f"{where}: model.{key} is {theirs[key]!r} there, {mine[key]!r} here")
    if [s["image_size"] for s in mine["scales"]] != [s["image_size"] for s in theirs["scales"]]:
        raise ConfigError(f"{where}: its scale sizes differ from this run's")


def take_other_scales(pipe: MSFPipeline, cfg: Config, scales: list[int], src: Path) -> None:
    """Take the scales this job does not train from another run's model directory.

    This is how per-scale jobs meet: train scale 0 in one job, then scale 1 with
    ``train.other_scales_from=<scale-0 run>/model``, and the second run's model
    directory holds both.
    """
    from msf.method.pipeline import MSFPipeline

    other = MSFPipeline.from_pretrained(src, autoencoder=pipe.autoencoder)
    a, b = to_dict(cfg.model), to_dict(other.config)
    _check_same_model(a, b, f"train.other_scales_from={src}")
    for k in range(pipe.num_scales):
        if k not in scales:
            if a["scales"][k] != b["scales"][k]:
                raise ConfigError(f"train.other_scales_from={src}: scale {k} differs "
                                  f"({b['scales'][k]} there, {a['scales'][k]} here)")
            pipe.networks[k].load_state_dict(other.networks[k].state_dict())
    if cfg.model.normalize == "std" and other.config.component_std != cfg.model.component_std:
        raise ConfigError(f"train.other_scales_from={src}: its component_std "
                          f"{other.config.component_std} differs from this run's "
                          f"{cfg.model.component_std} (different data or seed?)")


def take_initial_weights(pipe: MSFPipeline, cfg: Config, src: str) -> str:
    """``train.init_from``: every scale of a fresh run starts from the EMA weights of ``src`` (a model or
    run directory, a checkpoint, a shipped name or hub id: what ``msf sample`` reads), which must be the
    same architecture; returns a line saying what was taken.

    A scale made ``meanflow`` from a ``flow`` one (a fine-tune into a few-step scale, as Decoupled MeanFlow
    does) takes all the flow weights, and its interval embedder, which the flow network lacks, starts with
    its output layer at zero: the network then equals the flow network for every ``r``, ``u(x, r, t) =
    v(x, t)``, and the embedder trains from there (its output layer's gradient is not zero). With
    ``model.normalize=std`` the run takes ``src``'s component std, the one its weights were trained with.
    """
    where = f"train.init_from={src}"
    theirs, states, path = _initial_source(src, pipe, where)
    _check_same_model(to_dict(cfg.model), to_dict(theirs), where)
    made_meanflow = []
    for k, (mine, other) in enumerate(zip(cfg.model.scales, theirs.scales)):
        for key in to_dict(mine):
            if key not in (*SAMPLING_FIELDS, "objective") and getattr(mine, key) != getattr(other, key):
                raise ConfigError(f"{where}: scale {k}'s {key} is {getattr(other, key)!r} there, "
                                  f"{getattr(mine, key)!r} here; only a scale's objective (flow to meanflow) "
                                  "and sampler settings may change")
        if (other.objective, mine.objective) == ("meanflow", "flow"):
            raise ConfigError(f"{where}: scale {k} is a meanflow network there (the average velocity); it "
                              f"cannot start a flow scale: set model.scales.{k}.objective=meanflow")
        new = other.objective != mine.objective  # flow to meanflow: the interval embedder is new
        _load_fitting(pipe.networks[k], states[k], k, where, new)
        made_meanflow += [k] if new else []
    if cfg.model.normalize == "std":
        if cfg.model.component_std is None:
            cfg.model.component_std = theirs.component_std
        elif cfg.model.component_std != theirs.component_std:
            raise ConfigError(f"{where}: its component_std {theirs.component_std} differs from this run's "
                              f"{cfg.model.component_std}: leave model.component_std unset to take it")
    made = "".join(f"; scale {k}: flow made meanflow, the flow network for every r at start (its interval "
                   "embedder's output layer at zero)" for k in made_meanflow)
    return f"{where}: every scale from the EMA weights of {path}{made}"


def _initial_source(src: str, pipe: MSFPipeline, where: str) -> tuple[ModelConfig, list[dict], Path]:
    """The model config of what ``train.init_from`` names, its EMA weights per scale, and the path read:
    a run directory's newest checkpoint (else its model directory), a checkpoint, or a model."""
    from msf.method.model_dir import ModelDirError
    from msf.method.pipeline import MSFPipeline, load_model_config

    path, state = Path(src).expanduser(), None
    try:
        if path.is_dir() and ((path / "checkpoints").is_dir() or (path / "model").is_dir()):  # a run
            found = load_latest(path / "checkpoints")
            state, path = found if found is not None else (None, path / "model")
        elif path.is_file() or is_sharded_checkpoint(path):
            state = load_checkpoint(path)
        if state is None:  # a model directory, a shipped name or a hub id
            model = src if path == Path(src).expanduser() else path
            config = load_model_config(model)  # before building networks: a missing model says so
            # on the run's device, where from_pretrained also moves the autoencoder it shares
            other = MSFPipeline.from_pretrained(model, autoencoder=pipe.autoencoder, device=pipe.device)
            return config, [net.state_dict() for net in other.networks], path
        config = from_dict(Config, state["config"], f"{path}: its config").model
        if "dcp" in state:  # sharded: the EMA weights only, whole, in this process
            state = read_sharded(state["dcp"], keys=["emas"])
        return config, [state["emas"][str(k)] for k in range(config.num_scales)], path
    except (ModelDirError, CheckpointError) as e:
        raise ConfigError(f"{where}: {e}") from None
    except KeyError as e:
        raise ConfigError(f"{where}: {path} is not a checkpoint msf train wrote (no {e})") from None


def _load_fitting(net: nn.Module, theirs: dict, k: int, where: str, new_interval: bool) -> None:
    """``theirs`` into scale k's network, every weight of the same name and shape, refused otherwise;
    ``new_interval``: the interval embedder is the network's own, its output layer zeroed."""
    mine = net.state_dict()
    fresh = {key for key in mine if new_interval and key.startswith("interval_embedder.")}
    missing = sorted(set(mine) - set(theirs) - fresh)
    extra = sorted(set(theirs) - set(mine))
    if missing or extra:
        raise ConfigError(f"{where}: scale {k}'s weights do not fit this run's network (missing there: "
                          f"{missing[:4]}, not here: {extra[:4]})")
    for key, w in theirs.items():
        if tuple(w.shape) != tuple(mine[key].shape):
            raise ConfigError(f"{where}: scale {k}'s {key} is {tuple(w.shape)} there, "
                              f"{tuple(mine[key].shape)} here")
    net.load_state_dict(theirs, strict=not fresh)
    if fresh:
        out = net.interval_embedder.mlp[-1]  # its output layer: the embedding adds exactly 0 at start
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
