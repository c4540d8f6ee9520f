"""Build msf's built-in dataset: emoji rendered from Noto Color Emoji, labelled by group.

Run once, on a machine with Debian's ``fonts-noto-color-emoji`` and ``unicode-data``:

    apt-get install fonts-noto-color-emoji unicode-data
    python scripts/make_emoji_dataset.py --size 32 --out src/msf/data/emoji32.npz

The result is committed; nothing here runs at install or training time.

Choices: fully-qualified emoji only; skin-tone variants (U+1F3FB..U+1F3FF) are
left out, since they are recolourings of the same glyph and would make "People &
Body" 59% of the data (2,148 of 3,655); the "Component" group has no
fully-qualified emoji. Each glyph is rendered at the font's only bitmap size (109),
composited on white, cropped to its bounding box, padded to a square and
resized with Lanczos.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}


def read_emoji(path: str) -> list[tuple[str, str, str, str]]:
    """(emoji, group, subgroup, name) for each fully-qualified line of emoji-test.txt."""
    out = []
    group = subgroup = ""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line:
            codes = [int(c, 16) for c in line.split(";")[0].split()]
            if SKIN_TONES & set(codes):
                continue
            name = line.split("#", 1)[1].split(" ", 3)[-1].strip()
            out.append(("".join(map(chr, codes)), group, subgroup, name))
    return out


def render(font: ImageFont.FreeTypeFont, emoji: str, size: int) -> np.ndarray | None:
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((10, 10), emoji, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    square.paste(glyph, ((side - glyph.size[0]) // 2, (side - glyph.size[1]) // 2))
    white = Image.new("RGBA", square.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, square).convert("RGB")
    return np.asarray(rgb.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--out", default="src/msf/data/emoji32.npz")
    ap.add_argument("--font", default=FONT)
    ap.add_argument("--emoji-test", default=EMOJI_TEST)
    args = ap.parse_args()

    font = ImageFont.truetype(args.font, 109)
    entries = read_emoji(args.emoji_test)
    groups = list(dict.fromkeys(g for _, g, _, _ in entries))
    images, labels, names, skipped = [], [], [], []
    for emoji, group, subgroup, name in entries:
        img = render(font, emoji, args.size)
        # A glyph the font lacks renders as an empty box or a near-white tofu: drop it.
        if img is None or img.std() < 2.0:
            skipped.append(name)
            continue
        images.append(img)
        labels.append(groups.index(group))
        names.append(f"{subgroup}/{name}")
    images_arr = np.stack(images)
    labels_arr = np.asarray(labels, dtype=np.int64)
    np.savez_compressed(
        args.out,
        images=images_arr,
        labels=labels_arr,
        class_names=np.asarray(groups),
        names=np.asarray(names),
    )
    counts = np.bincount(labels_arr, minlength=len(groups))
    print(f"wrote {args.out}: {len(images_arr)} images of {args.size}x{args.size}")
    for g, c in zip(groups, counts):
        print(f"  {c:4d}  {g}")
    if skipped:
        print(f"skipped {len(skipped)} glyphs the font does not render: {skipped[:5]}")


if __name__ == "__main__":
    main()
