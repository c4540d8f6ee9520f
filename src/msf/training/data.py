"""Datasets: the built-in emoji and digit sets, and in-memory batching for small data.

The built-in sets ship with the package: 1,870 emoji from Noto Color Emoji, labelled by their 9
Unicode groups, at 32 x 32 (``msf/data/emoji32.npz``, the name ``emoji``) and the same glyphs at
64 x 64 (``emoji64.npz``, for latent-space models); and 6,568 renderings of the digits 0-9 from 977
font files of Debian's font packages, 10 classes at 32 x 32 (``glyphs32.npz``, the name ``glyphs``:
set ``train.random_flip=false`` for it, a mirrored digit is not a digit). ``msf/data/README.md``
says how they were made, and their licences.

**The dataset protocol** (what ``train(cfg, data=...)`` takes besides msf's own sets): an object
with ``labels`` (int64 tensor, one per example, classes 0..C-1), ``class_names`` (C strings),
``__len__``, and ``__getitem__(i) -> (image, label, bad_file)``, the image uint8 (H, W, 3) at the
model's size and ``bad_file`` "" (or the path of a file that could not be read and was replaced).
:class:`msf.training.imagefolder.ImageFolder` is one. A torchvision-style dataset, whose items are ``(image,
label)`` with a PIL image or a float (3, H, W) tensor in [0, 1], is adapted by :class:`TorchvisionData`
(done for you by ``train``).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from torch import Tensor

from msf.config import Config, ConfigError
from msf.method.factorize import resize_image

if TYPE_CHECKING:
    from msf.training.distributed import World
    from msf.training.imagefolder import ImageFolder
    from msf.training.latent_cache import LatentCache

T = TypeVar("T")


@dataclass
class ImageDataset:
    images: Tensor  # uint8 (N, H, W, 3)
    labels: Tensor  # int64 (N,)
    class_names: list[str]
    names_given: bool = True  # False: a .npz without class names, named "0", "1", ... here
    mirror_ok: bool = True  # False: a mirrored image is not of its class (digits, text)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


BUILTIN_NAMES = ("emoji", "emoji32", "emoji64", "glyphs", "glyphs32")  # what train.data (and --ref) take


def builtin_file(name: str) -> str:
    """The shipped file a built-in name reads: "emoji" and "glyphs" are the 32 px sets."""
    return {"emoji": "emoji32", "glyphs": "glyphs32"}.get(name, name)


def builtin_path(name: str = "emoji32") -> Path:
    return Path(str(resources.files("msf") / "data" / f"{name}.npz"))


def _mirror_ok(npz) -> bool:
    """An .npz may say that a mirrored image is not of its class (``mirror_ok``: False, e.g. digits)."""
    return bool(npz["mirror_ok"]) if "mirror_ok" in npz.files else True


def load_builtin(name: str = "emoji32") -> ImageDataset:
    """The built-in labelled colour dataset (offline, shipped with the package)."""
    path = builtin_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the built-in dataset {name!r} is missing from the install")
    with np.load(path, allow_pickle=False) as d:
        return ImageDataset(
            images=torch.from_numpy(d["images"]),
            labels=torch.from_numpy(d["labels"]).long(),
            class_names=[str(c) for c in d["class_names"]],
            mirror_ok=_mirror_ok(d),
        )


def load_dataset(spec: str, image_size: int | None = None, strict: bool = False
                 ) -> ImageDataset | ImageFolder | LatentCache:
    """The training data a config names.

    ``"emoji"``: the built-in set. A ``.npz`` with ``images`` (N, H, W, 3 uint8) and
    ``labels``: loaded into memory. A latent cache made by ``msf extract``
    (:mod:`msf.training.latent_cache`). A directory with one sub-folder per class (the
    ImageNet train layout): read lazily with ADM's centre crop to ``image_size``
    (:mod:`msf.training.imagefolder`).
    """
    if spec in BUILTIN_NAMES:
        return load_builtin(builtin_file(spec))
    path = Path(spec)
    if path.is_dir() and (path / "manifest.json").is_file():
        from msf.training.latent_cache import LatentCache

        return LatentCache(path)
    if path.is_dir():
        from msf.training.imagefolder import ImageFolder

        if image_size is None:
            raise ValueError(f"data {spec!r}: an image folder needs the model's image size")
        return ImageFolder(path, image_size, strict=strict)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as d:
            for key in ("images", "labels"):
                if key not in d:
                    raise ValueError(f"{path}: missing array {key!r}")
            images, labels = d["images"], d["labels"]
            names = [str(c) for c in d["class_names"]] if "class_names" in d else None
            mirror_ok = _mirror_ok(d)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{path}: 'images' must be uint8 (N, H, W, 3), got {images.shape}")
        n_cls = int(labels.max()) + 1
        return ImageDataset(
            torch.from_numpy(images), torch.from_numpy(labels).long(),
            names or [str(i) for i in range(n_cls)], names_given=names is not None, mirror_ok=mirror_ok,
        )
    raise ValueError(
        f"data {spec!r}: expected a built-in set ({', '.join(BUILTIN_NAMES)}), an existing .npz file, or "
        "a directory with one sub-folder of images per class"
    )


def to_model_range(images: Tensor) -> Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: Tensor) -> Tensor:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu()


def prepare_data(data: ImageDataset, image_size: int) -> ImageDataset:
    """Resize an in-memory dataset once to the model's image size (antialiased), if it differs."""
    if data.image_size == image_size:
        return data
    x = resize_image(to_model_range(data.images), image_size)
    return ImageDataset(to_uint8(x), data.labels, data.class_names, data.names_given, data.mirror_ok)


