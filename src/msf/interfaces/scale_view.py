"""What each scale generated: the base, the base upsampled, each residual's addition, the image.

MSF's sample is ``x = D(up(c_0) + up(c_1) + ...)`` (Algorithm 3). ``view_scales`` samples
and keeps every stage in pixels, with the seconds each scale took; ``scales_figure`` draws
one row per sample. ``msf sample --show-scales`` and ``msf app`` show these.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from msf.config import SamplerSettings
from msf.method.factorize import up
from msf.training.data import to_uint8

if TYPE_CHECKING:
    from msf.method.pipeline import MSFPipeline


@dataclass
class ScaleView:
    labels: list[int]
    images: Tensor  # the samples, (B, 3, H, W) in [-1, 1]
    base: Tensor  # the decoded base D(c_0), at the base's own resolution
    base_up: Tensor  # D(up(c_0)): the base upsampled to the full latent, decoded
    additions: list[Tensor]  # per scale k >= 1: D(sum_{j<=k} up c_j) - D(sum_{j<k} up c_j), in [-2, 2]
    seconds: list[float]  # per scale: its noise, prior and network evaluations
    decode_seconds: float
    settings: SamplerSettings


@torch.no_grad()
def view_scales(
    pipe: MSFPipeline,
    labels: Sequence[int] | Tensor,
    *,
    seed: int = 0,
    settings: SamplerSettings | None = None,
    steps: int | Sequence[int] | None = None,
    cfg_scale: float | Sequence[float] | None = None,
    solver: str | Sequence[str] | None = None,
    precision: str = "fp32",
    nets: Mapping[int, nn.Module] | None = None,
    batch_size: int | None = None,
    callback: Callable[[int, int, int], None] | None = None,
) -> ScaleView:
    """Sample ``labels`` as :meth:`MSFPipeline.sample` does (the same images for the same seed)
    and keep each scale's contribution in pixels."""
    settings = SamplerSettings.of(pipe.config, steps, cfg_scale, solver, base=settings)
    ends: dict[int, float] = {}

    def timed(k: int, done: int, total: int) -> None:
        if done == total:
            ends[k] = time.perf_counter()
        if callback is not None:
            callback(k, done, total)

    start = time.perf_counter()
    images, comps = pipe.sample(labels, settings=settings, seed=seed, precision=precision, nets=nets,
                                batch_size=batch_size, callback=timed, return_components=True)
    decode = pipe.autoencoder.decode
    marks = [start] + [ends[k] for k in range(len(comps))]
    seconds = [b - a for a, b in zip(marks[:-1], marks[1:])]
    n_full = comps[-1].shape[-1]
    partial = [decode(partial_sum(comps[: k + 1], n_full)) for k in range(len(comps) - 1)] + [images]
    return ScaleView(
        labels=[int(y) for y in torch.as_tensor(labels).tolist()],
        images=images,
        base=decode(comps[0]),
        base_up=partial[0],
        additions=[b - a for a, b in zip(partial[:-1], partial[1:])],
        seconds=seconds,
        decode_seconds=time.perf_counter() - marks[-1],
        settings=settings,
    )


def partial_sum(components: Sequence[Tensor], n: int) -> Tensor:
    """``sum_k up(c_k, n)`` over the components given: the accumulator after that many scales."""
    return sum(up(c, n) for c in components)


def view_columns(view: ScaleView) -> list[tuple[str, Tensor]]:
    """The figure's columns as (title, uint8 (B, H, W, 3)) at the images' size; additions are
    stretched around grey per image so that small residuals show."""
    size = view.images.shape[-1]
    cols = []
    if view.additions:
        base = torch.nn.functional.interpolate(view.base, size=(size, size), mode="nearest")
        cols += [(f"base ({view.base.shape[-1]} px)", to_uint8(base)),
                 ("base, upsampled", to_uint8(view.base_up))]
        for k, a in enumerate(view.additions, start=1):
            m = a.flatten(1).abs().amax(1).clamp_min(1e-8)[:, None, None, None]
            cols.append((f"scale {k} adds (stretched)", to_uint8(a / m)))
    cols.append(("image", to_uint8(view.images)))
    return cols


def scales_figure(
    view: ScaleView, path: str | Path, class_names: Sequence[str] | None = None, upscale: int = 3,
    caption: str | None = None,
) -> Path:
    """One row per sample: base | base upsampled | what each later scale adds | the image;
    the seconds per scale written under the columns."""
    from msf.interfaces.viz import save_png, table_figure

    cols = view_columns(view)
    names = [class_names[y] if class_names else f"class {y}" for y in view.labels]
    timing = ", ".join(f"scale {k} {s:.2f}s" for k, s in enumerate(view.seconds))
    text = (f"{view.settings.describe()}; {len(view.labels)} samples: {timing}, "
            f"decode {view.decode_seconds:.2f}s")
    cells = [[col[i] for _, col in cols] for i in range(len(names))]
    img = table_figure(cells, [t for t, _ in cols], names, upscale=upscale,
                       caption="\n".join(filter(None, [text, caption])))
    return save_png(img, path, {"labels": view.labels, "seconds": view.seconds,
                                "settings": view.settings.to_dict()})
