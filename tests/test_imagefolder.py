import io
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from msf.training.imagefolder import ImageFolder, center_crop_arr, scan_bad_files, to_rgb

S = 16


def _reference_crop(pil_image, image_size):
    # openai/guided-diffusion image_datasets.center_crop_arr, verbatim apart from the enum names.
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.Resampling.BICUBIC
    )
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def _noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _truncated_jpeg(path):
    buf = io.BytesIO()
    _noise(64, 48, seed=1).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "train"
    a, b, c = (root / n for n in ("n01440764", "n02102040", "n03000684"))
    for d in (a, b, c / "x"):
        d.mkdir(parents=True)
    # Class a: RGB PNG, JPEG with an upper-case extension, grayscale PNG, a text file, a hidden file.
    _noise(40, 30).save(a / "rgb.png")
    _noise(30, 40, seed=2).save(a / "photo.JPEG", quality=90)
    Image.new("L", (20, 20), 77).save(a / "gray.png")
    (a / "readme.txt").write_text("not an image")
    (a / ".DS_Store").write_bytes(b"\0\1")
    # Class b: palette PNG, RGBA PNG whose left half is fully transparent (black underneath), nested JPEG.
    _noise(24, 24, seed=3).convert("P", palette=Image.Palette.ADAPTIVE).save(b / "palette.png")
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, 10:] = (200, 10, 10, 255)
    Image.fromarray(rgba).save(b / "rgba.png")
    (b / "sub" / "deeper").mkdir(parents=True)
    _noise(32, 32, seed=4).save(b / "sub" / "deeper" / "nested.jpg")
    # Class c: a truncated JPEG, random bytes named .png, and one good image in a sub-folder.
    _truncated_jpeg(c / "truncated.jpg")
    (c / "garbage.png").write_bytes(np.random.default_rng(5).integers(0, 256, 500, dtype=np.uint8).tobytes())
    _noise(20, 20, seed=6).save(c / "x" / "ok.bmp")
    return root


