"""Issue 21, item 6: the demo's guidance, chosen by measurement rather than carried over from the paper.

The models: `demo-plus` as `make demo` trains it (the run demo+lr4e-3+priornoise of recipe_emoji.sh at 5
minutes, 1,795 steps), three training seeds; and, to tell whether a tuned guidance favours MSF alone,
its K = 1 DiT `dit-demo` at the same 5 minutes. Each is sampled with the base's guidance (CFG) at
several scales (and MSF's residual at two), every other setting at the preset's defaults, with `msf
sweep`'s library function: the same 1,000 class-balanced samples each time (same labels, same initial
noise), scored against the emoji reference with FID and KID (bootstrap intervals) and class accuracy,
overall and per class. Each value is judged against the paper's (CFG 3 on the base, 1 on the residual)
paired by training seed, as `msf compare` judges presets: "ahead" or "behind" only when the interval
excludes zero.

    .venv/bin/python studies/guidance_demo.py                     # runs/guidance_demo/demo-plus/
    .venv/bin/python studies/guidance_demo.py --family dit-demo   # the same for its K = 1 DiT
    .venv/bin/python studies/guidance_demo.py --family dit-demo+cosine   # that DiT with the cosine term
    .venv/bin/python studies/guidance_demo.py --report            # tables and plot, docs/guidance_demo/

Resumable: a finished sample set is reused (`run_sweep` keeps them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from timing import machine  # benchmarks/timing.py

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "runs/emoji_studies"
SEEDS = (0, 1, 2)
SCALES = {0: "base", 1: "residual"}
# family: the models (one per training seed), the sweeps (name: scale, the guidance scales tried; each
# sweep's other scale stays at its default) and the defaults the others are judged against
FAMILIES = {
    "demo-plus": {
        "model": "runs/demo+lr4e-3+priornoise/seed{seed}/5min/model",
        "sweeps": {"base": (0, [2.0, 3.0, 4.0, 5.0, 7.0]), "residual": (1, [2.0]),
                   "base-high": (0, [10.0])},  # added when 7 was still climbing in class accuracy
        "default": {"base": 3.0, "residual": 1.0},
        "title": "`demo-plus` at 5 minutes (1,795 steps)",
    },
    # its K = 1 DiT, at its own preset's recipe (lr 4e-3 was level on it: docs/levers.md): does the
    # DiT gain as much from guidance, or is a tuned guidance an advantage given to MSF alone?
    "dit-demo": {
        "model": "runs/dit-demo/seed{seed}/5min/model",
        "sweeps": {"base": (0, [3.0, 5.0, 7.0])},
        "default": {"base": 3.0},
        "title": "`dit-demo` (K = 1: its one scale is the \"base\") at 5 minutes (1,016 steps)",
    },
    # the DiT with the cosine velocity term (ahead of dit-demo at the paper's guidance, three seeds:
    # docs/levers.md), at dit-demo-plus's guidance 5: does the term still pay there? Judged against
    # dit-demo's base-5 rows above, the same samples' labels and noise
    "dit-demo+cosine": {
        "model": "runs/dit-demo+cosine/seed{seed}/5min/model",
        "sweeps": {"base": (0, [5.0])},
        "default": {"base": 5.0},
        "against": "dit-demo",
        "title": "`dit-demo` with the cosine velocity term 0.1 at 5 minutes (1,012 steps)",
    },
}
NUM, SAMPLE_SEED, BATCH = 1000, 0, 128


def run(out: Path, family: str) -> None:
    from msf.evaluation.metrics import load_feature_extractor
    from msf.evaluation.sweep import run_sweep, sweep_points
    from msf.method.pipeline import MSFPipeline

    fam = FAMILIES[family]
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "machine.txt").is_file():  # the machine and its load while measuring, not at report time
        (out / "machine.txt").write_text(machine() + "\n")
    extractor = load_feature_extractor(precision="auto")
    for seed in SEEDS:
        pipe = MSFPipeline.from_pretrained(STUDY / fam["model"].format(seed=seed))
        for name, (scale, values) in fam["sweeps"].items():
            dest = out / f"seed{seed}" / name
            if (dest / "rows.json").is_file():
                continue
            points = sweep_points(pipe, scale, "cfg_scale", values)
            rows = run_sweep(pipe, str(STUDY / "reference.npz"), points, dest, num_samples=NUM,
                             batch_size=BATCH, seed=SAMPLE_SEED,
                             metrics=("fid", "kid", "cas"), class_data="emoji", feature_precision="auto",
                             progress=False, model=fam["model"].format(seed=seed), extractor=extractor)
            (dest / "rows.json").write_text(json.dumps(rows, indent=2))
            for r in rows:
                print(f"{family} seed {seed} {name:8s} cfg {r['value']:g}: FID {r['fid']:.1f}  "
                      f"KID {r['kid']:.4f}  class accuracy {r['cas']:.3f}", flush=True)


def _points(out: Path, fam: dict) -> dict[tuple[str, float], list[dict]]:
    """(scale's name, value) -> one row per seed, in seed order; the default setting is shared by both
    scales' sweeps (the base's CFG 3 sweep point is the residual's CFG 1)."""
    by = {}
    for seed in SEEDS:
        for name in fam["sweeps"]:
            f = out / f"seed{seed}" / name / "rows.json"
            if not f.is_file():
                raise SystemExit(f"{f}: not finished; run without --report first")
            for r in json.loads(f.read_text()):
                by.setdefault((SCALES[r["scale"]], float(r["value"])), []).append(r)
    if "residual" in fam["default"]:
        by[("residual", fam["default"]["residual"])] = by[("base", fam["default"]["base"])]
    return by


def report(out: Path, docs: Path, family: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from msf.evaluation.intervals import paired_difference, seed_interval, verdict

    fam = FAMILIES[family]
    default = fam["default"]
    measured_on = (out / "machine.txt").read_text().strip() if (out / "machine.txt").is_file() else machine()
    by = _points(out, fam)
    docs.mkdir(parents=True, exist_ok=True)
    base = by[("base", default["base"])]
    names = list(base[0]["cas_per_class"])
    lines = [
        f"Machine: {measured_on}. {fam['title']}, training seeds {list(SEEDS)}; "
        f"{NUM} class-balanced samples per setting (sampling seed {SAMPLE_SEED}: the same labels and noise "
        "in every setting), against the emoji reference. Mean over training seeds with its 95% interval; "
        "the verdict pairs each setting with the default ("
        + ", ".join(f"{k} CFG {v:g}" for k, v in default.items()) + ") seed by seed.",
        "",
        "| guidance | FID | KID x1000 | class accuracy | FID vs default | KID x1000 vs default "
        "| class accuracy vs default |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = []
    for (name, value), rows in sorted(by.items(), key=lambda kv: (kv[0][0] != "base", kv[0][1])):
        if name == "residual" and value == default["residual"]:
            continue
        fid, kid, cas = ([r[k] for r in rows] for k in ("fid", "kid", "cas"))
        fi, ki, ci = seed_interval(fid), seed_interval([k * 1000 for k in kid]), seed_interval(cas)
        label = f"{name} {value:g}" + (" (default)" if value == default[name] else "")
        if rows is base:
            dfid = dkid = dcas = "-"
        else:
            d1 = paired_difference(fid, [r["fid"] for r in base])
            dk = paired_difference([k * 1000 for k in kid], [r["kid"] * 1000 for r in base])
            d2 = paired_difference(cas, [r["cas"] for r in base])
            dfid = f"{d1.value:+.1f} [{d1.low:+.1f}, {d1.high:+.1f}] {verdict(d1)}"
            dkid = f"{dk.value:+.1f} [{dk.low:+.1f}, {dk.high:+.1f}] {verdict(dk)}"
            dcas = f"{d2.value:+.3f} [{d2.low:+.3f}, {d2.high:+.3f}] {verdict(d2, lower_is_better=False)}"
        lines.append(f"| {label} | {fi.value:.1f} [{fi.low:.1f}, {fi.high:.1f}] | {ki.value:.1f} "
                     f"[{ki.low:.1f}, {ki.high:.1f}] | {ci.value:.3f} [{ci.low:.3f}, {ci.high:.3f}] | {dfid} "
                     f"| {dkid} | {dcas} |")
        per = {c: float(np.mean([r["cas_per_class"][c] for r in rows])) for c in names}
        summary.append({"sweep": name, "cfg": value, "fid": fid, "kid": kid, "cas": cas, "per_class": per,
                        "evaluations": rows[0]["nfe_per_image"]})
    if "against" in fam:  # the same guidance of another family's models, paired by training seed
        # from that family's committed report (its per-seed values, in seed order)
        kept = json.loads((docs / f"guidance_{fam['against']}.json").read_text())["rows"]
        other = {(r["sweep"], float(r["cfg"])): [{m: r[m][i] for m in ("fid", "kid", "cas")}
                                                 for i in range(len(SEEDS))] for r in kept}
        lines += ["", f"Against `{fam['against']}` at the same guidance (paired by training seed):", "",
                  "| guidance | FID | KID x1000 | class accuracy |", "|---|---|---|---|"]
        for key, rows in sorted(by.items()):
            if key not in other:
                continue
            d = [paired_difference([r[m] * f for r in rows], [r[m] * f for r in other[key]])
                 for m, f in (("fid", 1), ("kid", 1000), ("cas", 1))]
            lines.append(f"| {key[0]} {key[1]:g} | " + " | ".join(
                f"{x.value:+{fmt}} [{x.low:+{fmt}}, {x.high:+{fmt}}] {verdict(x, lower_is_better=low)}"
                for x, fmt, low in zip(d, (".1f", ".1f", ".3f"), (True, True, False))) + " |")
    lines += ["", "Class accuracy per class (mean over seeds):", "",
              "| guidance | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {s['sweep']} {s['cfg']:g} | " + " | ".join(f"{s['per_class'][c]:.2f}" for c in names) + " |"
              for s in summary]
    stem = "guidance" if family == "demo-plus" else f"guidance_{family}"
    (docs / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (docs / f"{stem}.json").write_text(json.dumps({"machine": measured_on, "rows": summary}, indent=2))
    print("\n".join(lines))

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    bases = sorted((s for s in summary if s["sweep"] == "base"), key=lambda s: s["cfg"])
    xs = [s["cfg"] for s in bases]
    for ax, key, label in ((axes[0], "fid", "FID-1K"), (axes[1], "cas", "class accuracy")):
        ivs = [seed_interval(s[key]) for s in bases]
        ax.plot(xs, [i.value for i in ivs], "o-", label="mean over 3 training seeds")
        ax.fill_between(xs, [i.low for i in ivs], [i.high for i in ivs], alpha=0.25, label="95% interval")
        for seed in range(len(SEEDS)):
            ax.plot(xs, [s[key][seed] for s in bases], ":", color="gray", lw=0.8)
        ax.axvline(default["base"], color="k", lw=0.6, ls="--")
        ax.set_xlabel("CFG scale of the base (scale 0)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for c in names:
        axes[2].plot(xs, [s["per_class"][c] for s in bases], "o-", ms=3, label=c)
    axes[2].axvline(default["base"], color="k", lw=0.6, ls="--")
    axes[2].set_xlabel("CFG scale of the base (scale 0)")
    axes[2].set_ylabel("class accuracy, per class")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=6, ncol=2)
    fig.suptitle(f"{family} (5 minutes): guidance on the base (dashed line: the paper's 3)", fontsize=10)
    fig.tight_layout()
    fig.savefig(docs / f"{stem}.png", dpi=120)
    print(f"wrote {docs / f'{stem}.md'}, {docs / f'{stem}.png'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=list(FAMILIES), default="demo-plus")
    ap.add_argument("--out", default=str(ROOT / "runs/guidance_demo"), help="runs go to OUT/FAMILY/")
    ap.add_argument("--docs", default=str(ROOT / "docs/guidance_demo"))
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    out = Path(args.out) / args.family
    if not args.report:
        run(out, args.family)
    report(out, Path(args.docs), args.family)


if __name__ == "__main__":
    main()
