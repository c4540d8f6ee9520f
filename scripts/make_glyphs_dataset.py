"""Build msf's second built-in dataset: the digits 0-9 rendered from many Debian font files.

Run once, on a machine with the Debian packages named in PACKAGES installed:

    apt-get install -y --no-install-recommends $(python scripts/make_glyphs_dataset.py --list-packages)
    python scripts/make_glyphs_dataset.py --out src/msf/data/glyphs32.npz --preview docs/glyphs32.png

The result is committed; nothing here runs at install or training time.

Choices: every .ttf and .otf file of the packages in PACKAGES (the .pfb/.t1/.woff copies of
the same designs are left out), in a fixed order (package, then path), less EXCLUDED_FILES
(fonts that put pictures on the digit code points). A font is used only if its Unicode cmap
(fontTools) has all ten digits, each renders to ink that differs from the font's .notdef
glyph and survives the downscale (MIN_INK), and no two of its digits render alike (a
placeholder font). Each digit is rendered with Pillow's basic layout (no shaping library, so
the bitmap depends on the Pillow/FreeType build only) at 160 px, cropped to its ink, padded
to a square with a 7% margin on each side, and resized with Lanczos to 32 px. A rendering
within NEAR_DUPLICATE (shape_distance: the share of the ink that differs) of one already kept
for the same digit is dropped: that removes the same design shipped twice (Liberation 1 and
2, Arimo, TeX Gyre and URW, Noto's script fonts that copy Noto Sans digits, the optical sizes
of Latin Modern) and neighbouring weights of one family. Colour: each font gets one (ink,
paper) pair from PALETTE, picked by a SHA-256 of the font's file name, so the three channels
carry something, the colour says nothing about the class, and the digits of a font share a
colour scheme (a style factor a class-conditional model must leave free).
The .npz is written with fixed zip timestamps, so the same packages give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import subprocess
import zipfile
from pathlib import Path

import numpy as np
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

DIGITS = "0123456789"
RENDER_SIZE = 160  # em size of the large rendering, in pixels
MARGIN = 0.07  # of the padded square's side, on each side
NEAR_DUPLICATE = 0.15  # shape_distance below which two renderings of a digit count as one design
PLACEHOLDER = 0.02  # two digits of one font this close (shape_distance) are one placeholder glyph
MIN_INK = 80  # a digit whose darkest 32 px pixel is fainter than this (0-255) is a hairline lost at 32 px
NOTDEF_PROBE = "\U0010fffd"  # a private-use code point no font here maps: renders the .notdef glyph

# Debian package -> the licence of its font files, as its /usr/share/doc/<package>/copyright says.
# Every one permits redistributing the fonts and documents (renderings) made with them.
PACKAGES: dict[str, str] = {
    "fonts-3270": "OFL-1.1 or BSD-3-Clause",
    "fonts-adf-accanthis": "GPL-2+ with font exception",
    "fonts-adf-baskervald": "GPL-2+ with font exception",
    "fonts-adf-berenis": "GPL-2+ with font exception",
    "fonts-adf-gillius": "GPL-2+ with font exception",
    "fonts-adf-ikarius": "GPL-2+ with font exception",
    "fonts-adf-irianis": "GPL-2+ with font exception",
    "fonts-adf-libris": "GPL-2+ with font exception",
    "fonts-adf-mekanus": "GPL-2+ with font exception",
    "fonts-adf-oldania": "GPL-2+ with font exception",
    "fonts-adf-romande": "GPL-2+ with font exception",
    "fonts-adf-solothurn": "GPL-2+ with font exception",
    "fonts-adf-switzera": "GPL-2+ with font exception",
    "fonts-adf-tribun": "GPL-2+ with font exception",
    "fonts-adf-universalis": "GPL-2+ with font exception",
    "fonts-adf-verana": "GPL-2+ with font exception",
    "fonts-agave": "MIT",
    "fonts-allerta": "OFL-1.1",
    "fonts-amiga": "OFL-1.1",
    "fonts-anonymous-pro": "OFL-1.1",
    "fonts-apropal": "OFL-1.1",
    "fonts-arapey": "OFL-1.1",
    "fonts-arkpandora": "Bitstream Vera",
    "fonts-averia-gwf": "OFL-1.1",
    "fonts-averia-sans-gwf": "OFL-1.1",
    "fonts-averia-serif-gwf": "OFL-1.1",
    "fonts-b612": "OFL-1.1 and EPL-2.0 and EDL-1.0",
    "fonts-babelstone-modern": "OFL-1.1",
    "fonts-bajaderka": "OFL-1.1",
    "fonts-bebas-neue": "OFL-1.1",
    "fonts-blankenburg": "OFL-1.1",
    "fonts-breip": "OFL-1.0",
    "fonts-bwht": "OFL-1.1",
    "fonts-cabin": "OFL-1.1",
    "fonts-cabinsketch": "OFL-1.1",
    "fonts-cantarell": "OFL-1.1",
    "fonts-cardo": "OFL-1.1",
    "fonts-century-catalogue": "OFL-1.0",
    "fonts-cherrybomb": "OFL-1.1",
    "fonts-clear-sans": "Apache-2.0",
    "fonts-cmu": "OFL-1.1",
    "fonts-comfortaa": "OFL-1.1",
    "fonts-comic-neue": "OFL-1.1",
    "fonts-compagnon": "OFL-1.1",
    "fonts-courier-prime": "OFL-1.1",
    "fonts-croscore": "OFL-1.1",
    "fonts-crosextra-caladea": "OFL-1.1",
    "fonts-crosextra-carlito": "OFL-1.1",
    "fonts-dancingscript": "OFL-1.1",
    "fonts-dejavu-core": "Bitstream Vera (DejaVu changes public domain)",
    "fonts-dejavu-extra": "Bitstream Vera (DejaVu changes public domain)",
    "fonts-dosis": "OFL-1.1",
    "fonts-dotgothic16": "OFL-1.1",
    "fonts-dseg": "OFL-1.1",
    "fonts-ebgaramond": "OFL-1.1",
    "fonts-ecolier-court": "OFL-1.1",
    "fonts-elstob": "OFL-1.1",
    "fonts-essays1743": "OFL-1.1 or LGPL-2.1",
    "fonts-eurofurence": "OFL-1.1",
    "fonts-fantasma": "CC0-1.0",
    "fonts-fantasque-sans": "OFL-1.1",
    "fonts-fanwood": "MIT",
    "fonts-ferrite-core": "OFL-1.1",
    "fonts-firacode": "OFL-1.1",
    "fonts-freefont-ttf": "GPL-3+ with font exception",
    "fonts-georgewilliams": "OFL-1.1 or BSD-3-Clause",
    "fonts-gfs-bodoni-classic": "OFL-1.1",
    "fonts-gfs-didot": "OFL-1.1",
    "fonts-gfs-neohellenic": "OFL-1.1",
    "fonts-gnutypewriter": "OFL-1.1",
    "fonts-go": "BSD-3-Clause",
    "fonts-gotico-antiqua": "OFL-1.1",
    "fonts-goudybookletter": "public domain",
    "fonts-hack": "MIT and Bitstream Vera",
    "fonts-havana": "OFL-1.1",
    "fonts-humor-sans": "OFL-1.1",
    "fonts-inconsolata": "OFL-1.0",
    "fonts-inter": "OFL-1.1 and Apache-2.0",
    "fonts-jetbrains-mono": "Apache-2.0",
    "fonts-joscelyn": "OFL-1.1",
    "fonts-junction": "OFL-1.1",
    "fonts-junicode": "OFL-1.1",
    "fonts-jura": "OFL-1.1 (GPL-3 or OFL-1.1 for its Kayah Li glyphs)",
    "fonts-karla": "OFL-1.1",
    "fonts-karmilla": "OFL-1.1",
    "fonts-kaushanscript": "OFL-1.1",
    "fonts-klaudia-berenika": "OFL-1.1",
    "fonts-kristi": "OFL-1.1",
    "fonts-lato": "OFL-1.1",
    "fonts-le-murmure": "OFL-1.1",
    "fonts-league-mono": "OFL-1.1",
    "fonts-league-spartan": "OFL-1.1",
    "fonts-leckerli-one": "OFL-1.1",
    "fonts-levien-museum": "OFL-1.0",
    "fonts-levien-typoscript": "OFL-1.0",
    "fonts-lg-aboriginal": "GPL-3 with font exception",
    "fonts-liberation": "GPL-2 with font exception",
    "fonts-liberation2": "OFL-1.1",
    "fonts-lindenhill": "MIT",
    "fonts-linuxlibertine": "GPL-2+ with font exception and OFL-1.1",
    "fonts-lmodern": "GUST Font License",
    "fonts-lobster": "OFL-1.1",
    "fonts-lobstertwo": "OFL-1.1",
    "fonts-manrope": "OFL-1.1",
    "fonts-millimetre": "OFL-1.1",
    "fonts-monofur": "OFL-1.1",
    "fonts-monoid": "MIT or OFL-1.1",
    "fonts-mononoki": "OFL-1.1",
    "fonts-mph-2b-damase": "public domain",
    "fonts-mplus": "OFL-1.1",
    "fonts-national-park": "OFL-1.1",
    "fonts-noto-core": "OFL-1.1",
    "fonts-noto-mono": "OFL-1.1",
    "fonts-ocr-a": "public domain",
    "fonts-ocr-b": "public domain",
    "fonts-okolaks": "OFL-1.1",
    "fonts-oldstandard": "OFL-1.0",
    "fonts-open-sans": "Apache-2.0",
    "fonts-opendin": "OFL-1.1",
    "fonts-opendyslexic": "CC-BY-3.0 and Bitstream Vera",
    "fonts-osifont": "GPL-3 with font exception (or LGPL-3/GPL-2 with font exception)",
    "fonts-oxygen": "GPL-3+ with font exception or OFL-1.1",
    "fonts-paratype": "ParaType Free Font License",
    "fonts-play": "OFL-1.1 and Apache-2.0",
    "fonts-prociono": "public domain",
    "fonts-quattrocento": "OFL-1.1",
    "fonts-quicksand": "OFL-1.1",
    "fonts-radisnoir": "OFL-1.1",
    "fonts-roadgeek": "MIT",
    "fonts-roboto-slab": "Apache-2.0",
    "fonts-roboto-unhinted": "Apache-2.0",
    "fonts-rocknroll": "OFL-1.1",
    "fonts-routed-gothic": "OFL-1.1",
    "fonts-rufscript": "GPL-3+ with font exception",
    "fonts-sil-andika": "OFL-1.1",
    "fonts-sil-charis": "OFL-1.1",
    "fonts-sil-doulos": "OFL-1.1",
    "fonts-sil-galatia": "OFL-1.1",
    "fonts-sil-gentiumplus": "OFL-1.1",
    "fonts-sixtyfour": "OFL-1.1",
    "fonts-sjfonts": "GPL with font exception",
    "fonts-solide-mirage": "OFL-1.1",
    "fonts-sora": "OFL-1.1 and Apache-2.0",
    "fonts-stick": "OFL-1.1",
    "fonts-stix": "OFL-1.1",
    "fonts-texgyre": "GUST Font License",
    "fonts-tiresias": "GPL-3+ with font exception",
    "fonts-tomsontalks": "OFL-1.1",
    "fonts-train": "OFL-1.1",
    "fonts-triod-postnaja": "OFL-1.1",
    "fonts-tuffy": "public domain",
    "fonts-ubuntu-title": "OFL-1.1 and GPL-2 with font exception",
    "fonts-urw-base35": "AGPL-3 with font exception",
    "fonts-vollkorn": "OFL-1.1",
    "fonts-yanone-kaffeesatz": "OFL-1.1",
    "fonts-yusei-magic": "OFL-1.1",
}

# Font files whose digit code points hold no digit (or a digit inside a picture): left out by name.
EXCLUDED_FILES: dict[str, str] = {
    "D050000L.otf": "URW Dingbats: ornaments on the digit code points",
    "DSEGWeather.ttf": "weather icons on the digit code points",
    "DSEG7SEGGCHAN-Regular.ttf": "7-segment digits drawn as faces",
    "DSEG7SEGGCHANMINI-Regular.ttf": "7-segment digits drawn as faces",
    "LinBiolinum_K.otf": "Linux Biolinum Keyboard: digits on keycaps",
    "OCRBE.otf": "digits reversed out of black boxes",
    "OCRBX.otf": "digits reversed out of black boxes",
}

# (ink, paper) pairs: dark on light and light on dark, each pair well apart in brightness.
PALETTE: list[tuple[tuple[int, int, int], tuple[int, int, int]]] = [
    ((0, 0, 0), (255, 255, 255)),
    ((20, 30, 110), (250, 244, 225)),
    ((150, 20, 30), (255, 240, 200)),
    ((10, 90, 40), (225, 245, 225)),
    ((90, 30, 120), (250, 225, 240)),
    ((255, 255, 255), (30, 50, 120)),
    ((255, 220, 60), (20, 20, 20)),
    ((255, 250, 240), (160, 40, 40)),
    ((200, 255, 220), (20, 80, 70)),
    ((40, 40, 40), (190, 220, 250)),
]


def package_fonts(package: str) -> list[str]:
    """The package's .ttf/.otf files, sorted."""
    out = subprocess.run(["dpkg", "-L", package], check=True, capture_output=True, text=True).stdout
    return sorted(p for p in out.splitlines() if p.lower().endswith((".ttf", ".otf")) and Path(p).is_file())


