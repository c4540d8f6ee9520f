"""Error bars for sample-quality metrics (docs/design.md §6): when is a difference a difference?

Three sources of spread, each with its function:

* the samples: :func:`bootstrap_fid` and :func:`bootstrap_kid` redraw the sample set with
  replacement (the reference is held fixed) and give a 95% interval around the estimate;
* the training seed: :func:`seed_interval`, a Student-t interval on the mean over seeds;
* the data itself: :func:`real_floor`, the FID and KID of real images against the reference
  at the same count, which a perfect model would score too.

:func:`difference` and :func:`verdict` compare two models: a difference is called only when
its interval excludes zero; otherwise the two are "level".

A bootstrap set holds each image about 0.63 times as a distinct image, which biases FID up;
so the intervals are the bootstrap's quantiles re-centred on the estimate (the spread of the
replicates around their median, added to the estimate), not the raw quantiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from msf.evaluation.distances import frechet_distance_from_features, kid, poly_kernel

LEVEL = 0.95
BOOTSTRAPS = 200


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float
    level: float = LEVEL

    def __str__(self) -> str:
        digits = 3 if abs(self.value) >= 1 else 5
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def to_dict(self) -> dict:
        return asdict(self)

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


def _recentred(value: float, replicates: np.ndarray, level: float) -> Interval:
    lo, mid, hi = np.quantile(replicates, [(1 - level) / 2, 0.5, (1 + level) / 2])
    return Interval(float(value), float(value + lo - mid), float(value + hi - mid), level)


def _draws(n: int, count: int, seed: int) -> np.ndarray:
    """``count`` bootstrap index sets of size ``n`` (row i: the i-th replicate)."""
    return np.random.default_rng(seed).integers(0, n, size=(count, n))


def _ref_root(ref_features: np.ndarray | None, ref_sigma: np.ndarray | None) -> tuple[torch.Tensor, float]:
    """A (d x r) matrix S of full column rank r with S S^T = sigma_ref, and tr(sigma_ref)."""
    if ref_features is not None and len(ref_features) <= np.shape(ref_features)[1]:
        f = torch.from_numpy(np.asarray(ref_features, np.float64))
        s = (f - f.mean(0)).T / (len(f) - 1) ** 0.5  # rank m - 1 of m columns: close enough, and cheap
        return s, float((s * s).sum())
    if ref_sigma is None:
        ref_sigma = np.cov(np.asarray(ref_features, np.float64), rowvar=False)
    sigma = torch.from_numpy(np.atleast_2d(np.asarray(ref_sigma, np.float64)))
    w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
    keep = w > w.max() * 1e-12  # the null space adds only round-off square roots
    return v[:, keep] * w[keep].sqrt(), float(torch.trace(sigma))


GRAM_LIMIT = 4096  # at most this many samples for the n x n Gram path (its memory)


def fid_replicates(features: np.ndarray, ref_mu: np.ndarray, *, ref_features: np.ndarray | None = None,
                   ref_sigma: np.ndarray | None = None, draws: np.ndarray) -> np.ndarray:
    """FID of each bootstrap replicate ``features[draws[i]]`` against a fixed reference.

    The reference is its features (``ref_features``) or its covariance (``ref_sigma``). With S S^T the
    reference covariance and A the replicate's centred features over sqrt(n - 1), tr (sigma
    sigma_ref)^(1/2) is the sum of the square roots of the eigenvalues of (A S)(A S)^T: for n samples a
    centred n x n block of one Gram matrix, computed once, per replicate.
    """
    x = torch.from_numpy(np.asarray(features, np.float64))
    n = len(x)
    root, tr_ref = _ref_root(ref_features, ref_sigma)
    mu_r = torch.from_numpy(np.asarray(ref_mu, np.float64))
    sq = (x * x).sum(1)
    y = x @ root
    gram = y @ y.T if n <= min(GRAM_LIMIT, y.shape[1]) else None  # the smaller eigenproblem
    out = np.empty(len(draws))
    for i, idx in enumerate(draws):
        idx = torch.from_numpy(idx)
        k = len(idx)  # n for a bootstrap replicate; any subset works
        mu = x[idx].mean(0)
        tr_cov = (sq[idx].sum() - k * mu @ mu) / (k - 1)
        if gram is not None:
            g = gram[idx][:, idx]
            g = g - g.mean(0, keepdim=True) - g.mean(1, keepdim=True) + g.mean()
            lam = torch.linalg.eigvalsh(g / (k - 1))
        else:
            yc = y[idx] - y[idx].mean(0)
            lam = torch.linalg.eigvalsh(yc.T @ yc / (k - 1))
        tr_sqrt = lam.clamp(min=0).sqrt().sum()
        out[i] = float((mu - mu_r) @ (mu - mu_r) + tr_cov + tr_ref - 2 * tr_sqrt)
    return out


def bootstrap_fid(value: float, features: np.ndarray, ref_mu: np.ndarray, *,
                  ref_features: np.ndarray | None = None, ref_sigma: np.ndarray | None = None,
                  bootstraps: int = BOOTSTRAPS, level: float = LEVEL,
                  seed: int = 0) -> tuple[Interval, np.ndarray]:
    """A ``level`` interval for the FID ``value`` of ``features`` (bootstrap over samples), replicates."""
    reps = fid_replicates(features, ref_mu, ref_features=ref_features, ref_sigma=ref_sigma,
                          draws=_draws(len(features), bootstraps, seed))
    return _recentred(value, reps, level), reps


def kid_replicates(features: np.ndarray, ref_features: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 (KID's cubic kernel) of each replicate ``features[draws[i]]`` against the reference.

    From the kernel matrices once: with w the replicate's counts of each sample, the sum over distinct
    positions p != q of k(x_p, x_q) is w^T K w - sum_u w_u k(x_u, x_u).
    """
    x = torch.from_numpy(np.asarray(features, np.float64))
    r = torch.from_numpy(np.asarray(ref_features, np.float64))
    n, m = len(x), len(r)
    k_rr = poly_kernel(r, r)
    within_ref = float((k_rr.sum() - k_rr.diagonal().sum()) / (m * (m - 1)))
    k_xx, k_xr = poly_kernel(x, x), poly_kernel(x, r).sum(1)
    diag = k_xx.diagonal()
    out = np.empty(len(draws))
    for i, idx in enumerate(draws):
        w = torch.bincount(torch.from_numpy(idx), minlength=n).double()
        within = (w @ k_xx @ w - w @ diag) / (n * (n - 1))
        out[i] = float(within + within_ref - 2 * (w @ k_xr) / (n * m))
    return out


