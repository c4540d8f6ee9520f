"""Sweeps over per-scale sampling settings: the paper's Tables 2-5.

Tables 2 and 3 vary the CFG scale of scale 1 and of scale 2, Tables 4 and 5 the
steps, each with the other settings at the model's defaults. A sweep here varies one
setting (``cfg_scale``, ``steps``, or ``prior_level`` for a model trained with conditioning augmentation)
of one scale over a list of values, draws a sample
set per value, evaluates it against a reference, and writes ``sweep.csv``,
``sweep.md`` and ``sweep.png``. Sample sets stay in ``<out>/samples/``; re-running the
sweep reuses finished ones, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from msf.config import SamplerSettings, evaluations
from msf.evaluation.sample_set import sample_set
from msf.interfaces.viz import save_figure
from msf.training.distributed import World, barrier

if TYPE_CHECKING:
    from msf.method.pipeline import MSFPipeline

SETTINGS = {"cfg_scale": "cfg", "steps": "steps", "prior_level": "prior level"}  # what a sweep varies
COLUMNS = ["scale", "setting", "value", "steps", "cfg_scale", "prior_level", "nfe_per_image", "fid", "fid_ci",
           "is", "precision", "recall", "kid", "kid_ci", "cas", "cas_ci", "cas_per_class",
           "seconds_per_image", "num_samples", "feature_network"]


def sweep_points(pipe: MSFPipeline, scale: int, setting: str, values: list) -> list[dict]:
    """One sampling setting per value: ``setting`` of ``scale`` varied, the rest at defaults."""
    cfg = pipe.config
    if not 0 <= scale < cfg.num_scales:
        raise ValueError(f"--scale {scale}: this model has scales 0..{cfg.num_scales - 1}")
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {tuple(SETTINGS)}, got {setting!r}")
    points = []
    for v in values:
        point = {"steps": [s.steps for s in cfg.scales], "cfg_scale": [s.cfg_scale for s in cfg.scales],
                 "prior_level": [s.prior_level for s in cfg.scales]}
        point[setting][scale] = v
        SamplerSettings.of(cfg, **point)  # every value checked before any sampling
        points.append({"scale": scale, "setting": setting, "value": v, **point})
    return points


def nfe_per_image(steps: list[int], cfg_scale: list[float]) -> int:
    """Network evaluations per image: CFG doubles a scale's batch, except at scale 1.0."""
    return sum(evaluations(s, c) for s, c in zip(steps, cfg_scale))


def run_sweep(
    pipe: MSFPipeline,
    ref: str,
    points: list[dict],
    out_dir: str | os.PathLike,
    *,
    num_samples: int = 5000,
    batch_size: int = 64,
    seed: int = 0,
    precision: str = "auto",
    tf32: bool = True,
    compile: bool = False,
    metrics: tuple[str, ...] = ("fid", "is", "pr"),
    bootstraps: int = 200,
    class_data: str | None = None,
    weights: str | None = None,
    cache_dir: str | None = None,
    feature_precision: str = "fp32",
    world: World | None = None,
    progress: bool = True,
    model: str | None = None,
    extractor=None,
) -> list[dict]:
    """Sample and evaluate every point; write the tables and the plot (on rank 0).

    FID and KID carry 95% bootstrap intervals over the samples (``bootstraps`` redraws; 0: none), and
    ``"cas"`` in ``metrics`` adds the class accuracy, overall with its interval and per class, by a
    classifier trained on ``class_data`` (default ``ref``): a guidance sweep trades the two. ``extractor``:
    a feature network already loaded (several sweeps share one), else ``weights`` is loaded."""
    from msf.evaluation.reference import check_reference

    check_reference(ref)  # before the sample sets, which take minutes
    world = world or World(device=pipe.device)
    out_dir = Path(out_dir)
    rows = []
    for p in points:
        name = f"scale{p['scale']}_{p['setting']}_{p['value']}"
        path = out_dir / "samples" / f"{name}.npz"
        # a set finished by an earlier run with the same settings and weights is reused; one drawn
        # with other weights (the model retrained) is the sweep's own file, drawn again
        res = sample_set(pipe, path, num_samples, batch_size=batch_size, steps=p["steps"],
                         cfg_scale=p["cfg_scale"], prior_level=p.get("prior_level"), seed=seed,
                         precision=precision, compile=compile, tf32=tf32,
                         world=world, progress=progress, meta={"model": model}, overwrite=True)
        # wall-clock per image over all processes; unknown after a resume or reuse
        seconds = res.seconds / num_samples if res.resumed == 0 else math.nan
        barrier(world)
        if not world.is_main:
            continue
        from msf.evaluation.metrics import evaluate, load_feature_extractor

        if extractor is None:
            extractor = load_feature_extractor(weights, device=pipe.device, precision=feature_precision)
        r = evaluate(str(path), ref, metrics=metrics, device=str(pipe.device), cache_dir=cache_dir,
                     progress=progress, extractor=extractor, bootstraps=bootstraps, floor=False,
                     class_data=class_data)
        for skip in r["skipped"]:
            print(f"[sweep] {name}: no {skip['metric']}: {skip['reason']}")
        cas = r.get("cas") or {}
        rows.append({
            **p, "nfe_per_image": SamplerSettings.of(pipe.config, p["steps"], p["cfg_scale"]).evaluations,
            "fid": r.get("fid"), "fid_ci": r.get("fid_ci"), "is": r.get("is"), "kid": r.get("kid"),
            "kid_ci": r.get("kid_ci"), "precision": r.get("precision"), "recall": r.get("recall"),
            "cas": cas.get("accuracy"), "cas_ci": r.get("cas_ci"), "cas_per_class": cas.get("per_class"),
            "seconds_per_image": seconds, "num_samples": num_samples,
            "feature_network": r.get("feature_network"),
        })
        write_tables(rows, out_dir)
    if world.is_main and rows:
        sweep_plot(rows, out_dir / "sweep.png")
        cost_plot(rows, out_dir / "sweep_cost.png")
        sweep_strips(rows, out_dir, pipe.config.class_names)
    return rows


