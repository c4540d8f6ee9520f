"""Where a training run's loss spikes come from: replay a stretch of a run and take the worst step apart.

Resumes a copy of a run from one of its checkpoints (resume is exact: the same batches, noise and times
as the original) up to ``--to``, recording for one scale, at every step, the loss, the largest velocity
the network put out, and the time and class of the batch's worst sample. At the worst step it keeps the
raw network and sweeps the time: the largest adaLN modulation of any block, for t from 0 to 1 (the time
embedding's effect on the network), and the same for the run's final EMA weights (what is sampled).

    .venv/bin/python studies/loss_spikes.py runs/compare_emoji/runs/demo/seed0/train \\
        --checkpoint step_000015232.pt --to 16400 --scale 1 --out docs/compare_emoji/spikes_45min

Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import msf.method.pipeline
from msf.config import config_from_json
from msf.method.flow import interpolate
from msf.method.pipeline import MSFPipeline, build_scale_networks
from msf.training.train import train


@torch.no_grad()
def adaln_by_time(net: torch.nn.Module, points: int = 4001) -> tuple[np.ndarray, np.ndarray]:
    """For t on a grid of [0, 1]: the largest |adaLN modulation| over the blocks (class 0's embedding)."""
    ts = torch.linspace(0, 1, points)
    net = net.float()
    emb = net.t_embedder(ts) + net.y_embedder.embedding_table.weight[0]
    mods = torch.stack([b.adaLN_modulation(emb).abs().amax(1) for b in net.blocks]).amax(0)
    return ts.numpy(), mods.numpy()


def summary(ts: np.ndarray, mods: np.ndarray) -> dict:
    med = float(np.median(mods))
    band = np.flatnonzero(mods > 10 * med)
    return {"median": med, "max": float(mods.max()), "t_of_max": float(ts[mods.argmax()]),
            "band_over_10x_median": [float(ts[band.min()]), float(ts[band.max()])] if len(band) else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a training run's directory (config.json, checkpoints/)")
    p.add_argument("--checkpoint", required=True, help="the checkpoint to replay from (in checkpoints/)")
    p.add_argument("--to", type=int, required=True, help="the last step to replay")
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="path prefix of the .json and .md")
    args = p.parse_args()

    cfg = config_from_json((args.run / "config.json").read_text())
    start = int(args.checkpoint.split("_")[-1].split(".")[0])
    steps: list[dict] = []
    worst = {"loss": -1.0}

    def recording_loss(net, c, y, t, prior=None, noise=None, cosine_weight=0.0, align=None):
        if cosine_weight or align is not None:
            raise SystemExit("replays runs without the cosine term or REPA only")
        v = net(interpolate(c, noise, t), t, y, prior)
        target = (noise - c).float()
        loss = F.mse_loss(v.float(), target)
        if c.shape[-1] == cfg.model.scales[args.scale].image_size // cfg.model.autoencoder.factor:
            with torch.no_grad():
                per = ((v.float() - target) ** 2).flatten(1).mean(1)
                i = int(per.argmax())
                rec = {"step": start + len(steps) + 1, "loss": float(per.mean()),
                       "worst_sample": float(per[i]), "t": float(t.flatten()[i]), "class": int(y[i]),
                       "max_velocity": float(v.abs().max()), "batch_min_t": float(t.min())}
                steps.append(rec)
                if rec["loss"] > worst["loss"]:
                    worst.update(rec, net=copy.deepcopy(net).float().state_dict())
        return loss

    with tempfile.TemporaryDirectory(prefix="msf-spikes-") as tmp:
        (Path(tmp) / "checkpoints").mkdir()
        shutil.copy(args.run / "checkpoints" / args.checkpoint, Path(tmp) / "checkpoints")
        cfg.train.out_dir, cfg.train.steps, cfg.train.ckpt_every = tmp, args.to, 0
        cfg.train.tensorboard, cfg.train.sample_every, cfg.train.eval_every = False, 0, 0
        msf.method.pipeline.rectified_flow_loss = recording_loss  # training_losses calls it by this name
        train(cfg, progress=False, resume=True)

    raw = build_scale_networks(cfg.model)[args.scale]
    raw.load_state_dict(worst.pop("net"))
    ema = MSFPipeline.from_pretrained(args.run / "model").networks[args.scale]
    losses = np.array([s["loss"] for s in steps])
    med = float(np.median(losses))
    spikes = [s for s in steps if s["loss"] > 10 * med]
    result = {
        "run": str(args.run), "scale": args.scale, "from_step": start, "to_step": args.to,
        "median_loss": med, "spikes_over_10x_median": spikes, "worst_step": worst,
        "adaln_raw_at_worst_step": summary(*adaln_by_time(raw)),
        "adaln_final_ema": summary(*adaln_by_time(ema)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# Loss spikes of `{args.run}`, scale {args.scale}, steps {start + 1}-{args.to} (replayed)", "",
             f"Median loss {med:.3f}; {len(spikes)} steps above 10x the median:", "",
             "| step | loss | worst sample | its t | batch's smallest t | class | max velocity |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['loss']:.4g} | {s['worst_sample']:.4g} | {s['t']:.4f} | "
              f"{s['batch_min_t']:.4f} | {s['class']} | {s['max_velocity']:.4g} |" for s in spikes]
    lines += ["", "Largest adaLN modulation of any block, over t in [0, 1] (4,001 points):", "",
              "| weights | median | max | at t | band above 10x the median |", "|---|---|---|---|---|"]
    for name, key in ((f"raw, at step {worst['step']}", "adaln_raw_at_worst_step"),
                      ("final EMA (sampled)", "adaln_final_ema")):
        r = result[key]
        band = r["band_over_10x_median"]
        band = "none" if band is None else f"{band[0]:.4f}-{band[1]:.4f}"
        lines.append(f"| {name} | {r['median']:.3g} | {r['max']:.3g} | {r['t_of_max']:.4f} | {band} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
