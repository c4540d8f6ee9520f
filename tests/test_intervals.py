"""Error bars: the bootstrap replicates, the intervals against known cases, the verdicts, the floor."""

import math

import numpy as np
import pytest
from helpers import MeanColour

import msf.evaluation.intervals as intervals
from msf.evaluation.distances import frechet_distance, frechet_distance_from_features, kid
from msf.evaluation.intervals import (
    Interval,
    bootstrap_fid,
    difference,
    fid_replicates,
    kid_replicates,
    real_floor,
    seed_interval,
    verdict,
)
from msf.evaluation.metrics import evaluate, format_results


@pytest.fixture
def sets():
    rng = np.random.default_rng(0)
    return rng.normal(size=(120, 16)), rng.normal(0.3, 1.2, size=(150, 16))


@pytest.mark.parametrize("gram_limit", [4096, 10])  # the n x n path and the d x d path
def test_the_replicate_of_every_sample_once_is_the_fid_itself(sets, monkeypatch, gram_limit):
    monkeypatch.setattr(intervals, "GRAM_LIMIT", gram_limit)
    x, r = sets
    every = np.arange(len(x))[None]
    by_features = fid_replicates(x, r.mean(0), ref_features=r, draws=every)[0]
    by_sigma = fid_replicates(x, r.mean(0), ref_sigma=np.cov(r, rowvar=False), draws=every)[0]
    assert by_features == pytest.approx(frechet_distance_from_features(x, r), rel=1e-9)
    direct = frechet_distance(x.mean(0), np.cov(x, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
    assert by_sigma == pytest.approx(direct, rel=1e-9)
    # a replicate that drops half the samples is the FID of that half
    half = np.arange(0, len(x), 2)[None]
    assert fid_replicates(x, r.mean(0), ref_features=r, draws=half)[0] == pytest.approx(
        frechet_distance_from_features(x[::2], r), rel=1e-9)


def test_the_kid_replicate_of_every_sample_once_is_the_unbiased_mmd(sets):
    x, r = sets
    r = r[:len(x)]  # equal sizes: KID's one subset is then a permutation of each whole set
    every = np.arange(len(x))[None]
    full = kid(x, r, subsets=1, subset_size=len(x))[0]
    assert kid_replicates(x, r, every)[0] == pytest.approx(full, rel=1e-9)
    # with duplicates: positions (0, 0, 1, 2, ...) written out pair by pair, p != q
    idx = np.r_[0, np.arange(len(x) - 1)]
    k = lambda a, b: (a @ b.T / x.shape[1] + 1) ** 3  # noqa: E731
    p, n, m = x[idx], len(x), len(r)
    kpp = k(p, p)
    expected = ((kpp.sum() - np.trace(kpp)) / (n * (n - 1))
                + (k(r, r).sum() - np.trace(k(r, r))) / (m * (m - 1)) - 2 * k(p, r).sum() / (n * m))
    assert kid_replicates(x, r, idx[None])[0] == pytest.approx(expected, rel=1e-9)


def test_the_fid_interval_matches_the_delta_method_on_one_gaussian_dimension():
    """d = 1, samples N(1, 1), a large fixed N(0, 1) reference: FID ~ (mu - 0)^2 + (sigma - 1)^2, whose
    standard error is about 2 sigma / sqrt(n) from the mean term, so the 95% half-width is ~3.92 / sqrt(n)."""
    rng = np.random.default_rng(1)
    n = 4000
    x, r = rng.normal(1.0, 1.0, size=(n, 1)), rng.normal(0.0, 1.0, size=(200_000, 1))
    sigma_r = np.atleast_2d(np.cov(r, rowvar=False))
    value = frechet_distance(x.mean(0), np.atleast_2d(np.cov(x, rowvar=False)), r.mean(0), sigma_r)
    iv, reps = bootstrap_fid(value, x, r.mean(0), ref_sigma=sigma_r, bootstraps=400, seed=0)
    half = (iv.high - iv.low) / 2
    assert half == pytest.approx(3.92 / math.sqrt(n), rel=0.15)
    assert iv.contains(value) and iv.value == value
    assert reps.std() == pytest.approx(2 / math.sqrt(n), rel=0.15)


def test_seed_interval_is_students_t():
    iv = seed_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 dof) x sd 1 / sqrt(3)
    assert (iv.value, iv.low, iv.high) == pytest.approx((2.0, 2 - half, 2 + half))
    one = seed_interval([5.0])
    assert one.value == 5.0 and math.isnan(one.low)


def test_differences_and_verdicts():
    a, b = [10.0, 11.0, 12.0], [20.0, 21.0, 22.0]
    d = difference(a, b)  # Welch: equal variances 1, n = 3 each -> se = sqrt(2/3), dof = 4
    half = 2.7764451051977987 * math.sqrt(2 / 3)
    assert (d.value, d.low, d.high) == pytest.approx((-10.0, -10 - half, -10 + half))
    assert verdict(d) == "ahead"  # lower FID for the first
    assert verdict(d, lower_is_better=False) == "behind"
    assert verdict(difference([10.0, 14.0], [11.0, 13.0])) == "level"
    assert verdict(Interval(1.0, math.nan, math.nan)) == "no interval"
    # one seed each: from the replicates, replicate i minus replicate i
    ra, rb = np.full(100, 5.0) + np.linspace(-1, 1, 100), np.full(100, 3.0)
    d1 = difference([5.0], [3.0], a_replicates=ra, b_replicates=rb)
    assert d1.value == 2.0 and d1.low > 0 and verdict(d1) == "behind"


def test_a_paired_difference_is_students_t_on_the_differences():
    from msf.evaluation.intervals import paired_difference

    # seeds move both runs alike (50, 60, 70): paired, the differences -1.5, -2, -2.5 give mean -2, sd 0.5
    d = paired_difference([48.5, 58.0, 67.5], [50.0, 60.0, 70.0])
    half = 4.302652729911275 * 0.5 / math.sqrt(3)  # t(0.975, 2) x sd / sqrt(3)
    assert (d.value, d.low, d.high) == pytest.approx((-2.0, -2 - half, -2 + half))
    assert verdict(d) == "ahead"
    unpaired = difference([48.5, 58.0, 67.5], [50.0, 60.0, 70.0])
    assert verdict(unpaired) == "level"  # the seeds' spread hides it
    assert math.isnan(paired_difference([1.0], [2.0]).low)


def test_the_floor_scores_disjoint_real_images_and_halves_a_small_reference():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(100, 8))
    f = real_floor(feats, 30)
    assert (f["n"], f["num_ref"]) == (30, 70)
    g = real_floor(feats, 80)
    assert (g["n"], g["num_ref"]) == (50, 50)  # cut to half the reference
    perm = np.random.default_rng(0).permutation(100)
    assert f["fid"] == pytest.approx(frechet_distance_from_features(feats[perm[:30]], feats[perm[30:]]))


