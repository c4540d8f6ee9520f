"""Figures: labelled sample grids, the factorization of real images, loss curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from msf.training.data import to_uint8


def image_grid(images: Tensor, rows: int, upscale: int = 1, pad: int = 2) -> Image.Image:
    """uint8 (N, H, W, 3) -> one PIL image, ``rows`` rows, white padding."""
    n, h, w, _ = images.shape
    cols = -(-n // rows)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h,
               pad + c * (w + pad): pad + c * (w + pad) + w] = images[i].numpy()
    img = Image.fromarray(canvas)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)
    return img


def labelled_grid(
    images: Tensor, row_labels: Sequence[str], upscale: int = 2, label_width: int = 150
) -> Image.Image:
    """A grid with one row per label and the label written to its left."""
    grid = image_grid(images, rows=len(row_labels), upscale=upscale)
    out = Image.new("RGB", (grid.width + label_width, grid.height), "white")
    out.paste(grid, (label_width, 0))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    row_h = grid.height / len(row_labels)
    for i, label in enumerate(row_labels):
        draw.text((4, int(i * row_h + row_h / 2 - 5)), label[:24], fill="black", font=font)
    return out


def with_caption(img: Image.Image, caption: str | None) -> Image.Image:
    """``img`` with lines of small text under it (the settings that made it)."""
    if not caption:
        return img
    lines = caption.split("\n")
    font = ImageFont.load_default()
    width = max([img.width] + [int(ImageDraw.Draw(img).textlength(t, font=font)) + 8 for t in lines])
    out = Image.new("RGB", (width, img.height + 12 * len(lines) + 6), "white")
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((4, img.height + 3 + 12 * i), line, fill=(60, 60, 60), font=ImageFont.load_default())
    return out


def save_png(img: Image.Image, path: str | Path, meta: dict | None = None) -> Path:
    """Write a PNG (creating the folder), with ``meta`` as a JSON text chunk named ``msf``."""
    import json

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if meta:
        info.add_text("msf", json.dumps(meta, default=str))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, pnginfo=info)
    return path


def table_figure(
    cells: Sequence[Sequence[Tensor]], col_titles: Sequence[str], row_titles: Sequence[str],
    upscale: int = 3, pad: int = 4, label_width: int = 90, caption: str | None = None,
) -> Image.Image:
    """Rows of equally sized uint8 (H, W, 3) images, titled above each column and left of each row."""
    import textwrap

    h, w = cells[0][0].shape[:2]
    ch, cw = h * upscale, max(w * upscale, 64)  # at least ~10 characters of title per column
    titles = [textwrap.wrap(t, max(cw // 6, 8), break_long_words=False) for t in col_titles]
    top = 12 * max(len(t) for t in titles) + 4
    out = Image.new("RGB", (label_width + len(col_titles) * (cw + pad) + pad,
                            top + len(cells) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for j, lines in enumerate(titles):
        for i, line in enumerate(lines):
            draw.text((label_width + pad + j * (cw + pad), 2 + 12 * i), line, fill="black", font=font)
    for i, row in enumerate(cells):
        y = top + pad + i * (ch + pad)
        draw.text((4, y + ch // 2 - 5), row_titles[i][:18], fill="black", font=font)
        for j, cell in enumerate(row):
            tile = Image.fromarray(cell.numpy()).resize((w * upscale, ch), Image.Resampling.NEAREST)
            out.paste(tile, (label_width + pad + j * (cw + pad), y))
    return with_caption(out, caption)


def save_sample_grid(
    images: Tensor, labels: Sequence[int], class_names: Sequence[str] | None, path: str | Path,
    caption: str | None = None, meta: dict | None = None,
) -> Path:
    """Save samples (float in [-1, 1]) as a grid with one labelled row per distinct class;
    ``caption`` is written under it and ``meta`` (the settings) into the PNG."""
    labels = list(labels)
    classes = list(dict.fromkeys(labels))
    per_row = max(labels.count(c) for c in classes)
    u8 = to_uint8(images)
    rows = []
    for c in classes:
        idx = [i for i, y in enumerate(labels) if y == c]
        row = u8[idx]
        if len(idx) < per_row:
            row = torch.cat([row, torch.full((per_row - len(idx), *u8.shape[1:]), 255, dtype=torch.uint8)])
        rows.append(row)
    names = [class_names[c] if class_names else f"class {c}" for c in classes]
    return save_png(with_caption(labelled_grid(torch.cat(rows), names), caption), path, meta)


def _show(t: Tensor, symmetric: bool) -> np.ndarray:
    """A component (3, h, w) as an RGB array; residuals are stretched around grey."""
    t = t.detach().float().cpu()
    if symmetric:
        m = t.abs().max().clamp_min(1e-8)
        t = t / m
    return ((t.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def factorization_figure(
    images: Tensor, components: Sequence[Tensor], recomposed: Tensor, path: str | Path
) -> Path:
    """Rows of: image | base c_0 | residual c_1 ... | recomposed (pixel-space components)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, K = images.shape[0], len(components)
    cols = K + 2
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n), squeeze=False)
    titles = ["image"] + [
        f"base c_0 ({components[0].shape[-1]}px)" if k == 0
        else f"residual c_{k} ({components[k].shape[-1]}px, stretched)"
        for k in range(K)
    ] + ["recomposed"]
    for i in range(n):
        panels = [_show(images[i], False)]
        panels += [_show(components[k][i], k > 0) for k in range(K)]
        panels += [_show(recomposed[i], False)]
        for j, p in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(p, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=7)
    fig.suptitle("MSF factorization: image = up(base) + up(residuals)", fontsize=9)
    return save_figure(fig, path)


def loss_plot(history: dict[int, list[tuple[int, float]]], path: str | Path) -> Path:
    """Training loss per scale against step (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for k, pts in sorted(history.items()):
        if pts:
            s, v = zip(*pts)
            ax.plot(s, v, label=f"scale {k}" + (" (base)" if k == 0 else " (residual)"))
    ax.set_xlabel("step")
    ax.set_ylabel("rectified-flow loss")
    ax.set_yscale("log")
    if any(history.values()):
        ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
