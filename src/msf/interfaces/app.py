"""``msf app MODEL``: a local web page to sample a model and see what each scale generated.

Pick a class, a seed, the number of samples and, per scale, the steps, the guidance, the
solver, the time grid's shift and the interval of times that are guided (or one of the model's
named settings, such as ``paper``, which fills them in); the page shows the base, the base
upsampled, what each later scale adds and the image, side by side, one row per sample, with the
seconds each scale took. Built with Gradio (``pip install gradio``); it serves on 127.0.0.1 only
unless told otherwise, and calls no outside host.
The same function answers the page and Gradio's HTTP API (``/generate``), which the tests drive.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from msf.config import ConfigError, SamplerSettings
from msf.interfaces.scale_view import view_columns, view_scales
from msf.method.sampler import MEANFLOW_STEPS, solvers_for

if TYPE_CHECKING:
    import gradio as gr

    from msf.method.pipeline import MSFPipeline

MAX_SAMPLES = 8


def _strip(cells: np.ndarray, upscale: int, pad: int = 2) -> Image.Image:
    """uint8 (n, H, W, 3) -> one column of the n images, white gaps, nearest-neighbour upscaled."""
    n, h, w, _ = cells.shape
    canvas = np.full((n * (h + pad) - pad, w, 3), 255, np.uint8)
    for i in range(n):
        canvas[i * (h + pad): i * (h + pad) + h] = cells[i]
    img = Image.fromarray(canvas)
    return img.resize((w * upscale, img.height * upscale), Image.Resampling.NEAREST)


def generate(pipe: MSFPipeline, class_index: int, seed: int, num_samples: int, steps: list[int],
             cfg_scale: list[float], solver: list[str], precision: str = "auto", upscale: int = 4,
             shift: list[float] | None = None,
             guidance_interval: list[tuple[float, float]] | None = None) -> tuple[list[Image.Image], str]:
    """One column image per stage (base, base upsampled, each addition, image) and a timing line.
    ``shift`` and ``guidance_interval`` (one per scale) default to the model's own."""
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise ConfigError(f"samples: {num_samples} must be in 1..{MAX_SAMPLES}")
    settings = SamplerSettings.of(pipe.config, steps, cfg_scale, solver, shift=shift,
                                  guidance_interval=guidance_interval)
    view = view_scales(pipe, [class_index] * num_samples, seed=seed, settings=settings, precision=precision)
    columns = [_strip(cells.numpy(), upscale) for _, cells in view_columns(view)]

    def described(k: int) -> str:
        words = [f"{settings.steps[k]} steps {settings.solver[k]}", f"cfg {settings.cfg_scale[k]:g}"]
        if settings.shift[k] != 1:
            words.append(f"shift {settings.shift[k]:g}")
        if settings.guidance_interval[k] != (0.0, 1.0):
            words.append("guided at t in [{:g}, {:g}]".format(*settings.guidance_interval[k]))
        return ", ".join(words)

    timing = " · ".join(f"scale {k}: {s:.2f} s ({described(k)})" for k, s in enumerate(view.seconds))
    total = f"decode: {view.decode_seconds:.2f} s · {settings.evaluations} evaluations/image"
    return columns, f"{timing} · {total}"


