"""A comparison's summary (:func:`.compare.summarize`) as a reader sees it: the Markdown tables of
``compare.md`` (:func:`markdown`: means with intervals, verdicts against each baseline, FID per seed,
class accuracy per class) and two plots (:func:`plots`: quality against the training budget, and
against sampling seconds per image)."""

from __future__ import annotations

import math
from pathlib import Path

# metric -> (label, lower is better)
METRICS = {"fid": ("FID", True), "kid": ("KID", True), "precision": ("precision", False),
           "recall": ("recall", False), "cas": ("class accuracy", False)}


def _cell(iv: dict | None, digits: int) -> str:
    if not iv:
        return "-"
    if math.isnan(iv["low"]):
        return f"{iv['value']:.{digits}f}"
    return f"{iv['value']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"


def markdown(summary: dict) -> str:
    s = summary["settings"]
    first = s["presets"][0]
    kind = "equal training wall-clock" if s["budget_kind"] == "wall" else "equal training FLOPs"
    lines = [f"# msf compare: {', '.join(s['presets'])} on {s['data']}", "",
             f"Budget: {kind}; "
             f"seeds {s['seeds']}; {s['num_samples']} samples per run at each preset's default sampler; "
             "intervals 95%: over seeds (Student t) where there are several, else bootstrap over samples.",
             ""]
    if summary.get("floor"):
        f = summary["floor"]
        lines += [f"Real against real (the floor): FID {f['fid']:.2f}, KID {f['kid']:.4f} "
                  f"({f['n']} real images against {f['num_ref']} others).", ""]
    head = ["budget", "sampling", "preset", "steps", "train min", "FID", "KID", "precision", "recall",
            "class acc.", "evals/img", "sample s/img"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        lines.append("| " + " | ".join([
            f"{r['budget_minutes']:g} min", r.get("sampling", "defaults"), r["preset"], f"{r['steps']:.0f}",
            f"{r['train_minutes']:.1f}", _cell(r.get("fid"), 2), _cell(r.get("kid"), 4),
            _cell(r.get("precision"), 3), _cell(r.get("recall"), 3), _cell(r.get("cas"), 3),
            str(r["evaluations_per_image"]), f"{r['sample_seconds_per_image']:.4f}"]) + " |")
    verdicts = [r for r in summary["rows"] if any(f"{m}_vs_baseline" in r for m in METRICS)]
    if verdicts:
        lines += ["", "Each preset against its baseline (a variant PRESET+LABEL against PRESET where that is "
                  "compared too, a stack A+B+C against A+B and then against A, any other against "
                  f"{first}): this one minus the baseline, and whether it is ahead or behind (only where the "
                  "interval of the difference "
                  "excludes 0) or level; "
                  "\"no interval\": one seed of a metric without a bootstrap (precision, recall). "
                  "\"(paired)\": a variant of its baseline's work (the same initial weights and data order "
                  "at each seed), so the difference is taken seed by seed (Student's t on the differences), "
                  "else Welch's t over seeds:", "",
                  "| budget | sampling | preset | against | " + " | ".join(v[0] for v in METRICS.values())
                  + " |", "|---|---|---|---|" + "---|" * len(METRICS)]
        for r in verdicts:
            # a stack: against its longest listed prefix, then the whole stack against its root
            judged = [(r.get("baseline") or first, {m: r.get(f"{m}_vs_baseline") for m in METRICS})]
            if r.get("vs_root"):
                judged.append((r["vs_root"]["against"], {m: r["vs_root"].get(m) for m in METRICS}))
            for base, vs in judged:
                cells = ["-" if v is None else f"{v['verdict']} ({v['difference']['value']:+.3g})"
                         for v in vs.values()]
                paired = any((v or {}).get("paired") for v in vs.values())
                against = base + (" (paired)" if paired else "")
                lines.append(f"| {r['budget_minutes']:g} min | {r.get('sampling', 'defaults')} | "
                             f"{r['preset']} | {against} | " + " | ".join(cells) + " |")
    lines += _per_seed_table(summary["rows"])
    lines += _per_class_table(summary["rows"])
    return "\n".join(lines) + "\n"


def _per_seed_table(rows: list[dict]) -> list[str]:
    """FID of each run at the defaults, and for a paired variant its difference from its baseline seed by
    seed: how much of a mean is one seed, and whether a paired gain holds on every seed."""
    rows = [r for r in rows if r.get("fid_by_seed") and r.get("sampling", "defaults") == "defaults"]
    seeds = sorted({int(k) for r in rows for k in r["fid_by_seed"]})
    if len(seeds) < 2:
        return []
    lines = ["", "FID per training seed at the defaults (paired variants: this one minus its baseline, "
             "seed by seed):", "", "| budget | preset | " + " | ".join(f"seed {k}" for k in seeds)
             + " | paired differences |", "|---|---|" + "---|" * (len(seeds) + 1)]
    keys = [str(k) for k in seeds]  # JSON's keys
    for r in rows:
        base = next((b for b in rows if b["preset"] == r.get("baseline")
                     and b["budget_minutes"] == r["budget_minutes"]), None)
        mine = r["fid_by_seed"]
        diffs = ""
        if base and (r.get("fid_vs_baseline") or {}).get("paired"):
            theirs = base["fid_by_seed"]
            diffs = ", ".join(f"{mine[k] - theirs[k]:+.1f}" for k in keys if k in mine and k in theirs)
        cells = [f"{mine[k]:.1f}" if k in mine else "-" for k in keys]
        lines.append(f"| {r['budget_minutes']:g} min | {r['preset']} | " + " | ".join([*cells, diffs]) + " |")
    return lines


def _per_class_table(rows: list[dict]) -> list[str]:
    """Each class's accuracy at each budget, at the presets' defaults: which classes a recipe fixes."""
    rows = [r for r in rows if r.get("cas_per_class") and r.get("sampling", "defaults") == "defaults"]
    if not rows:
        return []
    classes = list(dict.fromkeys(c for r in rows for c in r["cas_per_class"]))
    lines = ["", "Class accuracy per class at the defaults (the mean over seeds):", "",
             "| budget | preset | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
    for r in rows:
        cells = [f"{r['cas_per_class'][c]:.2f}" if c in r["cas_per_class"] else "-" for c in classes]
        lines.append(f"| {r['budget_minutes']:g} min | {r['preset']} | " + " | ".join(cells) + " |")
    return lines


def plots(summary: dict, out: Path, metric: str = "fid") -> list[Path]:
    """Quality against training minutes (a band for the interval over seeds) and against sampling cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = METRICS[metric][0]
    paths = []
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for p in summary["settings"]["presets"]:
        rows = [r for r in summary["rows"] if r["preset"] == p and metric in r
                and r.get("sampling", "defaults") == "defaults"]
        if not rows:
            continue
        x = [r["budget_minutes"] for r in rows]
        v = [r[metric] for r in rows]
        ax.plot(x, [i["value"] for i in v], "o-", label=p)
        lo = [i["low"] if not math.isnan(i["low"]) else i["value"] for i in v]
        hi = [i["high"] if not math.isnan(i["high"]) else i["value"] for i in v]
        ax.fill_between(x, lo, hi, alpha=0.2)
    if summary.get("floor") and metric in ("fid", "kid"):
        ax.axhline(summary["floor"][metric], color="gray", ls="--", lw=1, label="real vs real")
    wall = summary["settings"]["budget_kind"] == "wall"
    ax.set_xlabel("training budget, minutes (equal for all presets)" if wall
                  else "training budget: the first preset's FLOPs in this many minutes")
    paths.append(_save(fig, ax, label, out / f"{metric}_vs_training.png"))

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, p in enumerate(summary["settings"]["presets"]):
        for sampling, marker in (("defaults", "o"), ("equal cost", "s")):
            rows = [r for r in summary["rows"] if r["preset"] == p and metric in r
                    and r.get("sampling", "defaults") == sampling]
            if sampling == "equal cost":  # a preset already at the cheapest cost repeats its defaults
                rows = [r for r in rows if r["evaluations_per_image"] != next(
                    (d["evaluations_per_image"] for d in summary["rows"] if d["preset"] == p), None)]
            if not rows:
                continue
            ivs = [r[metric] for r in rows]
            val = [iv["value"] for iv in ivs]
            lo = [0.0 if math.isnan(iv["low"]) else iv["value"] - iv["low"] for iv in ivs]
            hi = [0.0 if math.isnan(iv["high"]) else iv["high"] - iv["value"] for iv in ivs]
            xs = [r["sample_seconds_per_image"] for r in rows]
            ax.errorbar(xs, val, yerr=[lo, hi], fmt=marker, capsize=3, color=colours[i % len(colours)],
                        label=p if sampling == "defaults" else f"{p}, fewer steps (equal cost)")
            for x, y, r in zip(xs, val, rows):  # which budget each point is
                ax.annotate(f"{r['budget_minutes']:g} min", (x, y), xytext=(4, 2), textcoords="offset points",
                            fontsize=6, color=colours[i % len(colours)])
    ax.set_xlabel("sampling seconds per image (this machine)")
    paths.append(_save(fig, ax, label, out / f"{metric}_vs_sampling_cost.png", legend_outside=True))
    return paths


def _save(fig, ax, ylabel: str, path: Path, legend_outside: bool = False) -> Path:
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    if legend_outside:  # points spread over the whole axes: a legend inside would hide some
        fig.set_size_inches(fig.get_figwidth() + 2.5, fig.get_figheight())
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