def test_evaluate_reports_intervals_and_the_floor(tmp_path):
    rng = np.random.default_rng(3)
    samples = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    ref = rng.integers(0, 200, size=(60, 8, 8, 3), dtype=np.uint8)
    r = evaluate(samples, ref, metrics=("fid", "kid"), extractor=MeanColour(), progress=False, bootstraps=50,
                 cache_dir=tmp_path)
    assert r["fid_ci"][0] <= r["fid"] <= r["fid_ci"][1] and r["fid_ci"][0] < r["fid_ci"][1]
    assert r["kid_ci"][0] <= r["kid"] <= r["kid_ci"][1]
    assert r["floor"]["n"] == 30 and r["floor"]["fid"] < r["fid"]  # 40 samples: cut to half the reference
    few = evaluate(samples[:12], ref, metrics=("fid",), extractor=MeanColour(), progress=False, bootstraps=0,
                   cache_dir=tmp_path)
    assert few["floor"]["n"] == 12 and few["floor"]["num_ref"] == 48  # at the samples' count
    text = format_results(r)
    assert "bootstrap" in text and "real against real" in text
    none = evaluate(samples, ref, metrics=("fid",), extractor=MeanColour(), progress=False, bootstraps=0,
                    floor=False, cache_dir=tmp_path)
    assert "fid_ci" not in none and "floor" not in none