def _load(root, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = ImageFolder(root, S, **kw)
    return ds, w


def test_layout_labels_and_order(folder):
    ds, w = _load(folder)
    assert ds.classes == ["n01440764", "n02102040", "n03000684"]
    assert ds.class_to_idx == {"n01440764": 0, "n02102040": 1, "n03000684": 2}
    assert ds.num_classes == 3 and ds.image_size == S
    rel = [(p[len(str(folder)) + 1 :], y) for p, y in ds.samples]
    assert rel == [
        ("n01440764/gray.png", 0),
        ("n01440764/photo.JPEG", 0),
        ("n01440764/rgb.png", 0),
        ("n02102040/palette.png", 1),
        ("n02102040/rgba.png", 1),
        ("n02102040/sub/deeper/nested.jpg", 1),
        ("n03000684/garbage.png", 2),
        ("n03000684/truncated.jpg", 2),
        ("n03000684/x/ok.bmp", 2),
    ]
    assert len(ds) == 9
    assert ds.labels.dtype == torch.long and ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Only the .txt file is reported (hidden files are silent), in exactly one warning.
    assert ds.ignored_files == [str(folder / "n01440764" / "readme.txt")]
    assert len(w) == 1 and "1 file" in str(w[0].message) and "readme.txt" in str(w[0].message)
    assert _load(folder)[0].samples == ds.samples  # deterministic


def test_items_are_uint8_rgb_and_alpha_goes_white(folder):
    ds, _ = _load(folder)
    for i in range(len(ds)):
        x, y, bad = ds[i]
        assert x.dtype == torch.uint8 and x.shape == (S, S, 3)
        assert y == ds.labels[i]
    gray = ds[0][0]
    assert (gray == 77).all()
    rgba = ds[4][0].int()  # left half transparent, right half opaque red
    assert (rgba[:, :6] >= 250).all()
    assert (rgba[:, 10:, 0] > 180).all() and (rgba[:, 10:, 1:] < 30).all()
    pal_img = Image.open(folder / "n02102040" / "palette.png")
    assert torch.equal(ds[3][0], torch.from_numpy(center_crop_arr(pal_img.convert("RGB"), S)))


def test_to_rgb_modes():
    white = (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == white
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.info["transparency"] = 0
    assert to_rgb(p).getpixel((0, 0)) == white
    p.info.pop("transparency")
    assert to_rgb(p).getpixel((0, 0)) == (0, 0, 0)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    # 16-bit and float grayscale are rescaled, not clipped to white.
    i16 = Image.fromarray(np.full((4, 4), 32896, np.uint16))
    assert i16.mode.startswith("I;16") and to_rgb(i16).getpixel((0, 0)) == (128, 128, 128)
    i32 = Image.fromarray(np.full((4, 4), 32896, np.int32))
    assert i32.mode == "I" and to_rgb(i32).getpixel((0, 0)) == (128, 128, 128)
    f = Image.fromarray(np.full((4, 4), 0.5, np.float32))
    assert f.mode == "F" and to_rgb(f).getpixel((0, 0)) == (128, 128, 128)
    for img in (la, p, half, i16, i32, f):
        assert to_rgb(img).mode == "RGB"


def test_center_crop_takes_the_centre():
    arr = np.zeros((200, 300, 3), np.uint8)
    arr[:] = (0, 255, 0)
    arr[:, :50] = (255, 0, 0)
    arr[:, 250:] = (0, 0, 255)
    img = Image.fromarray(arr)
    out = center_crop_arr(img, 100)  # box-halved to 150x100, centre 100 columns are all green
    assert out.dtype == np.uint8 and out.shape == (100, 100, 3)
    assert (out == (0, 255, 0)).all()
    for size in (32, 64, 100, 150):
        out = center_crop_arr(img, size)
        assert out.shape == (size, size, 3)
        np.testing.assert_array_equal(out, _reference_crop(img, size))
        mid = out[:, size // 4 : 3 * size // 4]
        assert (np.abs(mid.astype(int) - (0, 255, 0)) <= 2).all()
    tall = _noise(50, 90, seed=7)
    np.testing.assert_array_equal(center_crop_arr(tall, 20), _reference_crop(tall, 20))


def test_dataset_items_are_centre_crops_of_non_square_images(tmp_path):
    # Through the dataset's own item path: a wide and a tall image with coloured borders that a
    # centre crop removes and a squash or a corner crop keeps.
    wide = np.zeros((40, 100, 3), np.uint8)
    wide[:] = (0, 200, 0)
    wide[:, :20], wide[:, 80:] = (200, 0, 0), (0, 0, 200)
    tall = np.transpose(wide, (1, 0, 2)).copy()
    (tmp_path / "a").mkdir()
    Image.fromarray(wide).save(tmp_path / "a" / "wide.png")
    Image.fromarray(tall).save(tmp_path / "a" / "tall.png")
    noisy = _noise(37, 23, seed=9)
    noisy.save(tmp_path / "a" / "noisy.png")
    ds = ImageFolder(tmp_path, S)
    items = {os.path.basename(p): ds[i][0].numpy() for i, (p, _) in enumerate(ds.samples)}
    for name in ("wide.png", "tall.png"):
        img = items[name]
        assert img.shape == (S, S, 3)
        assert (np.abs(img.astype(int) - (0, 200, 0)) <= 2).all(), name  # only the green centre is left
        np.testing.assert_array_equal(img, _reference_crop(Image.open(tmp_path / "a" / name), S))
    np.testing.assert_array_equal(items["noisy.png"], _reference_crop(noisy, S))


def test_center_crop_box_halves_large_images():
    img = _noise(1024, 768)
    out = center_crop_arr(img, 64)
    ref = _reference_crop(img, 64)
    np.testing.assert_array_equal(out, ref)
    # Skipping the box halving (Pillow's antialiased bicubic straight from 1024x768) is close but differs
    # in most pixels, so the equality above does check the halving.
    direct = np.array(img.resize((85, 64), resample=Image.Resampling.BICUBIC))[:, 10:74]
    assert (direct != ref).mean() > 0.5


def test_bad_files(folder):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    garbage = str(folder / "n03000684" / "garbage.png")
    truncated = str(folder / "n03000684" / "truncated.jpg")
    ds, _ = _load(folder)
    x, y, bad = ds[6]  # garbage.png -> the next file also fails -> ok.bmp
    assert bad == garbage and y == 2
    assert torch.equal(x, ds[8][0]) and ds[8][2] == ""
    x, y, bad = ds[7]  # truncated.jpg -> ok.bmp
    assert bad == truncated and torch.equal(x, ds[8][0])
    assert scan_bad_files(ds) == [garbage, truncated]
    assert scan_bad_files(ds, limit=7) == [garbage]

    strict, _ = _load(folder, strict=True)
    assert strict[8][2] == ""
    with pytest.raises(ValueError, match="truncated.jpg"):
        strict[7]
    with pytest.raises(ValueError, match="garbage.png"):
        strict[6]


def test_bad_last_file_wraps_around(tmp_path):
    (tmp_path / "a").mkdir()
    _noise(20, 20).save(tmp_path / "a" / "1.png")
    _truncated_jpeg(tmp_path / "a" / "2.jpg")
    ds = ImageFolder(tmp_path, S)
    x, y, bad = ds[1]
    assert bad.endswith("2.jpg") and torch.equal(x, ds[0][0])
    (tmp_path / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="none of the 2"):
        ds[0]


def test_empty_class_is_kept_and_warned(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    _noise(20, 20).save(tmp_path / "a" / "1.png")
    _noise(20, 20).save(tmp_path / "c" / "1.png")
    with pytest.warns(UserWarning, match=r"1 class folder\(s\) contain no images: b"):
        ds = ImageFolder(tmp_path, S)
    assert ds.classes == ["a", "b", "c"] and ds.labels.tolist() == [0, 2]


def test_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match="does not exist") as e:
        ImageFolder(missing, S)
    assert str(missing) in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class sub-folders") as e:
        ImageFolder(empty, S)
    assert str(empty) in str(e.value)
    (empty / "loose.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolder(empty, S)
    no_images = tmp_path / "no_images"
    (no_images / "cls").mkdir(parents=True)
    (no_images / "cls" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files") as e:
        ImageFolder(no_images, S)
    assert str(no_images) in str(e.value)
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"")
    with pytest.raises(ValueError, match="not a folder") as e:
        ImageFolder(a_file, S)
    assert str(a_file) in str(e.value)


def test_picklable_and_dataloader(folder):
    ds, _ = _load(folder)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.samples == ds.samples and torch.equal(clone[2][0], ds[2][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    xs, ys, bads = [], [], []
    for x, y, bad in loader:
        xs.append(x)
        ys.append(y)
        bads.extend(bad)
    x = torch.cat(xs)
    assert x.shape == (9, S, S, 3) and x.dtype == torch.uint8
    assert torch.cat(ys).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [b for b in bads if b] == [str(folder / "n03000684" / n) for n in ("garbage.png", "truncated.jpg")]


def test_training_reads_an_image_folder_end_to_end(tmp_path):
    from msf.config import apply_overrides
    from msf.presets import preset
    from msf.training.train import train

    rng = np.random.default_rng(0)
    for c, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        d = tmp_path / "data" / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(6):
            arr = np.full((40 + i, 30 + 2 * i, 3), colour, np.uint8)
            arr += rng.integers(0, 20, arr.shape, dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    (tmp_path / "data" / "class_1" / "broken.png").write_bytes(b"not a png")
    cfg = apply_overrides(preset("tiny"), [
        f"train.data={tmp_path / 'data'}", "model.num_classes=2", "model.class_names=null",
        "train.steps=3", "train.batch_size=4", "train.num_workers=0", "train.tensorboard=false",
        f"train.out_dir={tmp_path / 'run'}", "model.normalize=std",
    ])
    with pytest.warns(UserWarning, match="unreadable"):
        result = train(cfg, progress=False)
    assert result.pipeline.config.class_names == ["class_0", "class_1"]
    assert result.pipeline.config.component_std[0] > 0
    strict = apply_overrides(cfg, ["train.strict_data=true", f"train.out_dir={tmp_path / 's'}",
                                   "train.steps=30"])
    with pytest.raises(ValueError, match="broken.png"):
        train(strict, progress=False)
