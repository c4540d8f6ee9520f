"""``msf app MODEL``: a local web page to sample a model and see what each scale generated.

Pick a class, a seed, the number of samples and, per scale, the steps, the guidance and the
solver; the page shows the base, the base upsampled, what each later scale adds and the image,
side by side, one row per sample, with the seconds each scale took. Built with Gradio (``pip
install gradio``); it serves on 127.0.0.1 only unless told otherwise, and calls no outside host.
The same function answers the page and Gradio's HTTP API (``/generate``), which the tests drive.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from msf.config import SOLVERS, ConfigError, SamplerSettings
from msf.scale_view import view_columns, view_scales

MAX_SAMPLES = 8


def _strip(cells: np.ndarray, upscale: int, pad: int = 2) -> Image.Image:
    """uint8 (n, H, W, 3) -> one column of the n images, white gaps, nearest-neighbour upscaled."""
    n, h, w, _ = cells.shape
    canvas = np.full((n * (h + pad) - pad, w, 3), 255, np.uint8)
    for i in range(n):
        canvas[i * (h + pad): i * (h + pad) + h] = cells[i]
    img = Image.fromarray(canvas)
    return img.resize((w * upscale, img.height * upscale), Image.Resampling.NEAREST)


def generate(pipe, class_index: int, seed: int, num_samples: int, steps: list[int], cfg_scale: list[float],
             solver: list[str], precision: str = "fp32", upscale: int = 4) -> tuple[list[Image.Image], str]:
    """One column image per stage (base, base upsampled, each addition, image) and a timing line."""
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise ConfigError(f"samples: {num_samples} must be in 1..{MAX_SAMPLES}")
    settings = SamplerSettings.of(pipe.config, steps, cfg_scale, solver)
    view = view_scales(pipe, [class_index] * num_samples, seed=seed, settings=settings, precision=precision)
    columns = [_strip(cells.numpy(), upscale) for _, cells in view_columns(view)]
    timing = " · ".join(f"scale {k}: {s:.2f} s ({settings.steps[k]} steps, cfg {settings.cfg_scale[k]:g})"
                        for k, s in enumerate(view.seconds))
    total = f"decode: {view.decode_seconds:.2f} s · {settings.evaluations} evaluations/image"
    return columns, f"{timing} · {total}"


def build_app(pipe, title: str = "msf"):
    """The Gradio page for ``pipe`` (an :class:`msf.pipeline.MSFPipeline`)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls to outside hosts
    try:
        import gradio as gr
    except ImportError:
        raise ConfigError("msf app needs Gradio: pip install gradio (or pip install 'msf[app]')") from None

    cfg = pipe.config
    names = cfg.class_names or [f"class {c}" for c in range(cfg.num_classes)]
    stages = stage_titles(cfg.num_scales)

    def run(class_name, seed, num_samples, *per_scale):
        k = cfg.num_scales
        steps, cfgs, solvers = per_scale[:k], per_scale[k: 2 * k], per_scale[2 * k:]
        columns, timing = generate(pipe, names.index(class_name), int(seed), int(num_samples),
                                   [int(s) for s in steps], [float(w) for w in cfgs], list(solvers))
        return (*columns, timing)

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}\nMSF samples the base, then each residual given the scales before it "
                    "(Algorithm 3). Each column shows one stage; each row one sample.")
        with gr.Row():
            cls = gr.Dropdown(names, value=names[0], label="class")
            seed = gr.Number(value=0, precision=0, label="seed")
            n = gr.Slider(1, MAX_SAMPLES, value=4, step=1, label="samples")
        steps, cfgs, solvers = [], [], []
        for k, s in enumerate(cfg.scales):
            with gr.Row():
                what = "base" if k == 0 else "residual"
                steps.append(gr.Slider(1, max(2 * s.steps, 100), value=s.steps, step=1,
                                       label=f"scale {k} ({what}, {cfg.latent_sizes[k]}px latent): steps"))
                cfgs.append(gr.Slider(1.0, 8.0, value=s.cfg_scale, step=0.1, label=f"scale {k}: guidance"))
                solvers.append(gr.Dropdown(list(SOLVERS), value=s.solver, label=f"scale {k}: solver"))
        button = gr.Button("Generate", variant="primary")
        timing = gr.Markdown()
        with gr.Row():
            outputs = [gr.Image(label=t, type="pil", format="png") for t in stages]
        button.click(run, [cls, seed, n, *steps, *cfgs, *solvers], [*outputs, timing], api_name="generate")
    return app


def stage_titles(num_scales: int) -> list[str]:
    """The stages :func:`msf.scale_view.view_columns` gives a ``num_scales`` model, in its order."""
    if num_scales == 1:
        return ["image"]
    adds = [f"scale {k} adds (stretched)" for k in range(1, num_scales)]
    return ["base", "base, upsampled", *adds, "image"]


def serve(model: str | Path, host: str = "127.0.0.1", port: int | None = None, device: str | None = None,
          block: bool = True, weights: str = "ema"):
    """Load ``model`` (anything :func:`msf.load.load_pipeline` takes) and serve its page."""
    from msf.distributed import init_world
    from msf.load import load_pipeline

    pipe = load_pipeline(model, weights, device=init_world(device).device)
    app = build_app(pipe, title=f"msf app: {model}")
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, share=False,
               show_error=True)
    return app
