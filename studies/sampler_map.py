"""Issue 17, item 2: quality against sampling cost, per sampler, for MSF (`demo`) and its K = 1 DiT
(`dit-demo`), both trained 15 minutes on the built-in emoji (seed 0 of studies/compare_emoji.sh).

Every setting draws the same 1,000 class-balanced samples (same labels, same initial noise: seed 0)
and is scored against the emoji reference with FID, KID (bootstrap intervals) and class accuracy.
Cost per image: network evaluations, FLOPs (msf info's count) and seconds measured here, one setting
at a time on an otherwise idle machine. Resumable: a finished setting is read back.

    .venv/bin/python studies/sampler_map.py            # runs/sampler_map/, then docs/sampler_map/
    .venv/bin/python studies/sampler_map.py --report   # tables and plots from the finished settings
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from timing import machine  # benchmarks/timing.py

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name: (model directory, the paper's sampler at this preset: the default)
    "demo": ROOT / "runs/compare_emoji/runs/demo/seed0/15min/model",
    "dit-demo": ROOT / "runs/compare_emoji/runs/dit-demo/seed0/15min/model",
}
REF = ROOT / "runs/compare_emoji/reference.npz"

# name -> per-scale settings (lists, one value per scale); unset fields: the model's defaults
MSF = {
    "paper": {},
    "res5": {"steps": [50, 5]},
    "euler25": {"steps": [25, 5]},
    "ab2-25": {"steps": [25, 5], "solver": ["ab2", "euler"]},
    "ab2-15": {"steps": [15, 5], "solver": ["ab2", "euler"]},
    "ab2-10": {"steps": [10, 5], "solver": ["ab2", "euler"]},
    "ab2-15-shift2": {"steps": [15, 5], "solver": ["ab2", "euler"], "shift": [2.0, 1.0]},
    "ab2-15-shift0.5": {"steps": [15, 5], "solver": ["ab2", "euler"], "shift": [0.5, 1.0]},
    "ab2-25-gi0.7": {"steps": [25, 5], "solver": ["ab2", "euler"], "guidance_interval": [[0.0, 0.7], [0, 1]]},
    "ab2-15-res3": {"steps": [15, 3], "solver": ["ab2", "euler"]},
    "heun-16": {"steps": [16, 5], "solver": ["heun", "euler"]},
    # where the curve bends
    "ab2-6": {"steps": [6, 3], "solver": ["ab2", "euler"]},
    "ab2-4": {"steps": [4, 2], "solver": ["ab2", "euler"]},
    "ab2-10-res2": {"steps": [10, 2], "solver": ["ab2", "euler"]},
    "ab2-10-res1": {"steps": [10, 1], "solver": ["ab2", "euler"]},
    # the shift that helped at 15 steps, at fewer
    "ab2-15-shift3": {"steps": [15, 5], "solver": ["ab2", "euler"], "shift": [3.0, 1.0]},
    "ab2-10-shift2-res3": {"steps": [10, 3], "solver": ["ab2", "euler"], "shift": [2.0, 1.0]},
    "ab2-6-shift2-res3": {"steps": [6, 3], "solver": ["ab2", "euler"], "shift": [2.0, 1.0]},
}
DIT = {
    "paper": {},
    "euler25": {"steps": [25]},
    "ab2-25": {"steps": [25], "solver": ["ab2"]},
    "ab2-15": {"steps": [15], "solver": ["ab2"]},
    "ab2-10": {"steps": [10], "solver": ["ab2"]},
    "ab2-15-shift2": {"steps": [15], "solver": ["ab2"], "shift": [2.0]},
    "ab2-15-shift0.5": {"steps": [15], "solver": ["ab2"], "shift": [0.5]},
    "ab2-25-gi0.7": {"steps": [25], "solver": ["ab2"], "guidance_interval": [[0.0, 0.7]]},
    "heun-16": {"steps": [16], "solver": ["heun"]},
    "ab2-6": {"steps": [6], "solver": ["ab2"]},
    "ab2-4": {"steps": [4], "solver": ["ab2"]},
    "ab2-15-shift3": {"steps": [15], "solver": ["ab2"], "shift": [3.0]},
    "ab2-10-shift2": {"steps": [10], "solver": ["ab2"], "shift": [2.0]},
    "ab2-6-shift2": {"steps": [6], "solver": ["ab2"], "shift": [2.0]},
}
SETTINGS = {"demo": MSF, "dit-demo": DIT}
DEFAULTS = {"demo": "ab2-10-shift2-res3", "dit-demo": "ab2-10-shift2"}  # the presets' defaults since issue 17
NUM, SEED, BATCH = 1000, 0, 128


def run(out: Path, extractor) -> None:
    from msf.config import SamplerSettings
    from msf.evaluation.metrics import evaluate
    from msf.evaluation.sample_set import sample_set
    from msf.interfaces.info import scale_infos
    from msf.method.pipeline import MSFPipeline

    for model, settings in SETTINGS.items():
        pipe = MSFPipeline.from_pretrained(MODELS[model])
        infos = scale_infos(pipe.config)
        for name, kw in settings.items():
            record = out / model / f"{name}.json"
            if record.is_file():
                continue
            sampler = SamplerSettings.of(pipe.config, **kw)
            path = out / model / f"{name}.npz"
            t0 = time.perf_counter()
            sample_set(
                pipe,
                path,
                NUM,
                batch_size=BATCH,
                seed=SEED,
                progress=False,
                overwrite=True,
                meta={"model": str(MODELS[model])},
                **kw,
            )
            seconds = (time.perf_counter() - t0) / NUM
            m = evaluate(
                str(path),
                str(REF),
                metrics=("fid", "kid", "cas"),
                class_data="emoji",
                bootstraps=200,
                feature_precision="auto",
                progress=False,
                floor=False,
                extractor=extractor,
            )
            rec = {
                "model": model,
                "setting": name,
                "sampler": sampler.to_dict(),
                "describe": sampler.describe(),
                "evaluations": sampler.evaluations,
                "flops": sum(i.flops_per_forward * sampler.scale_evaluations(k) for k, i in enumerate(infos)),
                "seconds_per_image": seconds,
                "fid": m["fid"],
                "fid_ci": m.get("fid_ci"),
                "kid": m["kid"],
                "kid_ci": m.get("kid_ci"),
                "cas": m["cas"]["accuracy"],
                "cas_ci": m.get("cas_ci"),
                "num_samples": NUM,
            }
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(rec, indent=2))
            path.unlink()  # 3 MB each; the record keeps what the map needs
            print(
                f"{model:9s} {name:16s} {rec['evaluations']:4d} evals  {seconds:.3f} s/img  "
                f"FID {rec['fid']:.1f}  CAS {rec['cas']:.3f}",
                flush=True,
            )


def _ci(r: dict, key: str, digits: int) -> str:
    ci = r.get(f"{key}_ci")
    v = r[key]
    return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else f"{v:.{digits}f}"


def report(out: Path, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(f.read_text()) for f in sorted(out.glob("*/*.json"))]
    if not rows:
        raise SystemExit(f"{out}: no finished settings yet")
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "map.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    paper = {r["model"]: r for r in rows if r["setting"] == "paper"}
    dit_paper_flops = paper["dit-demo"]["flops"] if "dit-demo" in paper else math.nan
    lines = [
        f"Machine: {machine()}. {NUM} samples per setting, seed {SEED} (same labels and noise in every "
        "setting), against the emoji reference; FID and KID with 95% bootstrap intervals, class accuracy "
        "(CAS) with its interval. Cost relative to the DiT at the paper's sampler (FLOPs).",
        "",
        "| model | setting | sampler | evaluations | GFLOPs | x DiT paper | s/image | FID | KID x1000 | CAS "
        "| vs paper |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["model"], -r["flops"])):
        ref = paper.get(r["model"])
        verdict = "-"
        if ref and r is not ref and r.get("fid_ci") and ref.get("fid_ci"):
            lo, hi = r["fid_ci"]
            rlo, rhi = ref["fid_ci"]
            verdict = "better" if hi < rlo else "worse" if lo > rhi else "level"
        kid = dict(
            r, kid=r["kid"] * 1000, kid_ci=[v * 1000 for v in r["kid_ci"]] if r.get("kid_ci") else None
        )
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['describe']} | {r['evaluations']} "
            f"| {r['flops'] / 1e9:.1f} | {r['flops'] / dit_paper_flops:.2f} | {r['seconds_per_image']:.3f} "
            f"| {_ci(r, 'fid', 1)} | {_ci(kid, 'kid', 1)} | {_ci(r, 'cas', 3)} | {verdict} |"
        )
    (docs / "map.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "flops", "GFLOPs per image"),
        (axes[1], "seconds_per_image", "seconds per image (this CPU)"),
    ):
        for model, color in (("demo", "tab:blue"), ("dit-demo", "tab:orange")):
            rs = sorted((r for r in rows if r["model"] == model), key=lambda r: r[key])
            xs = [r[key] / (1e9 if key == "flops" else 1) for r in rs]
            ys = [r["fid"] for r in rs]
            err = [[r["fid"] - r["fid_ci"][0] for r in rs], [r["fid_ci"][1] - r["fid"] for r in rs]]
            name = f"{model} (MSF)" if model == "demo" else f"{model} (K = 1 DiT)"
            ax.errorbar(xs, ys, yerr=err, fmt="o", color=color, label=name, capsize=2, ms=4, alpha=0.8)
            front, best = [], math.inf  # the Pareto front: no cheaper setting has a lower FID
            for x, y, r in zip(xs, ys, rs):
                if y < best:
                    front.append((x, y, r))
                    best = y
            ax.plot([f[0] for f in front], [f[1] for f in front], "-", color=color, lw=1, alpha=0.6)
            for x, y, r in zip(xs, ys, rs):
                if r["setting"] == "paper":
                    ax.plot([x], [y], marker="*", ms=15, color=color, mec="k", zorder=5)
                if r["setting"] == DEFAULTS[model]:
                    ax.plot([x], [y], marker="D", ms=8, color=color, mec="k", zorder=5)
                if r["setting"] in ("paper", DEFAULTS[model]) or any(r is f[2] for f in front):
                    ax.annotate(r["setting"], (x, y), textcoords="offset points", xytext=(4, -9), fontsize=6)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel(f"FID-{NUM // 1000}K (95% interval)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        "Quality against sampling cost, 15-minute models on emoji (star: the paper's sampler; diamond: msf's "
        "default; line: the Pareto front)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(docs / "map.png", dpi=130)
    print(f"wrote {docs / 'map.md'}, {docs / 'map.png'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs/sampler_map"))
    ap.add_argument("--docs", default=str(ROOT / "docs/sampler_map"))
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if not args.report:
        from msf.evaluation.features import load_feature_extractor

        run(Path(args.out), load_feature_extractor(precision="auto"))
    report(Path(args.out), Path(args.docs))


if __name__ == "__main__":
    main()
