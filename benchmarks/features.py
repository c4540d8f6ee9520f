"""Inception features on the CPU: images per second, and whether FID survives the faster path.

The reference path is ``msf eval``'s fp32 one (batch 64, channels-last). Against it, in one
run: bf16 weights at several batch sizes. Then FID on the same images in both precisions,
on the built-in emoji: one half of the set against the other (the real-against-real floor),
and a blurred half against the other (a larger FID, as a weak model's samples give).

    python benchmarks/features.py                     # ~10 minutes on 2 cores
    python benchmarks/features.py --images 200 --quick
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from timing import machine  # benchmarks/timing.py, beside this script

from msf.evaluation.metrics import frechet_distance_from_features, load_feature_extractor
from msf.training.data import load_builtin


def rate(extractor, images: np.ndarray, batch: int, repeats: int) -> float:
    """Images per second: the best of ``repeats`` passes over ``images`` after a warm-up batch."""
    extractor(images[:batch])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        extractor.extract(images, batch)
        best = min(best, time.perf_counter() - t0)
    return len(images) / best


def blurred(images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=0, help="images per half for FID (default: all)")
    ap.add_argument("--timing-images", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="batch sizes 32 and 64 only, 1 repeat")
    ap.add_argument("--sections", default="timing,fid", help="timing, fid, or both")
    args = ap.parse_args()
    images = load_builtin().images.numpy()  # uint8 (N, 32, 32, 3)
    perm = np.random.RandomState(0).permutation(len(images))
    half = args.images or len(images) // 2
    a, b = images[perm[:half]], images[perm[half:2 * half]]
    print(f"# Inception features: {machine()}, {time.strftime('%Y-%m-%d')}\n")
    nets = {p: load_feature_extractor(precision=p) for p in ("fp32", "bf16")}
    print(f"network: {nets['fp32'].network}\n")

    sections = set(args.sections.split(","))
    timing = images[:args.timing_images]
    batches = (32, 64) if args.quick else (16, 32, 64, 128)
    repeats = 1 if args.quick else args.repeats
    print(f"## images/s on {len(timing)} 32 x 32 images (best of {repeats})\n")
    print("| precision | batch | images/s | s/image | ratio to fp32, batch 64 |")
    print("|---|---|---|---|---|")
    rates = {}
    for batch in batches if "timing" in sections else ():  # interleaved: the machine's load hits both alike
        for p, net in nets.items():
            rates[p, batch] = rate(net, timing, batch, repeats)
    for (p, batch), r in sorted(rates.items()) if rates else ():
        print(f"| {p} | {batch} | {r:.1f} | {1 / r:.3f} | {r / rates['fp32', 64]:.2f} |")

    if "fid" not in sections:
        return
    print(f"\n## FID in both precisions ({half} against {half} images)\n")
    print("| pair | FID fp32 | FID bf16 | difference |")
    print("|---|---|---|---|")
    feats = {p: {name: net.extract(x, 64)[0] for name, x in (("a", a), ("b", b), ("blur", blurred(a)))}
             for p, net in nets.items()}
    for label, first in (("half A against half B (real against real)", "a"), ("blurred A against B", "blur")):
        fid = {p: frechet_distance_from_features(f[first], f["b"]) for p, f in feats.items()}
        print(f"| {label} | {fid['fp32']:.3f} | {fid['bf16']:.3f} | "
              f"{100 * (fid['bf16'] - fid['fp32']) / fid['fp32']:+.2f}% |")
    rel = np.linalg.norm(feats["bf16"]["a"] - feats["fp32"]["a"]) / np.linalg.norm(feats["fp32"]["a"])
    print(f"\nfeatures: bf16 against fp32, relative error {rel:.4f} (Frobenius, half A)")


if __name__ == "__main__":
    main()