def bootstrap_kid(value: float, features: np.ndarray, ref_features: np.ndarray, *,
                  bootstraps: int = BOOTSTRAPS, level: float = LEVEL,
                  seed: int = 0) -> tuple[Interval, np.ndarray]:
    """A ``level`` interval for the KID ``value`` of ``features`` (bootstrap over samples), replicates."""
    reps = kid_replicates(features, ref_features, _draws(len(features), bootstraps, seed))
    return _recentred(value, reps, level), reps


def proportion_interval(successes: int, n: int, level: float = LEVEL) -> Interval:
    """Wilson's interval for a proportion (an accuracy over n samples)."""
    from scipy.stats import norm

    z = float(norm.ppf((1 + level) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(p, centre - half, centre + half, level)


def seed_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Student-t interval on the mean of a metric over training seeds (one seed: NaN bounds)."""
    from scipy.stats import t

    v = np.asarray(values, np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return Interval(mean, math.nan, math.nan, level)
    half = float(t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return Interval(mean, mean - half, mean + half, level)


def difference(a: Sequence[float], b: Sequence[float], *, a_replicates: np.ndarray | None = None,
               b_replicates: np.ndarray | None = None, level: float = LEVEL) -> Interval:
    """An interval for mean(a) - mean(b): Welch's t over seeds when both have two or more; with one seed
    each, from the two sets' bootstrap replicates (independent samples, so replicate i minus replicate i)."""
    from scipy.stats import t

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    value = float(a.mean() - b.mean())
    if len(a) >= 2 and len(b) >= 2:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        se = math.sqrt(va + vb)
        if se == 0:
            return Interval(value, value, value, level)
        dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
        half = float(t.ppf((1 + level) / 2, dof) * se)
        return Interval(value, value - half, value + half, level)
    if a_replicates is None or b_replicates is None:
        return Interval(value, math.nan, math.nan, level)
    k = min(len(a_replicates), len(b_replicates))
    return _recentred(value, np.asarray(a_replicates[:k]) - np.asarray(b_replicates[:k]), level)


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval:
    """An interval for mean(a - b) over pairs (a[i], b[i]) that share a training seed: Student's t on the
    differences. For two runs of the same work (the same initial weights and data order), the seed's
    luck cancels in each pair."""
    return seed_interval(np.asarray(a, np.float64) - np.asarray(b, np.float64), level)


def verdict(diff: Interval, lower_is_better: bool = True) -> str:
    """"ahead" / "behind" for the first model when the interval of (first - second) excludes 0, else
    "level" ("no interval" where there is none)."""
    if math.isnan(diff.low):
        return "no interval"  # e.g. one seed of a metric without a bootstrap: nothing can be called
    if diff.contains(0.0):
        return "level"
    better = diff.high < 0 if lower_is_better else diff.low > 0
    return "ahead" if better else "behind"


def real_floor(ref_features: np.ndarray, n: int, seed: int = 0) -> dict:
    """FID and KID of ``n`` real images against the rest of the reference: what a model that draws real
    images would score at this sample count. Where the reference has fewer than 2n images, n is cut to
    half of it (the returned ``n`` says so)."""
    feats = np.asarray(ref_features, np.float64)
    n = min(n, len(feats) // 2)
    perm = np.random.default_rng(seed).permutation(len(feats))
    real, rest = feats[perm[:n]], feats[perm[n:]]
    return {"n": int(n), "num_ref": int(len(rest)), "fid": frechet_distance_from_features(real, rest),
            "kid": kid(real, rest)[0]}