def _generator(*keys: int) -> torch.Generator:
    """A generator seeded by a tuple of integers (seed, step, purpose ...)."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class IndexStream:
    """Which examples, flipped or not, make the global batch of each step.

    Stateless: step s's batch is a pure function of (seed, s), so resuming at step s
    needs nothing but s, every process of a torchrun job computes the same global
    batch and takes its own slice, and the global batch does not depend on how many
    processes share it.

    ``balance_classes`` draws examples with probability ``1 / count(class)`` (with
    replacement), so every class is seen equally often; otherwise the data is read
    in a fresh random order each epoch.
    """

    def __init__(
        self, labels: Tensor, global_batch: int, *, seed: int = 0, balance_classes: bool = True,
        flip: bool = True,
    ):
        self.n = len(labels)
        self.global_batch = global_batch
        self.seed = seed
        self.balance = balance_classes
        self.flip = flip
        counts = torch.bincount(labels).float()
        self.weights = 1.0 / counts[labels]
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.n, generator=_generator(self.seed, epoch, 1))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """(indices, flips) of the global batch of ``step`` (1-based)."""
        g = _generator(self.seed, step, 2)
        if self.balance:
            idx = torch.multinomial(self.weights, self.global_batch, replacement=True, generator=g)
        else:
            pos = torch.arange((step - 1) * self.global_batch, step * self.global_batch)
            idx = torch.empty_like(pos)
            for epoch in (pos // self.n).unique().tolist():
                sel = pos // self.n == epoch
                idx[sel] = self._permutation(epoch)[pos[sel] % self.n]
        flips = torch.rand(self.global_batch, generator=g) < 0.5
        return idx, flips & self.flip

    def rank_slice(self, step: int, rank: int, world: int) -> tuple[Tensor, Tensor]:
        idx, flips = self.batch(step)
        per = self.global_batch // world
        return idx[rank * per:(rank + 1) * per], flips[rank * per:(rank + 1) * per]


def apply_flips(x: Tensor, flips: Tensor) -> Tensor:
    """Horizontally flip the images of a (B, C, H, W) batch where ``flips`` is True."""
    return torch.where(flips.to(x.device)[:, None, None, None], x.flip(-1), x)


class _StepBatches(torch.utils.data.Sampler):
    """Yields this process's index list for each step in [start, end]."""

    def __init__(self, stream: IndexStream, start: int, end: int, rank: int, world: int):
        self.stream, self.start, self.end, self.rank, self.world = stream, start, end, rank, world

    def __iter__(self):
        for step in range(self.start, self.end + 1):
            yield self.stream.rank_slice(step, self.rank, self.world)[0].tolist()

    def __len__(self) -> int:
        return max(0, self.end - self.start + 1)