def package_version(package: str) -> str:
    return subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], check=True,
                          capture_output=True, text=True).stdout


def shape_distance(kept: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Soft Jaccard distance of s to each of kept (grey levels): the share of the ink that differs.

    Scale-free in the amount of ink, so a thin "1" and a heavy "8" are judged alike; 0.05 is the
    same design re-hinted, 0.1 a neighbouring weight of one family, 0.25 a different design.
    """
    return np.abs(kept - s).sum(axis=(-2, -1)) / np.maximum(np.maximum(kept, s).sum(axis=(-2, -1)), 1.0)


def render_shape(font: ImageFont.FreeTypeFont, ch: str, size: int) -> np.ndarray | None:
    """The glyph's ink as a size x size grey level (0 paper, 255 ink): cropped, squared, Lanczos."""
    left, top, right, bottom = font.getbbox(ch)
    pad = RENDER_SIZE // 4
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    if w <= 2 * pad or h <= 2 * pad or w > 8 * RENDER_SIZE or h > 8 * RENDER_SIZE:
        return None
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), ch, font=font, fill=255)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = round(max(glyph.size) / (1 - 2 * MARGIN))
    square = Image.new("L", (side, side), 0)
    square.paste(glyph, ((side - glyph.size[0]) // 2, (side - glyph.size[1]) // 2))
    return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def font_digits(path: str, size: int) -> tuple[np.ndarray | None, str]:
    """The ten digit shapes of one font file (10 x size x size), or None and why not."""
    try:
        cmap = TTFont(path, lazy=True)["cmap"].getBestCmap()
    except Exception as e:  # a file fontTools cannot read is not used
        return None, f"unreadable ({type(e).__name__})"
    if not cmap:
        return None, "no Unicode cmap"
    missing = [d for d in DIGITS if cmap.get(ord(d), ".notdef") == ".notdef"]
    if missing:
        return None, f"lacks {''.join(missing)}"
    font = ImageFont.truetype(path, RENDER_SIZE, layout_engine=ImageFont.Layout.BASIC)
    notdef = render_shape(font, NOTDEF_PROBE, size)
    shapes = []
    for d in DIGITS:
        s = render_shape(font, d, size)
        if s is None:
            return None, f"no ink for {d}"
        if s.max() < MIN_INK:
            return None, "too faint at 32 px"
        if notdef is not None and np.abs(s.astype(np.int16) - notdef).max() <= 2:
            return None, f"{d} renders as .notdef"
        shapes.append(s)
    arr = np.stack(shapes).astype(np.float32)
    gaps = shape_distance(arr[:, None], arr[None]) + np.eye(10)
    if gaps.min() < PLACEHOLDER:
        return None, "two digits render alike (placeholder glyphs)"
    return np.stack(shapes), ""


def colours(path: str) -> tuple[np.ndarray, np.ndarray]:
    h = int.from_bytes(hashlib.sha256(Path(path).name.encode()).digest()[:8], "big")
    ink, paper = PALETTE[h % len(PALETTE)]
    return np.asarray(ink, np.float32), np.asarray(paper, np.float32)


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed, with a fixed timestamp on each member so the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def preview(images: np.ndarray, labels: np.ndarray, out: str, per_class: int = 16, scale: int = 2) -> None:
    """A grid: one row per class, `per_class` of its images spread evenly over the set."""
    cell = images.shape[1] * scale + 2
    rows = int(labels.max()) + 1
    grid = Image.new("RGB", (per_class * cell + 2, rows * cell + 2), (128, 128, 128))
    for c in range(rows):
        idx = np.flatnonzero(labels == c)
        pick = idx[np.linspace(0, len(idx) - 1, per_class).round().astype(int)]
        for j, i in enumerate(pick):
            tile = Image.fromarray(images[i]).resize((cell - 2, cell - 2), Image.Resampling.NEAREST)
            grid.paste(tile, (2 + j * cell, 2 + c * cell))
    grid.save(out, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--out", default="src/msf/data/glyphs32.npz")
    ap.add_argument("--preview", default="", help="also write a PNG grid of examples per class here")
    ap.add_argument("--list-packages", action="store_true", help="print the Debian packages used and exit")
    ap.add_argument("--list-skipped", action="store_true", help="also print each font file not used, and why")
    args = ap.parse_args()
    logging.getLogger("fontTools").setLevel(logging.ERROR)  # warnings about fonts' tables, not errors
    if args.list_packages:
        print(" ".join(PACKAGES))
        return

    installed = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\\n", *PACKAGES],
                               capture_output=True, text=True).stdout.split("\n")
    missing = sorted(set(PACKAGES) - {line.split()[0] for line in installed if line.endswith(" installed")})
    if missing:
        raise SystemExit(f"not installed: {' '.join(missing)} (see --list-packages)")

    kept: list[list[np.ndarray]] = [[] for _ in DIGITS]  # per digit, the shapes kept so far (float)
    images, labels, names = [], [], []
    skipped: dict[str, str] = {}
    n_files = n_fonts = n_contributing = n_dup = 0
    for package in PACKAGES:
        version = package_version(package)
        files = package_fonts(package)
        used = n_used = 0
        for path in files:
            n_files += 1
            if Path(path).name in EXCLUDED_FILES:
                skipped[path] = "excluded by name"
                continue
            shapes, why = font_digits(path, args.size)
            if shapes is None:
                skipped[path] = why
                continue
            n_fonts += 1
            n_before = used
            ink, paper = colours(path)
            for label, shape in enumerate(shapes):
                s = shape.astype(np.float32)
                if kept[label] and shape_distance(np.stack(kept[label]), s).min() < NEAR_DUPLICATE:
                    n_dup += 1
                    continue
                kept[label].append(s)
                a = s[..., None] / 255.0
                images.append(np.rint(paper + (ink - paper) * a).astype(np.uint8))
                labels.append(label)
                names.append(f"{package}/{Path(path).name}")
                used += 1
            n_used += used > n_before
        n_contributing += n_used
        print(f"{package} {version}: {len(files)} files, {n_used} used, {used} images")

    images_arr = np.stack(images)
    labels_arr = np.asarray(labels, dtype=np.int64)
    flat = images_arr.reshape(len(images_arr), -1)
    assert len(np.unique(flat, axis=0)) == len(flat), "two identical images"
    save_npz(args.out, {
        "images": images_arr,
        "labels": labels_arr,
        "class_names": np.asarray(list(DIGITS)),
        "names": np.asarray(names),
        "mirror_ok": np.asarray(False),  # a mirrored digit is not a digit: msf refuses random flips on it
    })
    print(f"wrote {args.out}: {len(images_arr)} images of {args.size}x{args.size}; of {n_files} font files "
          f"{n_fonts} have all ten digits and {n_contributing} give at least one image; "
          f"{n_dup} renderings dropped as near-duplicates")
    for d, c in zip(DIGITS, np.bincount(labels_arr, minlength=10)):
        print(f"  {c:4d}  {d}")
    reasons: dict[str, int] = {}
    for why in skipped.values():
        key = why.split(" for ")[0] if why.startswith("no ink") else why.split(" (")[0]
        key = "lacks some digits" if key.startswith("lacks") else key
        reasons[key] = reasons.get(key, 0) + 1
    print(f"skipped {len(skipped)} font files: {reasons}")
    if args.list_skipped:
        for path, why in skipped.items():
            print(f"  {path}: {why}")
    if args.preview:
        preview(images_arr, labels_arr, args.preview)
        print(f"wrote {args.preview}")


if __name__ == "__main__":
    main()