def build_app(pipe: MSFPipeline, title: str = "msf") -> gr.Blocks:
    """The Gradio page for ``pipe`` (an :class:`msf.method.pipeline.MSFPipeline`)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls to outside hosts
    try:
        import gradio as gr
    except ImportError:
        raise ConfigError("msf app needs Gradio: pip install gradio (or pip install 'msf[app]')") from None

    cfg = pipe.config
    names = cfg.class_names or [f"class {c}" for c in range(cfg.num_classes)]
    stages = stage_titles(cfg.num_scales)

    # named settings (default, paper, ...) fill the per-scale controls
    named = {"default": SamplerSettings.named(cfg)}
    for name in ("paper", *cfg.samplers):
        try:
            named[name] = SamplerSettings.named(cfg, name)
        except ConfigError:  # a model that names no paper settings and does not sample as the paper
            pass

    def run(class_name, seed, num_samples, *per_scale):
        k = cfg.num_scales
        steps, cfgs, solvers, shifts, g_from, g_to = (per_scale[i * k: (i + 1) * k] for i in range(6))
        columns, timing = generate(pipe, names.index(class_name), int(seed), int(num_samples),
                                   [int(s) for s in steps], [float(w) for w in cfgs], list(solvers),
                                   shift=[float(v) for v in shifts],
                                   guidance_interval=[(float(a), float(b)) for a, b in zip(g_from, g_to)])
        return (*columns, timing)

    def fill(name):
        s = named[name]
        return (*s.steps, *s.cfg_scale, *s.solver, *s.shift, *(g[0] for g in s.guidance_interval),
                *(g[1] for g in s.guidance_interval))

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}\nMSF samples the base, then each residual given the scales before it "
                    "(Algorithm 3). Each column shows one stage; each row one sample.")
        with gr.Row():
            cls = gr.Dropdown(names, value=names[0], label="class")
            seed = gr.Number(value=0, precision=0, label="seed")
            n = gr.Slider(1, MAX_SAMPLES, value=4, step=1, label="samples")
            preset_box = gr.Dropdown(list(named), value="default", label="sampler settings")
        steps, cfgs, solvers, shifts, g_from, g_to = [], [], [], [], [], []
        for k, s in enumerate(cfg.scales):
            with gr.Row():
                what = "base" if k == 0 else "residual"
                most = max(2 * max(ns.steps[k] for ns in named.values()), 100)
                most = MEANFLOW_STEPS[1] if s.objective == "meanflow" else most
                steps.append(gr.Slider(1, most, value=s.steps, step=1,
                                       label=f"scale {k} ({what}, {cfg.latent_sizes[k]}px latent): steps"))
                cfgs.append(gr.Slider(1.0, 8.0, value=s.cfg_scale, step=0.1, label=f"scale {k}: guidance"))
                solvers.append(gr.Dropdown(list(solvers_for(s.objective)), value=s.solver,
                                           label=f"scale {k}: solver"))
                shifts.append(gr.Slider(0.25, 6.0, value=s.shift, step=0.05,
                                        label=f"scale {k}: shift (> 1: more steps near the noise)"))
                g_from.append(gr.Slider(0.0, 1.0, value=s.guidance_interval[0], step=0.05,
                                        label=f"scale {k}: guide from t (0 data)"))
                g_to.append(gr.Slider(0.0, 1.0, value=s.guidance_interval[1], step=0.05,
                                      label=f"scale {k}: guide to t (1 noise)"))
        controls = [*steps, *cfgs, *solvers, *shifts, *g_from, *g_to]
        preset_box.change(fill, [preset_box], controls)
        button = gr.Button("Generate", variant="primary")
        timing = gr.Markdown()
        with gr.Row():
            outputs = [gr.Image(label=t, type="pil", format="png") for t in stages]
        button.click(run, [cls, seed, n, *controls], [*outputs, timing], api_name="generate")
    return app


def stage_titles(num_scales: int) -> list[str]:
    """The stages :func:`.scale_view.view_columns` gives a ``num_scales`` model, in its order."""
    if num_scales == 1:
        return ["image"]
    adds = [f"scale {k} adds (stretched)" for k in range(1, num_scales)]
    return ["base", "base, upsampled", *adds, "image"]


def serve(model: str | Path, host: str = "127.0.0.1", port: int | None = None, device: str | None = None,
          block: bool = True, weights: str = "ema") -> gr.Blocks:
    """Load ``model`` (anything :func:`msf.interfaces.load.load_pipeline` takes) and serve its page."""
    from msf.interfaces.load import load_with_source
    from msf.training.distributed import init_world

    pipe, loaded = load_with_source(model, weights, device=init_world(device).device)
    print(f"msf app: loaded {loaded.describe()}", flush=True)
    app = build_app(pipe, title=f"msf app: {model}")
    # quiet: Gradio's own lines end with "set `share=True`", which msf app does not offer (--host does that
    # job); the address is said here instead
    app.launch(server_name=host, server_port=port, prevent_thread_lock=True, share=False, show_error=True,
               quiet=True)
    print(f"msf app: serving {model} at {app.local_url}" + (" (Ctrl-C to stop)" if block else ""),
          flush=True)
    if block:
        app.block_thread()
    return app
