import numpy as np
import pytest
import torch

from msf.training.data import (
    IndexStream,
    iterate_batches,
    load_builtin,
    load_dataset,
    to_model_range,
    to_uint8,
)


def test_builtin_emoji_dataset():
    d = load_builtin()
    assert d.images.dtype == torch.uint8 and d.images.shape[1:] == (32, 32, 3)
    assert d.num_classes == 9 and len(d) == len(d.labels) > 1800
    counts = torch.bincount(d.labels, minlength=9)
    assert counts.min() >= 80 and counts.max() <= 5 * counts.min()
    # Colour images: the channels differ (not grayscale), the background is white.
    x = d.images.float()
    assert (x[..., 0] - x[..., 2]).abs().mean() > 10
    assert (x[:, 0, 0] > 240).all(dim=-1).float().mean() > 0.8


def test_uint8_round_trip():
    d = load_builtin()
    assert torch.equal(to_uint8(to_model_range(d.images[:5])), d.images[:5])


def test_balanced_stream_sees_classes_equally():
    d = load_builtin()
    s = IndexStream(d.labels, 512, balance_classes=True, seed=0)
    seen = torch.cat([d.labels[s.batch(step)[0]] for step in range(1, 21)])
    freq = torch.bincount(seen, minlength=9).float() / len(seen)
    assert (freq - 1 / 9).abs().max() < 0.025
    s = IndexStream(d.labels, 512, balance_classes=False, seed=0)
    seen = torch.cat([d.labels[s.batch(step)[0]] for step in range(1, 21)])
    assert torch.bincount(seen, minlength=9)[1] > 2 * torch.bincount(seen, minlength=9)[5]


def test_epoch_stream_visits_every_example_once_per_epoch():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    s = IndexStream(labels, 3, balance_classes=False, seed=1)
    order = torch.cat([s.batch(step)[0] for step in range(1, 15)])  # 42 = 6 epochs of 7
    for e in range(6):
        assert sorted(order[7 * e:7 * (e + 1)].tolist()) == list(range(7))
    assert not torch.equal(order[:7], order[7:14])  # a fresh order each epoch


def test_stream_is_stateless_and_rank_slices_make_the_global_batch():
    labels = torch.randint(0, 5, (100,))
    a = IndexStream(labels, 12, seed=4)
    b = IndexStream(labels, 12, seed=4)
    assert torch.equal(a.batch(7)[0], b.batch(7)[0])  # no state: step 7 without steps 1-6
    assert torch.equal(a.batch(7)[1], b.batch(7)[1])
    parts = [a.rank_slice(7, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), a.batch(7)[0])
    assert not torch.equal(a.batch(7)[0], a.batch(8)[0])


def test_iterate_batches_flips_and_ranges():
    d = load_builtin()
    s = IndexStream(d.labels, 4, seed=0)
    got = list(iterate_batches(d, s, 3, 5))
    assert [g[0] for g in got] == [3, 4, 5]
    step, x, y, bad = got[0]
    idx, flips = s.batch(3)
    expect = to_model_range(d.images[idx])
    expect[flips] = expect[flips].flip(-1)
    assert torch.equal(x, expect) and torch.equal(y, d.labels[idx]) and bad == []


def test_random_flip_off_draws_the_same_examples_and_never_mirrors():
    d = load_builtin()
    on, off = IndexStream(d.labels, 64, seed=2), IndexStream(d.labels, 64, seed=2, flip=False)
    assert on.batch(5)[1].any() and not off.batch(5)[1].any()
    assert torch.equal(on.batch(5)[0], off.batch(5)[0])
    ((_, x, _, _),) = list(iterate_batches(d, off, 5, 5))
    assert torch.equal(x, to_model_range(d.images[off.batch(5)[0]]))


def test_npz_dataset_and_bad_data(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.array([0, 1, 2, 1]))
    d = load_dataset(str(p))
    assert d.num_classes == 3 and d.image_size == 8
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4))
    with pytest.raises(ValueError, match="bad.npz: 'images' must be uint8"):
        load_dataset(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match=r"expected a built-in set \(emoji, emoji32, emoji64, glyphs"):
        load_dataset(str(tmp_path / "missing"))


