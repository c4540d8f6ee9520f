"""Class accuracy: the classifier learns real classes, is cached per data set, scores samples per class."""

import numpy as np
import pytest

import msf.evaluation.classifier as classifier
from msf.evaluation.classifier import Recipe, class_accuracy, labelled_images, real_classifier
from msf.evaluation.metrics import evaluate, format_results

QUICK = Recipe(width=8, stages=2, epochs=4, batch_size=32, lr=1e-2)


def _coloured(n_per_class: int, seed: int, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Class c: a noisy image dominated by channel c (red, green, blue)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    images = rng.integers(0, 60, size=(len(labels), size, size, 3))
    images[np.arange(len(labels)), :, :, labels] += 180
    return images.astype(np.uint8), labels


def test_a_classifier_of_separable_classes_scores_right_and_wrong_labels(tmp_path):
    images, labels = _coloured(30, 0)
    clf = real_classifier(images, labels, ["red", "green", "blue"], tmp_path, QUICK)
    assert clf.held_out_accuracy == 1.0 and set(clf.held_out_per_class) == {"red", "green", "blue"}
    fresh, fresh_labels = _coloured(5, 1)
    right = class_accuracy(clf, fresh, fresh_labels)
    assert right["accuracy"] == 1.0 and right["per_class"] == {"red": 1.0, "green": 1.0, "blue": 1.0}
    wrong = class_accuracy(clf, fresh, (fresh_labels + 1) % 3)
    assert wrong["accuracy"] == 0.0
    half = class_accuracy(clf, fresh, np.where(fresh_labels == 0, 1, fresh_labels))  # reds called green
    assert half["per_class"]["green"] == 0.5 and "red" not in half["per_class"]
    with pytest.raises(ValueError, match="labels must be in"):
        class_accuracy(clf, fresh, fresh_labels + 3)
    with pytest.raises(ValueError, match="like the classifier's training images"):
        class_accuracy(clf, fresh[:, :4, :4], fresh_labels)


def test_the_classifier_is_cached_per_data_set(tmp_path, monkeypatch):
    images, labels = _coloured(20, 0)
    first = real_classifier(images, labels, ["r", "g", "b"], tmp_path, QUICK)
    assert first.path.is_file() and first.path.with_suffix(".json").is_file()

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(classifier, "train_classifier", no_training)
    again = real_classifier(images, labels, ["r", "g", "b"], tmp_path, QUICK)
    assert again.path == first.path and again.held_out_accuracy == first.held_out_accuracy
    probe, _ = _coloured(4, 5)
    assert np.array_equal(again.predict(probe), first.predict(probe))
    with pytest.raises(AssertionError, match="trained again"):  # other images: another classifier
        real_classifier(images[::-1].copy(), labels[::-1].copy(), ["r", "g", "b"], tmp_path, QUICK)
    with pytest.raises(AssertionError, match="trained again"):  # the same images under other labels
        real_classifier(images, (labels + 1) % 3, ["r", "g", "b"], tmp_path, QUICK)
    first.path.write_bytes(b"damaged")  # a damaged cache entry is trained over, not loaded
    with pytest.raises(AssertionError, match="trained again"):
        real_classifier(images, labels, ["r", "g", "b"], tmp_path, QUICK)


def test_the_held_out_images_are_none_of_the_training_images_and_every_class_gives_its_share():
    labels = np.repeat(np.arange(3), [10, 2, 1])
    train, held = classifier._split(labels, 0.2, seed=0)
    assert not set(train) & set(held) and sorted([*train, *held]) == list(range(len(labels)))
    assert np.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]  # one image of two; none of one


def test_labelled_images_read_adm_and_our_npz_formats(tmp_path):
    images, labels = _coloured(4, 0, size=16)
    np.savez(tmp_path / "adm.npz", arr_0=images, arr_1=labels)
    np.savez(tmp_path / "ours.npz", images=images, labels=labels, class_names=np.array(["r", "g", "b"]))
    a = labelled_images(str(tmp_path / "adm.npz"), 8)
    assert a[0].shape == (12, 8, 8, 3) and np.array_equal(a[1], labels) and a[2] == ["0", "1", "2"]
    o = labelled_images(str(tmp_path / "ours.npz"), 16)
    assert np.array_equal(o[0], images) and o[2] == ["r", "g", "b"]
    np.savez(tmp_path / "unlabelled.npz", arr_0=images)
    with pytest.raises(ValueError, match="no labels"):
        labelled_images(str(tmp_path / "unlabelled.npz"), 16)


def test_evaluate_reports_class_accuracy_of_a_labelled_sample_set(tmp_path, monkeypatch):
    monkeypatch.setattr(classifier.real_classifier, "__defaults__", (QUICK, False))
    real, labels = _coloured(30, 0)
    np.savez(tmp_path / "real.npz", images=real, labels=labels, class_names=np.array(["r", "g", "b"]))
    samples, sample_labels = _coloured(6, 3)
    sample_labels[:6] = 1  # the six reds were drawn as "g": wrong
    np.savez(tmp_path / "samples.npz", arr_0=samples, arr_1=sample_labels)
    r = evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "real.npz"), metrics=("cas",),
                 class_data=str(tmp_path / "real.npz"), cache_dir=tmp_path / "stats", progress=False)
    assert r["cas"]["accuracy"] == pytest.approx(12 / 18)
    assert r["cas"]["per_class"] == {"g": 0.5, "b": 1.0} and r["cas"]["real_accuracy"] == 1.0
    assert "class accuracy 0.667" in format_results(r)
    np.savez(tmp_path / "nolabels.npz", arr_0=samples)
    r = evaluate(str(tmp_path / "nolabels.npz"), str(tmp_path / "real.npz"), metrics=("cas",),
                 cache_dir=tmp_path / "stats", progress=False)
    assert r["skipped"][0]["metric"] == "cas" and "no labels" in r["skipped"][0]["reason"]