def sweep_strips(rows: list[dict], out_dir: str | os.PathLike, class_names: list[str] | None = None,
                 classes: int = 8) -> Path:
    """``sweep_strips.png``: the same sample (same seed, same class) under every swept value, one row
    per class (the first sample of up to ``classes`` classes), one column per value."""
    import numpy as np
    import torch

    from msf.interfaces.viz import save_png, table_figure

    out_dir = Path(out_dir)
    sets = []
    for r in rows:
        with np.load(out_dir / "samples" / f"scale{r['scale']}_{r['setting']}_{r['value']}.npz") as f:
            sets.append((f["arr_0"], f["arr_1"]))
    labels = sets[0][1]
    _, first = np.unique(labels, return_index=True)
    picks = sorted(first)[:classes]
    cells = [[torch.from_numpy(images[i]) for images, _ in sets] for i in picks]
    setting = SETTINGS[rows[0]["setting"]]
    titles = [f"{setting} {_fmt(r['value'])}: {r['nfe_per_image']} evals" for r in rows]
    names = [class_names[labels[i]] if class_names else f"class {labels[i]}" for i in picks]
    caption = f"scale {rows[0]['scale']}'s {setting} varied; each row one seed and class"
    img = table_figure(cells, titles, names, upscale=max(1, 96 // sets[0][0].shape[1]), caption=caption)
    return save_png(img, out_dir / "sweep_strips.png", {"rows": [
        {k: r.get(k) for k in ("scale", "setting", "value", "steps", "cfg_scale", "prior_level")}
        for r in rows]})


def cost_plot(rows: list[dict], path: str | os.PathLike) -> Path:
    """The paper's speed/quality picture: FID against network evaluations and seconds per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid = [r.get("fid") if r.get("fid") is not None else math.nan for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), squeeze=False)
    for ax, key, label in ((axes[0][0], "nfe_per_image", "network evaluations per image"),
                           (axes[0][1], "seconds_per_image", "seconds per image (this machine)")):
        xs = [r.get(key) if r.get(key) is not None else math.nan for r in rows]
        ax.plot(xs, fid, "o")
        for x, y, r in zip(xs, fid, rows):
            ax.annotate(_fmt(r["value"]), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("FID-" + _k(rows[0]["num_samples"]))
        ax.grid(alpha=0.3)
    fig.suptitle(f"scale {rows[0]['scale']}: {rows[0]['setting']} swept (labels: its values)", fontsize=9)
    return save_figure(fig, path)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "/".join(_fmt(x) for x in v)
    return str(v)


def write_tables(rows: list[dict], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``sweep.csv`` (all columns) and ``sweep.md`` (a table like the paper's)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "sweep.csv", out_dir / "sweep.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(r[k]) if isinstance(r.get(k), (list, dict)) else r.get(k)
                        for k in COLUMNS})
    measured = [k for k in ("fid", "is", "kid", "precision", "recall", "cas")
                if any(r.get(k) is not None for r in rows)]  # the metrics asked for
    shown = ["setting", "value", "steps", "cfg_scale", "nfe_per_image", *measured, "seconds_per_image"]
    first = rows[0]
    intervals = any(r.get(f"{k}_ci") for r in rows for k in ("fid", "kid", "cas"))
    lines = [f"Sweep of scale {first['scale']} ({len(rows)} settings, {first['num_samples']} samples each, "
             f"features: {first['feature_network']})" + ("; [95% intervals]: bootstrap over the samples "
                                                        "(FID, KID), Wilson's (cas)" if intervals else ""),
             "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) + _interval(r.get(f"{k}_ci")) for k in shown) + " |"
              for r in rows]
    names = next((list(r["cas_per_class"]) for r in rows if r.get("cas_per_class")), None)
    if names:  # which classes the swept setting helps, and which it costs
        lines += ["", "Class accuracy per class:", "",
                  "| value | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {_fmt(r['value'])} | " + " | ".join(f"{r['cas_per_class'][c]:.2f}" for c in names)
                  + " |" for r in rows if r.get("cas_per_class")]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _interval(ci) -> str:
    return f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""


def sweep_plot(rows: list[dict], path: str | os.PathLike) -> Path:
    """FID (and IS and class accuracy where measured) against the swept value, with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["value"] for r in rows]
    keys = ["fid"] + [k for k in ("is", "cas") if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(0.5 + 4 * len(keys), 3.2), squeeze=False)
    label = {"cfg_scale": "CFG scale", "steps": "steps", "prior_level": "prior level"}[rows[0]["setting"]]
    for ax, key in zip(axes[0], keys):
        ys = [r.get(key) if r.get(key) is not None else math.nan for r in rows]
        ax.plot(xs, ys, "o-")
        if any(r.get(f"{key}_ci") for r in rows):
            ax.fill_between(xs, [r[f"{key}_ci"][0] if r.get(f"{key}_ci") else y for r, y in zip(rows, ys)],
                            [r[f"{key}_ci"][1] if r.get(f"{key}_ci") else y for r, y in zip(rows, ys)],
                            alpha=0.25, label="95% interval")
            ax.legend(fontsize=7)
        ax.set_xlabel(f"{label} of scale {rows[0]['scale']}")
        ax.set_ylabel({"fid": "FID-" + _k(rows[0]["num_samples"]), "is": "IS", "cas": "class accuracy"}[key])
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _k(n: int) -> str:
    return f"{n // 1000}K" if n % 1000 == 0 else str(n)
