"""``msf demo``: train a small two-scale MSF on the built-in emoji, on a CPU, in minutes
(the ``demo-plus`` preset: ``demo`` with the recipe that won at equal training time).

Writes into the output directory:

    factorization.png   real images, their base and residual, and the recomposition
    samples.png         one labelled row of samples per class
    loss.png            training loss per scale
    model/              the trained pipeline (config.json + scale_k.safetensors)
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import torch

from msf.config import Config, SamplerSettings, apply_overrides
from msf.interfaces.load import from_checkpoint
from msf.interfaces.viz import factorization_figure, loss_plot, save_sample_grid
from msf.method.factorize import compose
from msf.method.pipeline import MSFPipeline, progress_bar
from msf.presets import preset
from msf.training.data import load_builtin, prepare_data, to_model_range
from msf.training.train import YOUNG_EMA, ema_start_share, train


def factorization_of_real_images(cfg: Config, out: Path, per_class: int = 1) -> Path:
    """Figure of Algorithm 1 on one real image per class (pixel-space components)."""
    data = prepare_data(load_builtin(), cfg.model.image_size)
    g = torch.Generator().manual_seed(1)
    idx = []
    for c in range(min(data.num_classes, 6)):
        members = (data.labels == c).nonzero().flatten()
        idx += members[torch.randperm(len(members), generator=g)[:per_class]].tolist()
    images = to_model_range(data.images[idx])
    pipe = MSFPipeline(cfg.model)
    comps = pipe.components(images)
    ae = pipe.autoencoder
    shown = [ae.decode(c) if ae.factor == 1 else c for c in comps]
    return factorization_figure(images, shown, ae.decode(compose(comps)), out / "factorization.png")


def run_demo(
    out_dir: str | Path = "runs/demo",
    minutes: float = 8.0,
    overrides: list[str] | None = None,
    per_class: int = 10,
    progress: bool = True,
) -> dict[str, Path]:
    """Run the whole demo; returns the paths it wrote."""
    t0 = time.perf_counter()
    cfg = apply_overrides(preset("demo-plus"), [f"train.out_dir={out_dir}", *(overrides or [])])
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"factorization": factorization_of_real_images(cfg, out)}
    print(f"[demo] factorization figure: {paths['factorization']}")
    print(
        f"[demo] training {cfg.model.num_scales} scales on the built-in emoji "
        f"({cfg.train.steps} steps, at most {minutes:g} min)"
    )
    result = train(cfg, progress=progress, max_seconds=minutes * 60, overwrite=True)  # the demo's own dir
    print(
        f"[demo] trained {result.steps} steps in {result.seconds:.0f}s "
        f"({result.images_per_second:.0f} images/s, {result.precision})"
    )
    if result.time_capped:
        print(f"[demo] WARNING: the {minutes:g}-minute cap stopped training at step {result.steps} of "
              f"{result.total_steps}; the samples will be worse than the demo's. This machine is slower "
              "or busier than expected: run it alone, or give it longer with `msf demo --minutes 20`.")
    pipe, weights = result.pipeline, "EMA"
    share, _ = ema_start_share(cfg, result.steps)
    if share > YOUNG_EMA:  # a short or capped run: its EMA is still mostly the random start
        pipe, weights = from_checkpoint(result.checkpoint, "raw", pipe.device), "raw"
        print(f"[demo] the EMA weights still hold {share:.1%} of their random start: "
              "sampling the raw weights")
    names = pipe.config.class_names or []
    labels = [c for c in range(pipe.config.num_classes) for _ in range(per_class)]
    t_s = time.perf_counter()
    images = pipe.sample(labels, seed=0, precision=result.precision, callback=progress_bar(progress))
    print(f"[demo] sampled {len(labels)} images in {time.perf_counter() - t_s:.1f}s")
    settings = SamplerSettings.of(pipe.config)
    paths["samples"] = save_sample_grid(
        images, labels, names, out / "samples.png",
        caption=f"msf demo: {result.steps} steps, {weights} weights, seed 0, {settings.describe()}")
    paths["loss"] = loss_plot(result.history, out / "loss.png")
    paths["model"] = result.model_dir
    print(f"[demo] done in {time.perf_counter() - t0:.0f}s. Wrote:")
    for k, p in paths.items():
        print(f"  {k:14s} {p}")
    print(next_steps(out, result.model_dir, names))
    return paths


def next_steps(out: Path, model: Path, class_names: list[str]) -> str:
    """What to try after the demo, as commands to copy (quoted for a POSIX shell: class names such as
    "Smileys & Emotion" hold spaces and ampersands)."""
    name = class_names[0] if class_names else "0"
    q = shlex.quote
    png = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "class"
    return "\n".join([
        "[demo] next:",
        f"  look at the samples:        {out / 'samples.png'}",
        f"  sample one class:           msf sample {q(str(model))} --classes {q(name)} --per-class 16 "
        f"--out {png}.png",
        f"  see what each scale makes:  msf sample {q(str(model))} --classes {q(name)} --per-class 4 "
        "--show-scales",
        f"  try settings interactively: msf app {q(str(model))}   (needs `pip install gradio`)",
        f"  watch the losses:           tensorboard --logdir {q(str(out))}",
        f"  train on (resume from {out / 'checkpoints'}): msf train --config {q(str(out / 'config.json'))} "
        "--resume train.steps=3000",
        "  compare with a single-scale DiT: msf compare --presets dit-demo-plus,demo-plus --budgets 5",
    ])
