"""Reference statistics: the features, means and covariances of a reference set, in a file and a cache.

A statistics file (``mu``, ``sigma``, ``features``, ``logits``, ``meta``) is written by
:func:`compute_reference`, and kept automatically in a cache (:func:`default_cache_dir`) for folders
and ``.npz`` files, keyed by their files' sizes and modification times and by the feature network.
ADM's reference batches (``arr_0`` plus ``mu``/``sigma`` of the whole dataset) are read as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msf.evaluation.features import FeatureExtractor, image_files, load_images, npz_images_shape, open_npz
from msf.files import atomic_write_numpy
from msf.training.data import BUILTIN_NAMES

STATS_FORMAT = "msf-ref-stats-v1"


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
    images: np.ndarray, extractor: FeatureExtractor, source: str, batch_size: int, progress: bool,
    what: str = "images",
) -> Stats:
    feats, logits = extractor.extract(images, batch_size, progress, desc=f"Inception features of the {what}")
    meta = {
        "format": STATS_FORMAT,
        "feature_network": extractor.name,
        "weights_sha256": extractor.weights.sha256,
        "feature_precision": extractor.precision,
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
    with open_npz(path) as d:
        return "meta" in d.files


def _load_stats(path: Path) -> Stats:
    with open_npz(path) as d:
        for key in ("mu", "sigma", "features", "meta"):
            if key not in d.files:
                raise ValueError(
                    f"{path}: statistics file without {key!r} (make one with `msf reference`)"
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
    stats = _stats_with_moments(Path(spec).expanduser(), extractor, batch_size, progress, what="reference")
    out = Path(out_path)
    _save_stats(stats, out)
    return out


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/msf/ref_stats``, by default ``~/.cache/msf/ref_stats``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "msf" / "ref_stats"


def _cache_file(path: Path, extractor: FeatureExtractor, cache_dir: Path, image_size: int | None = None
                ) -> tuple[Path, str, int]:
    """Where the statistics of ``path`` live in the cache: named by the source, keyed by its files' sizes and
    modification times, the size a folder's images were cropped to, and the feature network; and how many
    images it holds (a folder's count; an ``.npz``'s from its header, -1 where that cannot be read)."""
    path = path.resolve()
    files = image_files(path) if path.is_dir() else [path]
    listing = [(str(f.relative_to(path)) if path.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns)
               for f in files]
    network = [extractor.weights.sha256] + ([extractor.precision] if extractor.precision != "fp32" else [])
    if path.is_dir() and image_size is not None:
        network.append(f"crop{image_size}")
    key = hashlib.sha256(json.dumps([str(path), listing, *network]).encode()).hexdigest()
    # Entries of one source and network share a prefix: a new one replaces those of older file versions.
    source_id = hashlib.sha256(json.dumps([str(path), *network]).encode()).hexdigest()[:8]
    shape = None if path.is_dir() else npz_images_shape(path)
    count = len(files) if path.is_dir() else shape[0] if shape else -1
    return cache_dir / f"{path.name}-{source_id}-{key[:16]}.npz", key, count


def _reference_stats(
    spec: str | Path, extractor: FeatureExtractor, cache_dir: Path, batch_size: int, progress: bool,
    image_size: int | None = None,
) -> tuple[Stats, Path | None]:
    """Statistics of a folder or ADM ``.npz``, from the cache when fresh; returns the cache file too."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    cached, key, count = _cache_file(path, extractor, cache_dir, image_size)
    if cached.is_file():
        try:
            stats = _load_stats(cached)
        except ValueError:
            stats = None  # unreadable: recompute over it
        if stats is not None and stats.meta.get("cache_key") == key:
            return stats, cached
    prefix = cached.name.rsplit("-", 1)[0] + "-"
    if progress:  # minutes to hours at 50K images: say that it happens once, and why it happens now
        older = cached.parent.is_dir() and any(f.name.startswith(prefix) for f in cached.parent.glob("*.npz"))
        why = "it changed since its features were cached" if older else "first use of this reference"
        images = f"{count} images" if count >= 0 else "its images"
        print(f"[msf] {why}: computing its Inception features once ({images}, {extractor.name}; cached in "
              f"{cached.parent}, later runs reuse them)", file=sys.stderr, flush=True)
    stats = _stats_with_moments(path, extractor, batch_size, progress, image_size, what="reference")
    stats.meta["cache_key"] = key
    _save_stats(stats, cached)
    for stale in cached.parent.iterdir():
        if stale.name.startswith(prefix) and stale.suffix == ".npz" and stale != cached:
            stale.unlink(missing_ok=True)  # the same source before it changed
    return stats, cached


