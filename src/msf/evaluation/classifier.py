"""Class accuracy of generated images: a small classifier trained on the real images scores them.

Inception features say little about 32 x 32 emoji; whether a sample of class "Flags" looks like a
flag to a classifier that learnt the real flags says which classes a model can draw. This is the
"GAN-test" of Shmelkov et al. (2018): train on real, test on generated. (Ravuri & Vinyals' CAS is
the reverse, train on generated, test on real; we report the first, under the metric name "cas",
the class accuracy score.)

* :func:`real_classifier`: a small ResNet trained on 90% of a labelled image set, its accuracy on
  the held-out 10% (overall and per class) reported beside every score, cached per dataset in
  ``<cache>/classifiers/<key>.safetensors`` + ``.json`` (the key hashes the images, the labels and
  the recipe), so it is trained once;
* :func:`class_accuracy`: its accuracy on generated images against the labels they were drawn
  for, overall and per class.

It is meant for small images (it trains on the CPU in about a minute for a few thousand 32 x 32
images); at ImageNet scale use a pretrained ImageNet classifier instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msf.files import atomic_write, atomic_write_text


@dataclass(frozen=True)
class Recipe:
    width: int = 32  # channels of the first stage; x2 per stage
    stages: int = 3
    epochs: int = 40
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    held_out: float = 0.1
    seed: int = 0
    version: int = 1  # bump when training changes what a recipe produces


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


class SmallResNet(nn.Module):
    """A stem, ``stages`` residual blocks (the first at full resolution, then halving), pooling, a head."""

    def __init__(self, num_classes: int, width: int = 32, stages: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        chans = [width * 2**i for i in range(stages)]
        self.blocks = nn.Sequential(*[_Block(chans[max(i - 1, 0)], c, 1 if i == 0 else 2)
                                      for i, c in enumerate(chans)])
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """uint8 (B, H, W, 3) -> logits (B, classes)."""
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@dataclass
class RealClassifier:
    net: SmallResNet
    class_names: list[str]
    image_size: int
    held_out_accuracy: float
    held_out_per_class: dict[str, float]
    recipe: Recipe
    path: Path | None = None

    def predict(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            size = self.image_size
            raise ValueError(f"class accuracy: images must be ({size}, {size}, 3) like the classifier's "
                             f"training images, got {images.shape[1:]}")
        self.net.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size]))
                out.append(self.net(batch).argmax(1))
        return torch.cat(out).numpy()


def _accuracies(pred: np.ndarray, labels: np.ndarray, names: list[str]) -> tuple[float, dict[str, float]]:
    per = {names[c]: float((pred[labels == c] == c).mean()) for c in range(len(names)) if (labels == c).any()}
    return float((pred == labels).mean()), per


def class_accuracy(classifier: RealClassifier, images: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy of ``classifier`` on generated ``images`` drawn for ``labels``: overall and per class."""
    labels = np.asarray(labels, np.int64)
    if len(labels) != len(images):
        raise ValueError(f"class accuracy: {len(images)} images but {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= len(classifier.class_names):
        raise ValueError(f"class accuracy: labels must be in [0, {len(classifier.class_names)}), "
                         f"got [{labels.min()}, {labels.max()}]")
    overall, per = _accuracies(classifier.predict(images), labels, classifier.class_names)
    return {"accuracy": overall, "per_class": per}


MAX_FOLDER_IMAGES = 100_000  # a folder is read into memory: the classifier is for small data sets


def labelled_images(spec: str, image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 (N, size, size, 3) images, int64 labels and class names from "emoji", an .npz with
    ``images`` and ``labels`` (ours) or ``arr_0`` and ``arr_1`` (ADM's), or a folder of class folders."""
    from msf.training.data import load_dataset, prepare_data

    path = Path(spec).expanduser()
    if path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as d:
            if "arr_0" in d.files and "images" not in d.files:
                if "arr_1" not in d.files:
                    raise ValueError(f"{path}: no labels (arr_1) for the class-accuracy classifier")
                images, labels = d["arr_0"], d["arr_1"].astype(np.int64)
                names = ([str(c) for c in d["class_names"]] if "class_names" in d.files
                         else [str(i) for i in range(int(labels.max()) + 1)])
                return _resized(images, image_size), labels, names
    data = load_dataset(spec, image_size)
    if hasattr(data, "images"):
        data = prepare_data(data, image_size)
        return data.images.numpy(), data.labels.numpy(), list(data.class_names)
    if len(data) > MAX_FOLDER_IMAGES:
        raise ValueError(f"{spec}: {len(data)} images; the class-accuracy classifier reads its data into "
                         f"memory and is meant for small sets (at most {MAX_FOLDER_IMAGES})")
    images = np.stack([data[i][0].numpy() for i in range(len(data))])
    return images, data.labels.numpy(), list(data.class_names)


def _resized(images: np.ndarray, size: int) -> np.ndarray:
    """As ``data.prepare_data`` resizes an in-memory set (antialiased), where the size differs."""
    if images.shape[1] == size:
        return images
    from msf.method.factorize import resize_image
    from msf.training.data import to_model_range, to_uint8

    return to_uint8(resize_image(to_model_range(torch.from_numpy(images)), size)).numpy()


def _split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified: ``fraction`` of each class (at least one image where a class has two) held out."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, round(fraction * len(idx))) if len(idx) > 1 else 0
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random shifts of up to 2 pixels (reflect padding) and horizontal flips, as msf's training flips."""
    b, h, w, _ = x.shape
    padded = F.pad(x.permute(0, 3, 1, 2).float(), (2, 2, 2, 2), mode="reflect")
    dy, dx = torch.randint(0, 5, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, 3, h, w + 4)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, 3, h, w)
    out = padded.gather(2, rows).gather(3, cols)
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out.round().to(torch.uint8).permute(0, 2, 3, 1)


def train_classifier(images: np.ndarray, labels: np.ndarray, class_names: list[str],
                     recipe: Recipe = Recipe(), progress: bool = False) -> RealClassifier:
    """Train on the recipe's share of ``images``; report accuracy on the held-out rest."""
    from tqdm import tqdm

    from msf.evaluation.features import Pace

    labels = np.asarray(labels, np.int64)
    tr, held = _split(labels, recipe.held_out, recipe.seed)
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    net = SmallResNet(len(class_names), recipe.width, recipe.stages)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    x, y = torch.from_numpy(images[tr]), torch.from_numpy(labels[tr])
    steps = recipe.epochs * math.ceil(len(tr) / recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=steps, pct_start=0.15)
    bar = tqdm(total=steps, desc="training the class-accuracy classifier", unit="step", disable=not progress)
    pace = Pace("training the class-accuracy classifier", steps, "steps")
    net.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(tr), generator=gen)
        for i in range(0, len(tr), recipe.batch_size):
            b = order[i:i + recipe.batch_size]
            loss = F.cross_entropy(net(_augment(x[b], gen)), y[b], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            if progress:
                pace.step(bar.n)
    bar.close()
    clf = RealClassifier(net.eval(), list(class_names), images.shape[1], 0.0, {}, recipe)
    if len(held):
        clf.held_out_accuracy, clf.held_out_per_class = _accuracies(clf.predict(images[held]), labels[held],
                                                                    clf.class_names)
    return clf


def _key(images: np.ndarray, labels: np.ndarray, class_names: list[str], recipe: Recipe) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.asarray(labels, np.int64).tobytes())
    h.update(json.dumps([class_names, asdict(recipe)]).encode())
    return h.hexdigest()[:24]


def real_classifier(images: np.ndarray, labels: np.ndarray, class_names: list[str], cache_dir: str | Path,
                    recipe: Recipe = Recipe(), progress: bool = False) -> RealClassifier:
    """The classifier of this labelled set: from ``cache_dir/classifiers`` if trained before, else trained
    now and cached (safetensors weights, JSON of the recipe and held-out accuracies)."""
    from safetensors.torch import load_file, save_file

    folder = Path(cache_dir).expanduser() / "classifiers"
    key = _key(images, labels, class_names, recipe)
    weights, meta_file = folder / f"{key}.safetensors", folder / f"{key}.json"
    if weights.is_file() and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            net = SmallResNet(len(class_names), recipe.width, recipe.stages)
            net.load_state_dict(load_file(str(weights)))
            return RealClassifier(net.eval(), list(class_names), int(meta["image_size"]),
                                  float(meta["held_out_accuracy"]), meta["held_out_per_class"], recipe,
                                  weights)
        except Exception:  # noqa: BLE001 (a damaged entry, whatever safetensors or json says: train again)
            pass
    if progress:  # minutes on a CPU: say that it happens once
        print(f"[msf] first use of these class data: training the class-accuracy classifier once "
              f"({len(images)} images, {recipe.epochs} epochs; cached in {folder}, later runs reuse it)",
              file=sys.stderr, flush=True)
    clf = train_classifier(images, labels, class_names, recipe, progress)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in clf.net.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
    atomic_write_text(meta_file, json.dumps({
        "image_size": clf.image_size, "class_names": clf.class_names, "num_images": int(len(images)),
        "held_out_accuracy": clf.held_out_accuracy, "held_out_per_class": clf.held_out_per_class,
        "recipe": asdict(recipe),
    }, indent=2))
    clf.path = weights
    return clf
