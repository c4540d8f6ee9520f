"""Upload a model to the Hugging Face Hub, with a model card.

:func:`push_to_hub` uploads a model directory (or a pipeline, saved first) with a generated model card
(``README.md``): the recipe, the training steps, the metrics of ``metrics.json`` (what
``msf eval --json`` writes, or a list of such results, each with an optional ``"name"``) and a
sample grid, ``samples.png``. Hub ids and downloads are :mod:`msf.interfaces.hub_download`'s.

``huggingface_hub`` is optional (``pip install 'msf[hub]'``): it is imported here, when needed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msf.interfaces.hub_download import import_huggingface_hub, offline
from msf.interfaces.pretrained import model_path
from msf.method.model_dir import ModelDirError
from msf.method.pipeline import MSFPipeline, load_model_config

METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.png"
TAGS = ["msf", "diffusion", "image-generation", "class-conditional"]
GRID_MAX_CLASSES = 10  # a sample grid of a 1000-class model shows this many classes, evenly spaced


# ------------------------------------------------------------------------------------------- upload


def push_to_hub(
    model: str | os.PathLike | MSFPipeline,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    api: Any = None,
    commit_message: str = "Upload msf model",
    samples: str | os.PathLike | None = None,
    classes: Sequence[int] | None = None,
    per_class: int = 4,
    seed: int = 0,
    device: str | None = None,
    license: str = "mit",
) -> Any:
    """Upload ``model`` to the Hub repo ``repo_id`` (created if need be; ``revision``: a branch,
    created if need be) with a model card and a sample grid; returns ``upload_folder``'s answer.

    ``model`` is a model directory (or a shipped name or Hub id), or a pipeline, saved first.

    The grid is ``samples`` (an existing image) or, by default, ``per_class`` samples of each of
    ``classes`` (all, or up to :data:`GRID_MAX_CLASSES` evenly spaced) drawn with the model's own
    sampler settings on ``device``. ``api`` replaces ``huggingface_hub.HfApi(token=token)``.
    """
    if isinstance(model, MSFPipeline):
        with tempfile.TemporaryDirectory(prefix="msf-save-") as tmp:
            return push_to_hub(model.save_pretrained(tmp), repo_id, revision=revision, private=private,
                               token=token, api=api, commit_message=commit_message, samples=samples,
                               classes=classes, per_class=per_class, seed=seed, device=device,
                               license=license)
    # everything that can fail without the network fails here, before minutes of sampling
    if api is None:
        if offline():
            raise ValueError(f"{repo_id}: uploading needs the network, and HF_HUB_OFFLINE=1 forbids it; "
                             "set HF_HUB_OFFLINE=0")
        api = import_huggingface_hub("msf.interfaces.hub.push_to_hub").HfApi(token=token)
    source = model_path(model)
    config = load_model_config(source)
    meta = json.loads((source / "config.json").read_text())
    metrics = read_metrics(source / METRICS_FILE)
    with tempfile.TemporaryDirectory(prefix="msf-push-") as tmp:
        stage = Path(tmp)
        weights = [f"scale_{k}.safetensors" for k in range(config.num_scales)]
        for name in ["config.json", *weights, METRICS_FILE]:
            if (source / name).is_file():
                _link_or_copy(source / name, stage / name)
            elif name != METRICS_FILE:
                raise ModelDirError(f"{source / name}: missing (the config has {config.num_scales} scales)")
        if samples is not None:
            shutil.copyfile(samples, stage / SAMPLES_FILE)
            grid_note = "Samples supplied with the upload."
        else:
            grid_note = sample_grid(source, stage / SAMPLES_FILE, classes=classes, per_class=per_class,
                                    seed=seed, device=device)
        card = model_card(meta, repo_id, metrics=metrics, samples_note=grid_note, license=license)
        (stage / "README.md").write_text(card, encoding="utf-8")
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        # delete_patterns: a model pushed again with fewer scales leaves no stale weights behind
        return api.upload_folder(repo_id=repo_id, folder_path=str(stage), repo_type="model",
                                 revision=revision, commit_message=commit_message,
                                 delete_patterns=["scale_*.safetensors"])


def _link_or_copy(src: Path, dst: Path) -> None:
    # weights can be gigabytes: a symlink (followed by the upload) spares a copy where links work
    try:
        dst.symlink_to(src.resolve())
    except OSError:
        shutil.copy2(src, dst)


def sample_grid(
    model_dir: str | os.PathLike, path: str | os.PathLike, *, classes: Sequence[int] | None = None,
    per_class: int = 4, seed: int = 0, device: str | None = None,
) -> str:
    """Draw ``per_class`` samples of each class into a labelled grid at ``path``; returns its caption."""
    import torch

    from msf.config import SamplerSettings
    from msf.interfaces.viz import save_sample_grid

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = MSFPipeline.from_pretrained(model_dir, device=device)
    cfg = pipe.config
    if classes is None:
        n = min(cfg.num_classes, GRID_MAX_CLASSES)
        classes = [i * cfg.num_classes // n for i in range(n)]
    labels = [c for c in classes for _ in range(per_class)]
    settings = SamplerSettings.of(cfg)
    images = pipe.sample(labels, settings=settings, seed=seed)
    caption = f"seed {seed}  {settings.describe()}"
    save_sample_grid(images, labels, cfg.class_names, path, caption=caption,
                     meta={"seed": seed, "labels": labels, **settings.to_dict()})
    return (f"{per_class} samples per class for classes {', '.join(map(str, classes))}, seed {seed}, the "
            f"model's own sampler settings: {settings.describe()}.")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The evaluations in ``metrics.json``: one ``msf eval --json`` result or a list of them; [] if absent."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{path}: not valid JSON ({e})") from None
    entries = data if isinstance(data, list) else [data]
    if not all(isinstance(e, dict) for e in entries):
        raise ModelDirError(f"{path}: must hold an `msf eval --json` result or a list of them")
    return entries


# ---------------------------------------------------------------------------------------- model card

_METRIC_ROWS = [("fid", "FID", ".3f"), ("kid", "KID", ".5f"), ("is", "Inception Score", ".2f"),
                ("precision", "precision", ".3f"), ("recall", "recall", ".3f")]


def model_card(meta: dict, repo_id: str, *, metrics: Sequence[dict] = (), samples_note: str | None = None,
               license: str = "mit") -> str:
    """The README.md of a Hub model: YAML front matter, usage, samples, recipe, training and metrics."""
    from msf.config import ModelConfig, from_dict
    from msf.interfaces.info import format_info, model_info

    model = from_dict(ModelConfig, meta["model"], "model")
    info = model_info(model, repo_id)
    lines = ["---", "library_name: msf", f"license: {license}", "tags:", *(f"- {t}" for t in TAGS), "---", "",
             f"# {repo_id}", "",
             f"A class-conditional [MSF](https://arxiv.org/abs/2501.13349) diffusion model "
             f"(multi-scale latent factorization: one DiT per scale, each adding the detail its scale "
             f"holds): {model.num_scales} scale(s), {model.num_classes} classes, "
             f"{model.image_size} x {model.image_size} images, {info['parameters'] / 1e6:,.2f}M parameters.",
             "", "## Use", "", "```python", "from msf import MSFPipeline", "",
             f'pipe = MSFPipeline.from_pretrained("{repo_id}")',
             "images = pipe.sample([0, 1, 2], seed=0)  # (3, 3, H, W) in [-1, 1]", "```", "",
             f"or `msf sample {repo_id} --classes 0,1,2 --out grid.png` (`pip install 'msf[hub]'`).", ""]
    if samples_note is not None:
        lines += ["## Samples", "", f"![samples]({SAMPLES_FILE})", "", samples_note, ""]
    names = model.class_names or [f"class {i}" for i in range(model.num_classes)]
    lines += ["## Recipe", "", format_info(info), "",
              "Classes: " + ", ".join(f"{i} {n}" for i, n in enumerate(names[:GRID_MAX_CLASSES * 3]))
              + (", ..." if len(names) > GRID_MAX_CLASSES * 3 else "") + ".", "",
              *_details("model config (config.json's \"model\")", meta["model"]), ""]
    lines += ["## Training", "", *_training(meta.get("train"), model.num_scales), ""]
    lines += ["## Metrics", "", *_metrics(metrics), ""]
    return "\n".join(lines)


def _details(summary: str, data: dict) -> list[str]:
    return ["<details>", f"<summary>{summary}</summary>", "", "```json", json.dumps(data, indent=2), "```",
            "", "</details>"]


def _training(train: dict | None, num_scales: int) -> list[str]:
    if not isinstance(train, dict):
        return ["config.json holds no training record (no \"train\" entry): the recipe above is all "
                "there is."]
    steps = train.get("scale_steps") or [train.get("steps", "?")] * num_scales
    out = [f"- optimizer steps per scale: {', '.join(map(str, steps))}",
           f"- batch {train.get('batch_size', '?')}, learning rate {train.get('lr', '?')} "
           f"({train.get('lr_schedule', 'constant')} after {train.get('warmup_steps', 0)} warm-up steps), "
           f"EMA decay {train.get('ema_decay', '?')}, class dropout {train.get('class_dropout', '?')}, "
           f"time sampler {train.get('time_sampler', '?')}, precision {train.get('precision', '?')}",
           f"- data: {train.get('data', '?')}; seed {train.get('seed', '?')}"]
    if train.get("init_from"):
        out.append(f"- fine-tuned: every scale started from the weights of {train['init_from']}")
    if str(train.get("scale", "all")) != "all":
        out.append(f"- this run trained scale {train['scale']} only; the other scales' weights came from "
                   f"{train.get('other_scales_from') or train.get('init_from') or 'another run'}")
    return [*out, "", *_details("train config (config.json's \"train\")", train)]


def _metrics(entries: Sequence[dict]) -> list[str]:
    if not entries:
        return [f"None recorded: `msf eval ... --json {METRICS_FILE}` in the model directory before the "
                "upload puts them here."]
    rows = ["| evaluation | metric | value | samples | reference images |", "|---|---|---|---|---|"]
    networks = []
    for i, e in enumerate(entries):
        name = str(e.get("name", i + 1 if len(entries) > 1 else "-"))
        n, ref = e.get("num_samples", "?"), e.get("num_ref", "?")
        for key, label, fmt in _METRIC_ROWS:
            if key not in e:
                continue
            value = f"{e[key]:{fmt}}"
            if key == "is" and "is_std" in e:
                value += f" ± {e['is_std']:.2f}"
            if f"{key}_ci" in e:
                lo, hi = e[f"{key}_ci"]
                value += f" [{lo:{fmt}}, {hi:{fmt}}]"
            rows.append(f"| {name} | {label} | {value} | {n} | {ref} |")
        if isinstance(e.get("cas"), dict) and "accuracy" in e["cas"]:
            rows.append(f"| {name} | class accuracy | {e['cas']['accuracy']:.3f} | {n} | - |")
        if isinstance(e.get("floor"), dict):
            f = e["floor"]
            rows.append(f"| {name} | FID floor (real against real) | {f.get('fid', float('nan')):.3f} "
                        f"| {f.get('n', '?')} | {f.get('num_ref', '?')} |")
        if e.get("feature_network"):
            sha = str(e.get("weights_sha256", "?"))[:12]
            networks.append(f"{e['feature_network']} (weights sha256 {sha})")
    has_ci = any(k.endswith("_ci") for e in entries for k in e)
    notes = ["", "Bracketed: 95% bootstrap intervals over the samples."] if has_ci else []
    features = ["", "Features: " + "; ".join(dict.fromkeys(networks)) + "."] if networks else []
    return [*rows, *notes, *features]
