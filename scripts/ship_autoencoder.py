"""Package an autoencoder trained by ``msf train-autoencoder`` as a shipped one: src/msf/autoencoders/<name>/.

    .venv/bin/python scripts/ship_autoencoder.py runs/ae-emoji64 emoji64-kl-f4 \
        --quality docs/autoencoder/emoji64-kl-f4-6200.json

From the run directory (its autoencoder/ folder and config.json) it writes the diffusers folder with
the weights in fp16 safetensors (half the size; they load into the fp32 network), keeping the measured
``scaling_factor`` and ``shift_factor`` in config.json, and a README.md with the recipe and the quality
measured by studies/autoencoder_quality.py (``--quality``, its .json). ``model.autoencoder.path``
then takes the name.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "diffusion_pytorch_model.safetensors"


def readme(name: str, recipe: dict, vae: dict, quality: dict, steps: int) -> str:
    s = quality["scores"]
    floor = s.get("floor", {})
    start = recipe.get("lr_decay_from", 0)
    decay = f"falling linearly from step {start} to the end" if start else "constant"
    return f"""# {name}

A small KL autoencoder (diffusers `AutoencoderKL`) trained by `msf train-autoencoder` on the built-in
`{recipe['data']}` ({recipe['image_size']} x {recipe['image_size']}), shipped so that the latent-space
presets (`latent-demo`, `dit-latent-demo`) train and sample offline from a fresh checkout.

- Shape: f = {recipe['factor']} ({recipe['image_size']} px -> {recipe['image_size'] // recipe['factor']} x \
{recipe['image_size'] // recipe['factor']} x {recipe['channels']}), blocks of {vae['block_out_channels']} \
channels, one ResNet layer each.
- Recipe: {steps} steps at batch {recipe['batch_size']}, AdamW lr {recipe['lr']} ({decay}), \
{recipe['loss']} loss + KL weight {recipe['kl_weight']}, \
random flips, seed {recipe['seed']}; bf16 on a 2-core CPU.
- Latent statistics measured on the data and stored in config.json: `scaling_factor` \
{vae['scaling_factor']:.6g}, `shift_factor` {vae['shift_factor']:.6g}. A model whose \
`model.autoencoder.scaling_factor` differs is refused.
- Reconstructions of all {quality['images']} images (posterior mean; studies/autoencoder_quality.py,
  95% bootstrap intervals): PSNR {quality['psnr_db']:.2f} dB [{quality['psnr_ci'][0]:.2f}, \
{quality['psnr_ci'][1]:.2f}], FID {s['fid']:.1f} [{s['fid_ci'][0]:.1f}, {s['fid_ci'][1]:.1f}], \
KID {s['kid']:.4f} [{s['kid_ci'][0]:.4f}, {s['kid_ci'][1]:.4f}] against the originals: the best any \
model in this latent space can reach against these images. For scale, real against real: FID \
{floor.get('fid', float('nan')):.1f}, KID {floor.get('kid', float('nan')):.5f} at \
{floor.get('n', '?')} against {floor.get('num_ref', '?')} images (half the count, which raises FID).
- Weights stored in fp16 (they load into fp32 networks).

Use: `model.autoencoder.kind=sd-vae model.autoencoder.path={name} model.autoencoder.channels=\
{recipe['channels']} model.autoencoder.factor={recipe['factor']} \
model.autoencoder.scaling_factor={vae['scaling_factor']}`.
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", help="an msf train-autoencoder out_dir (autoencoder/ and config.json)")
    p.add_argument("name")
    p.add_argument("--quality", required=True, help="studies/autoencoder_quality.py's .json for it")
    args = p.parse_args()
    run = Path(args.run)
    recipe = json.loads((run / "config.json").read_text())
    vae = json.loads((run / "autoencoder" / "config.json").read_text())
    quality = json.loads(Path(args.quality).read_text())
    steps = json.loads((run / "autoencoder" / "quality.json").read_text())["steps"]
    out = ROOT / "src" / "msf" / "autoencoders" / args.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(run / "autoencoder" / "config.json", out / "config.json")
    weights = load_file(str(run / "autoencoder" / WEIGHTS))
    save_file({k: v.to(torch.float16) for k, v in weights.items()}, str(out / WEIGHTS))
    (out / "README.md").write_text(readme(args.name, recipe, vae, quality, steps))
    print(f"wrote {out} ({(out / WEIGHTS).stat().st_size / 1e6:.1f} MB of weights)")


if __name__ == "__main__":
    main()