def test_training_data_gives_the_same_batches_from_memory_and_from_an_image_folder(tmp_path):
    from PIL import Image

    from msf.training.data import ImageDataset, TrainingData
    from msf.training.imagefolder import ImageFolder

    d = load_builtin()
    pick = torch.cat([(d.labels == c).nonzero().flatten()[:6] for c in (0, 1)])
    for n, i in enumerate(pick.tolist()):  # file names keep the order the folder lists them in
        (tmp_path / f"c{int(d.labels[i])}").mkdir(exist_ok=True)
        Image.fromarray(d.images[i].numpy()).save(tmp_path / f"c{int(d.labels[i])}" / f"{n:03d}.png")
    memory = TrainingData(ImageDataset(d.images[pick], d.labels[pick], ["c0", "c1"]), 32)
    files = TrainingData(ImageFolder(tmp_path, 32), 32)
    assert (memory.kind, files.kind) == ("memory", "files")
    assert files.class_names == memory.class_names and torch.equal(files.labels, memory.labels)
    idx, flips = torch.tensor([0, 7, 3, 11]), torch.tensor([False, True, True, False])
    (xm, ym, _), (xf, yf, bad) = memory.batch(idx, flips), files.batch(idx, flips)
    assert torch.equal(xm, xf) and torch.equal(ym, yf) and bad == []
    assert torch.equal(xm[1], to_model_range(d.images[pick[7]][None])[0].flip(-1))
    stream = IndexStream(memory.labels, 4, seed=1)
    for (s1, a, la, _), (s2, b, lb, _) in zip(memory.batches(stream, 1, 3), files.batches(stream, 1, 3)):
        assert s1 == s2 and torch.equal(a, b) and torch.equal(la, lb)


def test_prefetching_gives_the_same_batches_raises_errors_and_stops_with_its_consumer():
    import threading
    import time

    from msf.training.data import prefetched

    d = load_builtin()
    s = IndexStream(d.labels, 8, seed=3)
    plain = list(iterate_batches(d, s, 1, 6))
    ahead = list(iterate_batches(d, s, 1, 6, prefetch=2))
    assert [p[0] for p in ahead] == list(range(1, 7))
    for (s1, x1, y1, b1), (s2, x2, y2, b2) in zip(plain, ahead):
        assert s1 == s2 and torch.equal(x1, x2) and torch.equal(y1, y2) and b1 == b2

    def failing():
        yield 1
        raise ValueError("broken.png: cannot decode image")

    with pytest.raises(ValueError, match="broken.png"):
        list(prefetched(failing(), 2))

    for item in prefetched(iter(range(1000)), 2):  # the consumer stops early ...
        if item == 3:
            break
    time.sleep(0.3)
    assert not any(t.name == "msf-prefetch" for t in threading.enumerate())  # ... and so does the thread


@pytest.mark.parametrize("balance", [True, False])
def test_the_data_order_is_the_seeds_own(balance):
    labels = torch.arange(40) % 4

    def order(seed):
        s = IndexStream(labels, 8, seed=seed, balance_classes=balance)
        return [s.batch(step) for step in range(1, 11)]  # two epochs of 40 examples
    a, again, other = order(3), order(3), order(4)
    for (i, f), (j, g) in zip(a, again):
        assert torch.equal(i, j) and torch.equal(f, g)  # the same seed: the same batches and flips
    assert not torch.equal(torch.cat([i for i, _ in a]), torch.cat([i for i, _ in other]))
    assert not torch.equal(torch.cat([f for _, f in a]), torch.cat([f for _, f in other]))
    if not balance:  # another seed: another order in every epoch, each still a permutation
        mine, theirs = torch.cat([i for i, _ in a]), torch.cat([i for i, _ in other])
        for e in range(2):
            epoch = slice(40 * e, 40 * (e + 1))
            assert sorted(theirs[epoch].tolist()) == list(range(40))
            assert not torch.equal(mine[epoch], theirs[epoch])


