"""Issue 21, item 5: where MSF's quality comes from and goes, from the emoji comparison's own models.

For each MSF run of a finished `msf compare` (studies/compare_emoji.sh) at one budget, the same
sample count of each of these is scored against one half of the real images (B); the other half (A)
gives the real bases:

    full                  the model's samples at its default sampler (the comparison's own set)
    base only             its bases, upsampled: D(up(c_0)), nothing from the residual
    true base + residual  the bases of real images (A), the residual sampled on them (given={0: c_0})
    true base only        the real bases of A upsampled: all a perfect base model could give alone
    real (floor)          the real images of A themselves

and the K = 1 DiT's samples as the baseline. FID and KID with bootstrap intervals, precision and
recall, class accuracy (its classifier learned from all real images, A included: the two "true base"
rows are flattered by it). The exposure gap is what the residual adds on a true base against what it
adds on a generated one. Also the per-scale training losses of every run (losses.json) against step.

    .venv/bin/python studies/why_emoji.py --compare runs/compare_emoji --budget 5 --out docs/compare_emoji

Writes <out>/why.json, why.md and why_losses.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from msf.evaluation.intervals import seed_interval
from msf.evaluation.metrics import evaluate, load_feature_extractor
from msf.interfaces.viz import save_figure
from msf.method.factorize import up
from msf.method.pipeline import MSFPipeline
from msf.training.data import to_model_range, to_uint8

MSF_PRESETS = ("demo", "demo-paper-ratio")
ROWS = ("full", "base only", "true base + residual", "true base only", "real (floor)")


def _split(ref: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    with np.load(ref) as d:
        images, labels = d["arr_0"], d["arr_1"]
    perm = np.random.default_rng(seed).permutation(len(images))
    a, b = perm[: len(perm) // 2], perm[len(perm) // 2:]
    return images[a], labels[a], images[b], labels[b]


@torch.no_grad()
def _base_only(pipe: MSFPipeline, labels: np.ndarray, seed: int) -> np.ndarray:
    _, comps = pipe.sample(torch.from_numpy(labels), seed=seed, precision="bf16", batch_size=128,
                           return_components=True)
    return to_uint8(pipe.autoencoder.decode(up(comps[0], comps[-1].shape[-1]))).numpy()


@torch.no_grad()
def _on_true_bases(pipe: MSFPipeline, images: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    comps = pipe.components(to_model_range(torch.from_numpy(images)))
    out = pipe.sample(torch.from_numpy(labels), seed=seed, precision="bf16", batch_size=128,
                      given={0: comps[0]})
    return to_uint8(out).numpy()


def _true_base_only(pipe: MSFPipeline, images: np.ndarray) -> np.ndarray:
    comps = pipe.components(to_model_range(torch.from_numpy(images)))
    return to_uint8(pipe.autoencoder.decode(up(comps[0], comps[-1].shape[-1]))).numpy()


def _score(images: np.ndarray, labels: np.ndarray, ref_file: Path, extractor, work: Path, name: str) -> dict:
    path = work / f"{name}.npz"
    np.savez(path, arr_0=images, arr_1=labels)
    r = evaluate(str(path), str(ref_file), metrics=("fid", "kid", "pr", "cas"), extractor=extractor,
                 class_data="emoji", bootstraps=100, floor=False, progress=False)
    cas = r.get("cas") or {}
    return {"fid": r["fid"], "fid_ci": r.get("fid_ci"), "kid": r["kid"], "kid_ci": r.get("kid_ci"),
            "precision": r.get("precision"), "recall": r.get("recall"), "cas": cas.get("accuracy"),
            "cas_ci": r.get("cas_ci"), "cas_per_class": cas.get("per_class"), "n": len(images)}


def losses_plot(compare: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = sorted(p.name for p in (compare / "runs").iterdir())
    fig, axes = plt.subplots(1, len(presets), figsize=(4.2 * len(presets), 3.2), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], presets):
        for run in sorted((compare / "runs" / p).glob("seed*/train/losses.json")):
            hist = json.loads(run.read_text())
            for k, pts in sorted(hist.items()):
                if pts:
                    s, v = zip(*pts)
                    ax.plot(s, v, color=f"C{k}", alpha=0.6, lw=1,
                            label=f"scale {k}" if run.parent.parent.name == "seed0" else None)
        ax.set_title(p, fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss (per scale, every seed)")
    return save_figure(fig, out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--compare", default="runs/compare_emoji")
    p.add_argument("--budget", default="5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="docs/compare_emoji")
    args = p.parse_args()
    compare, out = Path(args.compare), Path(args.out)
    work = compare / "why"
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / f"why_{args.budget}min.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    a_img, a_lab, b_img, b_lab = _split(compare / "reference.npz")
    ref_b = work / "reference_half.npz"
    np.savez(ref_b, arr_0=b_img, arr_1=b_lab)
    n = len(a_img)
    extractor = load_feature_extractor(None, "cpu", "bf16")

    def done(key: str, fn) -> dict:
        if key not in results:
            results[key] = fn()
            results_file.write_text(json.dumps(results, indent=1))
            print(key, {k: v for k, v in results[key].items() if k in ("fid", "kid", "cas")}, flush=True)
        return results[key]

    done("real (floor)", lambda: _score(a_img, a_lab, ref_b, extractor, work, "real"))
    for preset in ("dit-demo", *MSF_PRESETS):
        for seed in map(int, args.seeds.split(",")):
            run = compare / "runs" / preset / f"seed{seed}" / f"{args.budget}min"
            if not (run / "run.json").is_file():
                continue
            with np.load(run / "samples.npz") as d:
                full, full_lab = d["arr_0"][:n], d["arr_1"][:n]
            done(f"{preset}/seed{seed}/full", lambda: _score(full, full_lab, ref_b, extractor, work, "full"))
            if preset not in MSF_PRESETS:
                continue
            pipe = MSFPipeline.from_pretrained(run / "model")
            done(f"{preset}/seed{seed}/base only",
                 lambda: _score(_base_only(pipe, full_lab, seed), full_lab, ref_b, extractor, work, "base"))
            done(f"{preset}/seed{seed}/true base + residual",
                 lambda: _score(_on_true_bases(pipe, a_img, a_lab, seed), a_lab, ref_b, extractor, work,
                                "tb"))
            done(f"{preset}/true base only",
                 lambda: _score(_true_base_only(pipe, a_img), a_lab, ref_b, extractor, work, "tbo"))

    out.mkdir(parents=True, exist_ok=True)
    (out / f"why_{args.budget}min.json").write_text(json.dumps(results, indent=1))
    (out / f"why_{args.budget}min.md").write_text(table(results, args.budget, n, len(b_img)))
    losses_plot(compare, out / "why_losses.png")
    print((out / f"why_{args.budget}min.md").read_text())


def _mean(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        ci = rows[0].get(f"{key}_ci")
        return f"{vals[0]:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")
    i = seed_interval(vals)
    return f"{i.value:.4g} [{i.low:.4g}, {i.high:.4g}]"


def table(results: dict, budget: str, n: int, n_ref: int) -> str:
    lines = [f"# Why: the emoji comparison's models at {budget} minutes, taken apart", "",
             f"{n} images per row against {n_ref} held-out real images; 95% intervals over seeds "
             "(Student t) where there are several, else bootstrap over samples.", "",
             "| model | row | seeds | FID | KID | precision | recall | class accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for key, r in results.items():
        parts = key.split("/")
        model, row = (parts[0], parts[-1]) if len(parts) > 1 else ("real", parts[0])
        groups.setdefault((model, row), []).append(r)
    for (model, row), rows in groups.items():
        lines.append(f"| {model} | {row} | {len(rows)} | {_mean(rows, 'fid')} | {_mean(rows, 'kid')} | "
                     f"{_mean(rows, 'precision')} | {_mean(rows, 'recall')} | {_mean(rows, 'cas')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