def _collate(items):
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items], dtype=torch.long)
    bad = [it[2] for it in items if it[2]]
    return images, labels, bad


class TorchvisionData:
    """A torchvision-style dataset (items ``(image, label)``) in msf's dataset protocol.

    Images are converted as msf's own image folders are (:func:`msf.training.imagefolder.to_rgb`, ADM's centre
    crop to ``image_size``; the files of a torchvision ``DatasetFolder`` without a transform are read by
    msf's own loader); a float tensor image (3, H, W) in [0, 1], as ``ToTensor`` gives, is
    taken as it is and must already have the model's size. Labels come from ``targets`` (torchvision's
    ImageFolder, CIFAR, ...) or, failing that, from one pass over the dataset; class names from
    ``classes``, else ``class_names``, else "0", "1", ...
    """

    def __init__(self, dataset, image_size: int, class_names: list[str] | None = None):
        self.dataset, self.image_size = dataset, image_size
        targets = getattr(dataset, "targets", None)
        if targets is None:
            targets = [int(dataset[i][1]) for i in range(len(dataset))]
        self.labels = torch.as_tensor(list(targets), dtype=torch.int64)
        if len(self.labels) == 0:
            raise ValueError(f"{type(dataset).__name__}: the dataset is empty")
        names = class_names or getattr(dataset, "classes", None) or getattr(dataset, "class_names", None)
        self.names_given = names is not None
        self.class_names = [str(c) for c in names] if names else [
            str(i) for i in range(int(self.labels.max()) + 1)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int, str]:
        from PIL import Image

        from msf.training.imagefolder import center_crop_arr, to_rgb

        ds = self.dataset
        files = getattr(ds, "samples", None)
        if files is not None and getattr(ds, "transform", None) is None and hasattr(ds, "loader"):
            # a torchvision DatasetFolder: read the file with msf's own loader (its pil_loader would drop
            # transparency to black before we could composite it on white)
            from msf.training.imagefolder import load_image

            path, label = files[index][:2]
            return torch.from_numpy(load_image(path, self.image_size)), int(label), ""
        image, label = self.dataset[index][:2]
        if isinstance(image, Image.Image):
            return torch.from_numpy(center_crop_arr(to_rgb(image), self.image_size)), int(label), ""
        x = torch.as_tensor(image)
        if x.dim() != 3 or x.shape[0] != 3 or x.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(f"{type(self.dataset).__name__}[{index}]: an image tensor must be (3, "
                             f"{self.image_size}, {self.image_size}), got {tuple(x.shape)}")
        if x.is_floating_point():
            x = (x.clamp(0, 1) * 255).round()
        return x.to(torch.uint8).permute(1, 2, 0).contiguous(), int(label), ""


def is_torchvision_style(source: object) -> bool:
    """A map-style dataset without msf's ``labels`` and ``class_names``."""
    return (hasattr(source, "__getitem__") and hasattr(source, "__len__")
            and not (hasattr(source, "labels") and hasattr(source, "class_names")))


