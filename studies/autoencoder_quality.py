"""How well a trained autoencoder reproduces its data: the floor any model in its latent space can reach.

Reconstructs every image of a data set through the posterior mean, then reports the PSNR (per image,
on [0, 1] pixels, mean with a bootstrap interval), and FID and KID of the reconstructions against the
originals (msf.evaluate: bootstrap intervals over samples, and the real-against-real floor at the
same count). Writes ``<out>.json`` and ``<out>.md``.

    python studies/autoencoder_quality.py runs/ae-emoji64/autoencoder --data emoji64 --image-size 64 \\
        --out docs/autoencoder/emoji64-kl-f4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from timing import machine  # benchmarks/timing.py

from msf.evaluation.metrics import evaluate, format_results
from msf.training.data import load_dataset, prepare_data, to_model_range, to_uint8


@torch.no_grad()
def reconstruct(folder: str, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder).eval()
    out = [vae.decode(vae.encode(to_model_range(x)).latent_dist.mean).sample.clamp(-1, 1)
           for x in images.split(batch)]
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="a diffusers AutoencoderKL folder (msf train-autoencoder's)")
    ap.add_argument("--data", default="emoji64")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--out", required=True, help="path prefix of the .json and .md")
    args = ap.parse_args()

    data = prepare_data(load_dataset(args.data, args.image_size), args.image_size)
    recon = to_uint8(reconstruct(args.folder, data.images))
    err = ((recon.float() - data.images.float()) / 255).pow(2).flatten(1).mean(1)
    psnr = (-10 * torch.log10(err.clamp_min(1e-12))).numpy()
    boot = np.random.default_rng(0).choice(psnr, (1000, len(psnr))).mean(1)
    npz = Path(args.out).with_suffix(".recon.npz")
    npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz, arr_0=recon.numpy(), arr_1=data.labels.numpy())
    scores = evaluate(str(npz), args.data, metrics=["fid", "kid"], progress=False)
    npz.unlink()
    result = {"folder": args.folder, "data": args.data, "images": len(psnr), "machine": machine(),
              "psnr_db": float(psnr.mean()), "psnr_ci": [float(np.percentile(boot, 2.5)),
                                                         float(np.percentile(boot, 97.5))],
              "scores": {k: v for k, v in scores.items() if isinstance(v, (int, float, list, str, dict))}}
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# Reconstructions of `{args.data}` through `{args.folder}`", "",
             f"{len(psnr)} images, {machine()}", "",
             f"- PSNR {result['psnr_db']:.2f} dB [{result['psnr_ci'][0]:.2f}, {result['psnr_ci'][1]:.2f}]",
             *[f"- {line}" for line in format_results(scores).splitlines()]]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
