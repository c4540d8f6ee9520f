"""Metrics on features: FID, KID, Inception Score, precision and recall.

They follow guided-diffusion's ``evaluations/evaluator.py``: FID from the pool3 means and
covariances (the trace of the matrix square root from eigenvalues, see :func:`frechet_distance`), IS
from the softmax of the (bias-free) logits over 10 splits taken in order (ADM splits in chunks of 5,000:
the same at 50K samples), precision and recall with the k = 3 nearest-neighbour manifold estimator.
KID is torch-fidelity's: 100 subsets of 1,000, cubic polynomial kernel.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

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


KERNEL_LIMIT = 3 * 2048 * 2048  # kernel entries (float64) kid() may hold at once: ~100 MB


def poly_kernel(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """KID's cubic kernel (x.y / d + 1)^3 between the rows of ``a`` and ``b`` (numpy arrays or tensors)."""
    return (a @ b.T / a.shape[1] + 1) ** 3


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
    # small sets: the three kernel matrices once, not three m x m x d products per subset; a subset's
    # block sums are then products with its indicator vectors, not m x m copies of the blocks (both
    # timed in docs/benchmarks.md)
    whole = n1 * n1 + n2 * n2 + n1 * n2 <= KERNEL_LIMIT
    if whole:
        k11, k22, k12 = poly_kernel(feats1, feats1), poly_kernel(feats2, feats2), poly_kernel(feats1, feats2)
        d11, d22 = np.diag(k11), np.diag(k22)
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        i, j = rng.choice(n1, m, replace=False), rng.choice(n2, m, replace=False)
        if whole:
            u, v = (np.bincount(k, minlength=n).astype(np.float64) for k, n in ((i, n1), (j, n2)))
            xx, yy, xy = u @ k11 @ u - d11[i].sum(), v @ k22 @ v - d22[j].sum(), u @ k12 @ v
        else:
            x, y = feats1[i], feats2[j]
            k_xx, k_yy, k_xy = poly_kernel(x, x), poly_kernel(y, y), poly_kernel(x, y)
            xx, yy, xy = k_xx.sum() - np.trace(k_xx), k_yy.sum() - np.trace(k_yy), k_xy.sum()
        mmds.append((xx + yy) / (m * (m - 1)) - 2 * xy / (m * m))
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