def test_balanced_batches_larger_than_the_smallest_class_draw_it_with_replacement():
    labels = torch.tensor([0, 0] + [1] * 30 + [2] * 8)  # class 0 has two examples; batches of 24
    s = IndexStream(labels, 24, seed=0)
    batches = [s.batch(step)[0] for step in range(1, 101)]
    seen = torch.cat(batches)
    freq = torch.bincount(labels[seen], minlength=3).float() / len(seen)
    assert (freq - 1 / 3).abs().max() < 0.06  # 2400 draws: 6 sigma
    assert max(int((labels[b] == 0).sum()) for b in batches) > 2  # more of class 0 than it has examples
    small = seen[labels[seen] == 0]
    assert (torch.bincount(small, minlength=2)[:2].float() / len(small) - 0.5).abs().max() < 0.1


def test_the_64px_set_is_the_32px_set_at_twice_the_size():
    from msf.training.data import load_builtin, load_dataset, prepare_data

    small, large = load_builtin("emoji32"), load_dataset("emoji64")
    assert tuple(large.images.shape) == (len(small), 64, 64, 3) and large.images.dtype == torch.uint8
    assert torch.equal(large.labels, small.labels) and large.class_names == small.class_names
    down = prepare_data(large, 32).images.float()  # antialiased: the same glyphs, up to the two resizes
    assert (down - small.images.float()).abs().mean() < 8
    assert (down - small.images.float().roll(1, 0)).abs().mean() > 20  # and not any other glyph


def test_builtin_glyphs_dataset_loads_by_name():
    from msf.training.data import BUILTIN_NAMES, builtin_file, builtin_path

    assert "glyphs" in BUILTIN_NAMES and builtin_file("glyphs") == "glyphs32"
    d = load_dataset("glyphs")
    assert d.images.dtype == torch.uint8 and d.images.shape[1:] == (32, 32, 3)
    assert d.num_classes >= 8 and len(d) == len(d.labels) >= 2000
    assert d.class_names == [str(i) for i in range(10)]  # the digits
    assert int(d.labels.min()) == 0 and int(d.labels.max()) == len(d.class_names) - 1
    counts = torch.bincount(d.labels, minlength=d.num_classes)
    assert counts.min() >= 200 and counts.max() <= 2 * counts.min()  # roughly balanced
    assert len(torch.unique(d.images.reshape(len(d), -1), dim=0)) == len(d)  # no two images identical
    x = d.images.float()
    assert (x[..., 0] - x[..., 2]).abs().mean() > 10  # colour, not grey
    assert torch.equal(load_dataset("glyphs32").images, d.images)
    with np.load(builtin_path("glyphs32"), allow_pickle=False) as z:
        assert len(z["names"]) == len(d)


def test_training_on_digits_with_mirroring_is_refused_and_says_what_to_set(tmp_path):
    from msf.config import ConfigError, apply_overrides
    from msf.presets import preset
    from msf.training.train import train

    glyphs = ["train.data=glyphs", "model.num_classes=10", "model.class_names=null", "train.steps=1",
              "train.tensorboard=false", f"train.out_dir={tmp_path}"]
    cfg = apply_overrides(preset("tiny"), glyphs)
    with pytest.raises(ConfigError, match="train.data=glyphs: a mirrored image .* train.random_flip=false"):
        train(cfg, progress=False)
    result = train(apply_overrides(cfg, ["train.random_flip=false"]), progress=False)
    assert result.steps == 1 and result.pipeline.config.class_names == [str(d) for d in range(10)]


def test_any_npz_may_say_its_mirrored_images_are_not_of_their_class(tmp_path):
    from msf.training.data import load_dataset

    images, labels = np.zeros((4, 8, 8, 3), np.uint8), np.arange(4) % 2
    np.savez(tmp_path / "a.npz", images=images, labels=labels, mirror_ok=np.asarray(False))
    np.savez(tmp_path / "b.npz", images=images, labels=labels)
    assert load_dataset(str(tmp_path / "a.npz")).mirror_ok is False
    assert load_dataset(str(tmp_path / "b.npz")).mirror_ok is True
