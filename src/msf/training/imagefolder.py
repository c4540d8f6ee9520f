"""A class-per-folder image dataset (ImageNet train layout), read lazily from disk.

Layout::

    root/
        n01440764/            # one sub-folder per class; classes = sorted folder names
            n01440764_10026.JPEG
            extra/deeper/x.png  # files may sit deeper inside a class folder
        n01443537/
            ...

Class indices follow the sorted folder names, and samples are sorted by (class, path relative to
its class folder), so the order is the same on every machine and every run. Files whose extension
(case-insensitive) is not in ``IMAGE_EXTENSIONS``, and files directly inside ``root``, are not
samples: they are listed in ``ImageFolder.ignored_files`` and reported in one warning. Hidden files
and folders (names starting with ``.``) are skipped silently. A class folder without images keeps
its class index and is named in a warning.

Each image is decoded with Pillow, converted to RGB by ``to_rgb`` (grayscale, 16-bit, float,
palette, CMYK; anything with alpha is composited on white, not black) and cropped by
``center_crop_arr``, the centre crop of ADM (openai/guided-diffusion) that DiT also uses: halve
with a box filter while the short side is at least twice the target, resize the short side to the
target with bicubic, then cut the centre square. EXIF orientation is not applied, as in ADM/DiT.

Bad files: a file that cannot be decoded (unknown format, truncated, corrupt) raises a
``ValueError`` naming it when ``strict=True``. Otherwise the dataset returns the next sample that
decodes (index i+1, i+2, ... wrapping around, so the result is deterministic) and reports the
failed path as the third item of the sample, so a training loop can log it without crashing hours
in. ``scan_bad_files`` decodes everything up front to list such files.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)

# What a corrupt or truncated file can raise while Pillow opens and decodes it. OSError covers
# UnidentifiedImageError and "image file is truncated"; the others come from format plugins (e.g.
# SyntaxError "not a PNG file", EOFError, zlib/struct errors on damaged headers).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
    zlib.error,
    struct.error,
)

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: a uint8 (image_size, image_size, 3) array."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if pil_image.mode != "RGB":
        pil_image = to_rgb(pil_image)  # bicubic on a palette image would resize its indices
    # Box-halving first keeps large downscales from aliasing (bicubic alone samples too sparsely).
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.Resampling.BICUBIC
    )
    arr = np.asarray(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    # A copy, so the result owns its memory (torch.from_numpy wants a writable array).
    return np.array(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size], dtype=np.uint8)


def _on_white(img: Image.Image) -> Image.Image:
    # Transparent areas of icons, logos and cut-outs are meant to be seen on a light page; black
    # would turn them into dark blobs the model then learns.
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _gray_to_rgb(img: Image.Image) -> Image.Image:
    # Pillow's own I/F -> L conversion clips at 255, which turns 16-bit images white; rescale instead.
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    elif img.mode == "I" and arr.max() > 255:
        arr = arr / 257.0  # 16-bit data in a 32-bit container (how older Pillow opens 16-bit PNGs)
    elif img.mode == "F" and arr.max() <= 1.0:
        arr = arr * 255.0  # float images are usually in [0, 1]
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2)))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image as RGB; alpha (RGBA, LA, palette/colour-key transparency) is composited on white."""
    mode = img.mode
    if mode in _ALPHA_MODES:
        return _on_white(img)
    if mode in ("P", "L", "RGB") and "transparency" in img.info:
        return _on_white(img)
    if mode == "RGB":
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _gray_to_rgb(img)
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX


def load_image(path: str | os.PathLike[str], image_size: int) -> np.ndarray:
    """Decode, convert and crop one file; raises one of ``DECODE_ERRORS`` if it is not a usable image."""
    with Image.open(path) as img:
        img.load()  # decode now, inside the caller's try: Image.open only reads the header
        if img.format == "PNG" and _bottom_row_uniform(img):
            _check_png_complete(path)
        # Crop before the file closes: closing also frees an image that to_rgb returned unchanged.
        return center_crop_arr(to_rgb(img), image_size)