def test_the_interval_is_recentred_on_the_estimate_where_the_bootstrap_is_biased():
    """Few samples in many dimensions: a redrawn set (about 63% distinct images) scores a clearly higher FID,
    so the raw quantiles of the replicates would miss the estimate; the interval keeps their spread only."""
    rng = np.random.default_rng(4)
    x, r = rng.normal(size=(50, 64)), rng.normal(size=(400, 64))
    value = frechet_distance_from_features(x, r)
    iv, reps = bootstrap_fid(value, x, r.mean(0), ref_features=r, bootstraps=100, seed=0)
    assert np.quantile(reps, 0.025) > value  # the bias: every replicate above the estimate
    assert iv.low < value < iv.high
    lo, mid, hi = np.quantile(reps, [0.025, 0.5, 0.975])
    assert (iv.low, iv.high) == pytest.approx((value + lo - mid, value + hi - mid))


def test_wilsons_interval_for_an_accuracy():
    from msf.evaluation.intervals import proportion_interval

    iv = proportion_interval(50, 100)  # 0.5 -/+ 1.96 sqrt(0.25 / 100 + ...) / (1 + 1.96^2 / 100)
    assert (iv.low, iv.high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    edge = proportion_interval(0, 20)  # no successes: still an interval above 0
    assert edge.low == pytest.approx(0.0, abs=1e-12) and 0.1 < edge.high < 0.2


def test_the_bootstrap_draws_every_sample_with_replacement(sets, monkeypatch):
    x, r = sets
    x = x[:6]
    seen = []  # the index sets each bootstrap hands to its replicates
    real_fid, real_kid = intervals.fid_replicates, intervals.kid_replicates

    def fid(*a, draws, **kw):
        seen.append(draws)
        return real_fid(*a, draws=draws, **kw)

    def kid_(features, ref, draws):
        seen.append(draws)
        return real_kid(features, ref, draws)

    monkeypatch.setattr(intervals, "fid_replicates", fid)
    monkeypatch.setattr(intervals, "kid_replicates", kid_)
    intervals.bootstrap_fid(1.0, x, r.mean(0), ref_features=r, bootstraps=300, seed=1)
    intervals.bootstrap_kid(0.1, x, r, bootstraps=300, seed=1)
    assert len(seen) == 2
    for d in seen:
        d = np.asarray(d)
        assert d.shape == (300, 6)  # one replicate per row, each as many draws as samples
        counts = np.bincount(d.ravel(), minlength=6)
        assert len(counts) == 6 and (np.abs(counts / d.size - 1 / 6) < 0.04).all()  # the last sample too
        repeats = np.array([len(set(row)) < 6 for row in d])
        assert repeats.mean() > 0.95  # with replacement: 6! / 6^6 = 1.5% of rows are permutations


def test_a_reference_smaller_than_the_feature_dimension_gives_its_sample_covariance(sets):
    x, r = sets
    r = r[:10] + 2.0  # 10 reference images in 16 dimensions, away from the origin
    every = np.arange(len(x))[None]
    direct = frechet_distance(x.mean(0), np.cov(x, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
    # a singular reference covariance: equal to round-off in its null space
    assert fid_replicates(x, r.mean(0), ref_features=r, draws=every)[0] == pytest.approx(direct, rel=1e-7)
    assert fid_replicates(x, r.mean(0), ref_sigma=np.cov(r, rowvar=False), draws=every)[0] == pytest.approx(
        direct, rel=1e-7)


def test_a_one_seed_difference_keeps_the_side_its_replicates_fall_on():
    # a's replicates skew high (a long upper tail), b's are fixed: a - b's interval reaches far above the
    # value and little below it, not the mirror image
    ra = 5.0 + np.concatenate([np.linspace(-0.5, 0.5, 80), np.linspace(2.0, 6.0, 20)])
    rb = np.full(100, 3.0)
    d = difference([5.0], [3.0], a_replicates=ra, b_replicates=rb)
    lo, mid, hi = np.quantile(ra - rb, [0.025, 0.5, 0.975])
    assert (d.value, d.low, d.high) == pytest.approx((2.0, 2.0 + lo - mid, 2.0 + hi - mid))
    assert d.high - d.value > 3 * (d.value - d.low)
    flipped = difference([3.0], [5.0], a_replicates=rb, b_replicates=ra)  # b - a: the long tail below
    assert (flipped.low, flipped.high) == pytest.approx((-d.high, -d.low))