class TrainingData:
    """The one interface the training loop (and ``msf extract``) sees, whatever holds the data.

    ``labels``, ``class_names`` and ``len`` describe it; :meth:`batch` reads given examples,
    :meth:`batches` the batches of a run's steps. Inputs are images in [-1, 1] (B, 3, H, W), or
    ``(z, base)`` latents when a latent cache holds the data. Behind it:

    * ``"memory"``: the built-in set or a ``.npz`` (:class:`ImageDataset`), resized once to the model;
    * ``"files"``: an image folder (:class:`msf.training.imagefolder.ImageFolder`), decoded lazily, in
      DataLoader worker processes during training;
    * ``"latents"``: a latent cache (:class:`msf.training.latent_cache.LatentCache`), memory-mapped; mirrored
      examples are stored, not computed.
    """

    def __init__(self, source, image_size: int | None = None):
        if isinstance(source, TrainingData):
            source = source.source
        if isinstance(source, ImageDataset) and image_size is not None:
            source = prepare_data(source, image_size)
        if is_torchvision_style(source) and not isinstance(source, ImageDataset):
            if image_size is None:
                raise ValueError("a torchvision-style dataset needs the model's image size")
            source = TorchvisionData(source, image_size)
        self.source = source
        self.kind = ("latents" if hasattr(source, "get") else
                     "memory" if isinstance(source, ImageDataset) else "files")
        self.labels: Tensor = source.labels
        self.class_names: list[str] = list(source.class_names)
        self.names_given: bool = getattr(source, "names_given", True)  # False: numbered by msf

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def batch(self, indices: Tensor, flips: Tensor) -> tuple[Tensor | tuple[Tensor, Tensor | None], Tensor,
                                                              list[str]]:
        """``(inputs, labels, bad_files)`` of the examples at ``indices``, mirrored where ``flips``.

        ``bad_files``: files that could not be decoded and were replaced by their neighbours.
        """
        if self.kind == "latents":
            return self.source.get(indices, flips), self.labels[indices], []
        if self.kind == "memory":
            return apply_flips(to_model_range(self.source.images[indices]), flips), self.labels[indices], []
        images, labels, bad = _collate([self.source[int(i)] for i in indices])
        return apply_flips(to_model_range(images), flips), labels, bad

    def batches(self, stream: IndexStream, start: int, end: int, *, rank: int = 0, world: int = 1,
                num_workers: int = 0):
        """Yield ``(step, inputs, labels, bad_files)`` for steps start..end, this process's share."""
        if self.kind != "files":
            for step in range(start, end + 1):
                yield step, *self.batch(*stream.rank_slice(step, rank, world))
            return
        loader = torch.utils.data.DataLoader(
            self.source, batch_sampler=_StepBatches(stream, start, end, rank, world),
            num_workers=num_workers, collate_fn=_collate, persistent_workers=False,
            prefetch_factor=4 if num_workers > 0 else None,
        )
        try:
            for step, (images, labels, bad) in enumerate(loader, start=start):
                _, flips = stream.rank_slice(step, rank, world)
                yield step, apply_flips(to_model_range(images), flips), labels, bad
        except ValueError as e:  # a loader process's error arrives inside its whole traceback
            text = str(e).strip()
            if "DataLoader worker process" not in text:
                raise
            raise ValueError(text.splitlines()[-1].removeprefix("ValueError: ")) from None


def open_training_data(cfg: Config, data: object = None, *, world: World | None = None,
                       progress: bool = False) -> TrainingData:
    """The training data (``train.data`` unless given); fills in ``model.class_names`` from it
    when the config has none and the class counts agree. What the data rules out is said here.

    Images for a model with a trained autoencoder come back as the latent cache of ``train.latent_cache``
    (:func:`msf.training.latent_cache.training_cache`), made here by every process of ``world`` (default:
    the one this process is in) if it is not there yet; ``progress``: say which cache, and show the encoding.
    """
    tc, given = cfg.train, data is not None
    data = TrainingData(load_dataset(tc.data, cfg.model.image_size, tc.strict_data) if data is None else data,
                        cfg.model.image_size)
    m, names = cfg.model, data.class_names
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    if data.num_classes != m.num_classes:
        raise ConfigError(
            f"train.data={tc.data}: {data.num_classes} classes ({shown}), but model.num_classes="
            f"{m.num_classes}: set model.num_classes={data.num_classes} (and model.class_names=null)"
        )
    if m.class_names is None:
        m.class_names = list(names)
    elif data.names_given and list(m.class_names) != list(names):
        raise ConfigError(
            f"train.data={tc.data}: its classes are {shown}, but model.class_names are "
            f"{', '.join(m.class_names[:3])}, ...: set model.class_names=null to take the data's names"
        )
    if tc.eval_every and not tc.eval_ref and (given or data.kind == "latents"):
        what = "a dataset object was passed" if given else f"train.data={tc.data} is a latent cache"
        raise ConfigError(f"train.eval_every={tc.eval_every}: {what}, not images msf can build a reference "
                          "from; set train.eval_ref (an .npz, a folder, or msf reference --stats output)")
    if tc.repa_encoder and data.kind == "latents":
        raise ConfigError(f"train.repa_encoder: train.data={tc.data} is a latent cache; REPA's encoder needs "
                          "the images (train on the image data, or turn REPA off)")
    if tc.random_flip and not getattr(data.source, "mirror_ok", True):
        raise ConfigError(f"train.data={tc.data}: a mirrored image is not of its class here (digits, text); "
                          "set train.random_flip=false")
    if data.kind == "latents":
        data.source.check_model(cfg)
        return data
    from msf.training.imagefolder import ImageFolder
    from msf.training.latent_cache import training_cache

    known = isinstance(data.source, (ImageDataset, ImageFolder))  # what a cache can be keyed by
    cache = training_cache(cfg, data, world=world, progress=progress,
                           identity=(lambda: data_identity(tc.data, data.source)) if known else None)
    return data if cache is None else TrainingData(cache)