def _bottom_row_uniform(img: Image.Image) -> bool:
    extrema = img.crop((0, img.height - 1, img.width, img.height)).getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
    return all(lo == hi for lo, hi in bands)


_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def _check_png_complete(path: str | os.PathLike[str]) -> None:
    """Pillow decodes a PNG whose compressed data ends early (a short but well-formed zlib stream)
    as black rows, without an error. Called only when the bottom row came out uniform (a truncated
    image's does, so the common case costs nothing): count the decompressed bytes against IHDR."""
    data = Path(path).read_bytes()
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    bits = _CHANNELS.get(colour, 4) * depth

    if interlace:  # Adam7's seven passes: not checked (no interlaced files to test against)
        return
    expected = height * (1 + (width * bits + 7) // 8)  # a filter byte, then the row's samples
    inflate, got, pos = zlib.decompressobj(), 0, 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            got += len(inflate.decompress(data[pos + 8:pos + 8 + length], expected + 1 - got))
        if kind == b"IEND" or got > expected:
            break
        pos += 12 + length
    if got < expected:
        raise ValueError(f"PNG image data ends early: {got} of {expected} bytes "
                         f"({width} x {height} declared)")


def decode_problem(path: str | os.PathLike[str], image_size: int) -> str | None:
    """Why ``path`` cannot be used as an image (None if it can): for reports of skipped files."""
    try:
        load_image(path, image_size)
    except DECODE_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    return None


def _normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    exts = tuple(sorted({("" if e.startswith(".") else ".") + e.lower() for e in extensions}))
    if not exts:
        raise ValueError("extensions must not be empty")
    return exts


def _preview(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


class ImageFolder(torch.utils.data.Dataset):
    """Images in ``root/<class_name>/**/<file>``; items are (uint8 (S, S, 3) tensor, label, bad path).

    ``bad`` is ``""`` when the requested file decoded, else the path of the file that failed and was
    replaced by the next one that decodes (see the module docstring).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int,
        *,
        strict: bool = False,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self.image_size = int(image_size)
        self.strict = strict
        self.extensions = _normalise_extensions(extensions)

        if not os.path.exists(self.root):
            raise ValueError(f"{self.root}: dataset folder does not exist")
        if not os.path.isdir(self.root):
            raise ValueError(f"{self.root}: dataset root is not a folder")

        self.ignored_files: list[str] = []
        class_dirs: list[str] = []
        with os.scandir(self.root) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    class_dirs.append(entry.name)
                else:
                    self.ignored_files.append(entry.path)  # files next to the class folders have no class
        if not class_dirs:
            raise ValueError(f"{self.root}: no class sub-folders (expected root/<class_name>/<image files>)")
        self.classes: list[str] = sorted(class_dirs)
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}

        self.samples: list[tuple[str, int]] = []
        self.skipped_links: list[str] = []  # symlinks into the tree above or into another class, repeats
        self._class_dirs = [os.path.realpath(os.path.join(self.root, c)) for c in self.classes]
        self._seen_files: set[str] = set()
        empty: list[str] = []
        for idx, name in enumerate(self.classes):
            found = self._scan_class(os.path.join(self.root, name))
            if not found:
                empty.append(name)
            self.samples.extend((path, idx) for path in found)
        self.ignored_files.sort()

        if not self.samples:
            raise ValueError(
                f"{self.root}: no image files ({', '.join(self.extensions)}) in its "
                f"{len(self.classes)} class folder(s)"
            )
        del self._class_dirs, self._seen_files  # scan-time only: not carried into loader processes
        self._report(empty)
        self.labels: Tensor = torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def _report(self, empty: list[str]) -> None:
        """One warning each for files that are not samples, empty classes, and links not followed."""
        if self.ignored_files:
            warnings.warn(f"{self.root}: ignored {len(self.ignored_files)} file(s) that are not images in a "
                          f"class folder: {_preview(self.ignored_files)}", stacklevel=3)
        if empty:
            warnings.warn(f"{self.root}: {len(empty)} class folder(s) contain no images: "
                          f"{_preview(empty, 10)}", stacklevel=3)
        if self.skipped_links:
            warnings.warn(f"{self.root}: not followed or counted twice: {len(self.skipped_links)} symlink(s) "
                          "that lead back up the tree, into another class folder, or to a file already "
                          f"counted: {_preview(self.skipped_links)}", stacklevel=3)

    def _follow(self, path: str, own: str, visited: set[str]) -> bool:
        """Walk into directory ``path`` of class folder ``own``? Not when its real location was walked
        already (a loop), holds a class folder (leads back up the tree), or lies in another class."""
        real = os.path.realpath(path)
        inside = [c for c in self._class_dirs if real == c or real.startswith(c + os.sep)]
        if real in visited or any(c.startswith(real + os.sep) or c == real for c in self._class_dirs) \
                or (inside and inside[0] != own):
            self.skipped_links.append(path)
            return False
        visited.add(real)
        return True

    def _count(self, path: str, real_dir: str, own: str) -> bool:
        """Count file ``path`` (in the folder whose real location is ``real_dir``) in class folder ``own``?
        Once only, and in the class it really lives in."""
        # one realpath per folder, not per file: a plain file's real path is its folder's plus its name
        link = os.path.islink(path)
        real = os.path.realpath(path) if link else os.path.join(real_dir, os.path.basename(path))
        inside = [c for c in self._class_dirs if real.startswith(c + os.sep)]
        if real in self._seen_files or (inside and inside[0] != own):
            return False
        self._seen_files.add(real)
        return True

    def _scan_class(self, class_dir: str) -> list[str]:
        # (relative posix path, full path) pairs, so the order does not depend on the OS separator.
        found: list[tuple[str, str]] = []
        own = os.path.realpath(class_dir)
        visited = {own}
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            # real folders before links, so that a link to a folder walked anyway is the one skipped
            candidates = sorted((d for d in dirnames if not d.startswith(".")),
                                key=lambda d: (os.path.islink(os.path.join(dirpath, d)), d))
            dirnames[:] = sorted(d for d in candidates
                                 if self._follow(os.path.join(dirpath, d), own, visited))
            real_dir = os.path.realpath(dirpath)
            for fname in filenames:
                if fname.startswith("."):
                    continue
                path = os.path.join(dirpath, fname)
                if os.path.splitext(fname)[1].lower() not in self.extensions:
                    self.ignored_files.append(path)
                elif not self._count(path, real_dir, own):
                    self.skipped_links.append(path)
                else:
                    found.append((Path(os.path.relpath(path, class_dir)).as_posix(), path))
        found.sort()
        return [path for _, path in found]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """The class folder names, in label order (as ``msf.training.data.ImageDataset`` names them)."""
        return self.classes

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Tensor:
        path = self.samples[index][0]
        try:
            return torch.from_numpy(load_image(path, self.image_size))
        except DECODE_ERRORS as e:
            raise _DecodeError(path, e) from e

    def __getitem__(self, index: int) -> tuple[Tensor, int, str]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        try:
            return self._load(index), self.samples[index][1], ""
        except _DecodeError as e:
            if self.strict:
                raise ValueError(f"{e.path}: cannot decode image ({e.reason})") from e.__cause__
            bad = e.path
        # Deterministic substitute: the next sample that decodes, wrapping around.
        for step in range(1, n):
            j = (index + step) % n
            try:
                return self._load(j), self.samples[j][1], bad
            except _DecodeError:
                continue
        raise ValueError(f"{self.root}: none of the {n} image files could be decoded (first failure: {bad})")


class _DecodeError(Exception):
    def __init__(self, path: str, error: BaseException) -> None:
        super().__init__(path, error)
        self.path = path
        self.reason = f"{type(error).__name__}: {error}"


def scan_bad_files(dataset: ImageFolder, limit: int | None = None) -> list[str]:
    """Paths of the samples (all, or the first ``limit``) that fail to decode, in sample order."""
    samples = dataset.samples if limit is None else dataset.samples[:limit]
    bad = []
    for path, _ in samples:
        try:
            load_image(path, dataset.image_size)
        except DECODE_ERRORS:
            bad.append(path)
    return bad