def _stats_with_moments(path: Path, extractor: FeatureExtractor, batch_size: int, progress: bool,
                        image_size: int | None = None, what: str = "reference") -> Stats:
    images = load_images(path, progress, image_size if path.is_dir() else None, desc=f"reading the {what}")
    stats = _stats_of(images, extractor, str(path.resolve()), batch_size, progress, what)
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
    with open_npz(path) as d:
        if "mu" in d.files and "sigma" in d.files:
            mu, sigma = d["mu"].astype(np.float64), d["sigma"].astype(np.float64)
            if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                raise ValueError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} are not a mean and "
                                 "covariance of one dimension")
            return mu, sigma
    return None


def check_reference(spec: str | Path | np.ndarray, what: str = "ref") -> None:
    """Refuse a reference that does not exist before anything slow (a feature network, a sample set) runs."""
    if isinstance(spec, np.ndarray) or str(spec) in BUILTIN_NAMES:
        return
    if not Path(spec).expanduser().exists():
        raise FileNotFoundError(f"{what} {str(spec)!r}: no such file or folder (give an ADM-format .npz, "
                                "an image folder, a statistics file from msf eval, or a built-in set: "
                                f"{', '.join(BUILTIN_NAMES)})")


def builtin_reference(name: str, image_size: int | None, cache_dir: Path | None = None) -> Path:
    """The built-in set as a reference .npz at ``image_size`` (its own size when None), written once
    beside the statistics cache: a built-in name works wherever a reference path does."""
    from msf.training.data import builtin_file, load_builtin

    size = image_size or load_builtin(builtin_file(name)).images.shape[1]
    path = (cache_dir or default_cache_dir()) / f"builtin-{name}-{size}px.npz"
    if not path.is_file():
        build_reference(name, path, size, progress=False)
    return path


def stats_for(
    spec: str | Path | np.ndarray, extractor: FeatureExtractor, cache_dir: Path | None, batch_size: int,
    progress: bool, image_size: int | None = None, what: str = "images",
) -> tuple[Stats, Path | None]:
    """Statistics of images, a folder, an ``.npz`` or a statistics file; a folder's images are cropped and
    resized to ``image_size`` as in training (where given). ``what`` names them in progress bars; with a
    ``cache_dir`` they are a reference, and computing them the first time says so first."""
    if isinstance(spec, np.ndarray):
        return _stats_of(spec, extractor, "<array>", batch_size, progress, what), None
    path = Path(spec).expanduser()
    if _is_stats_file(path):
        stats = _load_stats(path)
        _check_network(stats, extractor, path)
        return stats, path
    if cache_dir is None:
        size = image_size if path.is_dir() else None
        images = load_images(path, progress, size, desc=f"reading the {what}")
        return _stats_of(images, extractor, str(path.resolve()), batch_size, progress, what), None
    return _reference_stats(path, extractor, cache_dir, batch_size, progress, image_size)


# ---------------------------------------------------------------------------------------------------------
# Building a reference from training data


def build_reference(
    spec: str, out_path: str | Path, image_size: int, *, num_images: int | None = None, seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write training data as an ADM-format reference ``.npz``: ``arr_0`` (uint8 images, decoded, cropped and
    resized exactly as training reads them), ``arr_1`` (labels, for class accuracy) and ``class_names``.

    ``spec`` is what ``train.data`` takes ("emoji", an ``.npz`` of images and labels, a folder of class
    folders); ``num_images`` draws that many at random (seeded, without replacement) instead of all.
    """
    from tqdm import tqdm

    from msf.training.data import load_dataset, prepare_data

    data = load_dataset(spec, image_size, strict=True)
    if not hasattr(data, "images") and not hasattr(data, "samples"):
        raise ValueError(f"{spec}: a latent cache holds no images; build the reference from the image data")
    n = len(data)
    if num_images is not None and num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    idx = np.arange(n)
    if num_images is not None and num_images < n:
        idx = np.sort(np.random.default_rng(seed).choice(n, num_images, replace=False))
    if hasattr(data, "images"):
        data = prepare_data(data, image_size)
        images, labels = data.images.numpy()[idx], data.labels.numpy()[idx]
    else:
        images = np.empty((len(idx), image_size, image_size, 3), np.uint8)
        labels = np.empty(len(idx), np.int64)
        for j, i in enumerate(tqdm(idx, desc="reading images", unit="img", disable=not progress)):
            x, labels[j], _ = data[int(i)]
            images[j] = x.numpy()
    names = np.array(list(data.class_names))
    return atomic_write_numpy(Path(out_path), np.savez, arr_0=images, arr_1=labels, class_names=names)