def data_identity(spec: str, source: ImageDataset | ImageFolder) -> tuple[str, str]:
    """A name for the data and a key that changes with its contents. Images in memory (a built-in set, an
    ``.npz``, or passed as they are by ``msf compare``): the images and labels themselves, hashed in
    milliseconds. An image folder: its path and each image's path, size and modification time."""
    from msf.training.imagefolder import ImageFolder

    key = hashlib.sha256()
    if not isinstance(source, ImageFolder):
        for t in (source.images, source.labels):
            key.update(f"{tuple(t.shape)}".encode())
            key.update(np.ascontiguousarray(t.numpy()).data)
        key.update("\0".join(source.class_names).encode())
        return (builtin_file(spec) if spec in BUILTIN_NAMES else Path(spec).stem) or "data", key.hexdigest()
    key.update(source.root.encode())
    for f, _ in source.samples:  # a million images: hashed as they come, never one long string
        st = os.stat(f)
        key.update(f"\0{f}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return Path(source.root).name or "data", key.hexdigest()


def on_device(x, y: torch.Tensor, dev: torch.device) -> tuple:
    """A batch (images, or (z, base) latents; labels) on the device, copied without waiting."""
    x = tuple(None if v is None else v.to(dev, non_blocking=True) for v in x) if isinstance(x, tuple) \
        else x.to(dev, non_blocking=True)
    return x, y.to(dev)


def iterate_batches(
    data: TrainingData | ImageDataset | ImageFolder | LatentCache, stream: IndexStream, start: int, end: int,
    *, rank: int = 0, world: int = 1, num_workers: int = 0, prefetch: int = 0, pin_memory: bool = False,
) -> Iterator[tuple]:
    """:meth:`TrainingData.batches` of ``data`` (a :class:`TrainingData` or what it wraps).

    ``prefetch`` > 0 reads that many batches ahead in a background thread (the next batch is
    gathered while the step runs: what a GPU run wants); ``pin_memory`` pins them there, so that
    ``.to(device, non_blocking=True)`` overlaps with compute. The batches are the same either way.
    """
    data = data if isinstance(data, TrainingData) else TrainingData(data)
    batches = data.batches(stream, start, end, rank=rank, world=world, num_workers=num_workers)
    if pin_memory:
        batches = (_pinned(item) for item in batches)
    yield from prefetched(batches, prefetch) if prefetch > 0 else batches


def _pin(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.pin_memory()


def _pinned(item):
    step, x, y, bad = item
    return step, tuple(_pin(v) for v in x) if isinstance(x, tuple) else _pin(x), _pin(y), bad


def prefetched(items: Iterable[T], depth: int) -> Iterator[T]:
    """``items``, produced ``depth`` ahead by a background thread; its errors are raised here, and it
    stops when the consumer does (an early ``break`` leaves no thread behind)."""
    done, q = threading.Event(), queue.Queue(maxsize=depth)
    end = object()

    def put(item) -> bool:
        """Wait for room, but give up once the consumer has stopped; True if the item went in."""
        while not done.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # handed to the consumer, raised there
            put(_Failure(e))

    worker = threading.Thread(target=produce, name="msf-prefetch", daemon=True)
    worker.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        done.set()
        worker.join(timeout=5)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error
