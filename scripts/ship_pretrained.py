"""Package a trained model as a shipped one: src/msf/pretrained/<name>/ (issue 21, item 6).

    .venv/bin/python scripts/ship_pretrained.py runs/compare_emoji/runs/demo/seed0/15min emoji-demo \
        --cfg 5 --sweep runs/guidance_pretrained

From a run of `msf compare` (its model/ and run.json) it writes config.json, the weights in bf16
safetensors (half the size; they load into fp32 networks, and sample within bf16 rounding of the
originals) and a README.md with the recipe, the training time and the scores the comparison measured
(FID and KID with intervals, class accuracy overall and per class). ``--cfg``: the base's default
guidance, where a guidance sweep of this model (``msf sweep ... --metrics fid,kid,cas``, given as
``--sweep``, whose scores at that value the README then reports too) found a better one than the
preset's; ``--sampler paper`` keeps the preset's. Check afterwards:
`msf sample <name> --classes all --per-class 8 --out grid.png`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", help="a run directory of msf compare: <out>/runs/<preset>/seed<k>/<B>min")
    p.add_argument("name")
    p.add_argument("--cfg", type=float, help="the base's default guidance (default: the preset's)")
    p.add_argument("--sweep", help="an msf sweep directory of this model's base guidance (sweep.csv)")
    args = p.parse_args()
    run = Path(args.run)
    rec = json.loads((run / "run.json").read_text())
    out = ROOT / "src" / "msf" / "pretrained" / args.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    meta = json.loads((run / "model" / "config.json").read_text())
    # sampled with its preset's current defaults (issue 17's cheaper sampler), the paper's one flag away
    from msf.config import SAMPLING_FIELDS, to_dict
    from msf.presets import preset

    now = to_dict(preset(rec["preset"]).model)
    for scale, current in zip(meta["model"]["scales"], now["scales"]):
        scale.update({k: current[k] for k in SAMPLING_FIELDS})
    meta["model"]["samplers"] = now["samplers"]
    sweep = None
    if args.cfg is not None:
        paper = meta["model"]["samplers"].setdefault("paper", {})
        paper.setdefault("cfg_scale", [sc["cfg_scale"] for sc in meta["model"]["scales"]])
        meta["model"]["scales"][0]["cfg_scale"] = args.cfg
    if args.sweep:
        sweep = _sweep_rows(Path(args.sweep), meta["model"]["scales"][0]["cfg_scale"])
    meta["shipped"] = {"from": str(run), "weights_dtype": "bf16", "compare_record": rec}
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    for f in sorted((run / "model").glob("scale_*.safetensors")):
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(f).items()},
                  str(out / f.name))
    (out / "README.md").write_text(readme(args.name, rec, meta, sweep))
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"wrote {out} ({size:.1f} MB)")


def _sweep_rows(folder: Path, cfg: float) -> dict:
    """The rows of a base-guidance sweep (``sweep.csv``), and which one is the default ``cfg``."""
    import csv

    with open(folder / "sweep.csv") as f:
        rows = [{k: json.loads(v) if v and v[0] in "[{" else v for k, v in r.items()}
                for r in csv.DictReader(f)]
    if not any(float(r["value"]) == cfg for r in rows):
        raise SystemExit(f"{folder}/sweep.csv has no row at guidance {cfg:g}")
    return {"rows": rows, "default": cfg, "folder": str(folder)}


def describe(model: dict, name: str = "default") -> str:
    from msf.config import ModelConfig, SamplerSettings, from_dict

    return SamplerSettings.named(from_dict(ModelConfig, model), name).describe()


def _ci(rec: dict, key: str, fmt: str) -> str:
    ci = rec.get(f"{key}_ci")
    return f"{rec[key]:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")


def _sweep_table(sweep: dict) -> str:
    def ci(r, key, fmt):
        lo, hi = r[f"{key}_ci"]
        return f"{float(r[key]):{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"

    lines = ["| base guidance | FID | KID | class accuracy |", "|---|---|---|---|"]
    lines += [f"| {float(r['value']):g}{' (default)' if float(r['value']) == sweep['default'] else ''} "
              f"| {ci(r, 'fid', '.1f')} | {ci(r, 'kid', '.4f')} | {ci(r, 'cas', '.3f')} |"
              for r in sweep["rows"]]
    return "\n".join(lines)


def _against(sweep: dict, value: float) -> str:
    """The default's row against the row at ``value``, per metric: level where their intervals overlap."""
    rows = {float(r["value"]): r for r in sweep["rows"]}
    a, b = rows[sweep["default"]], rows.get(value)
    if b is None:
        return f"(the sweep has no row at guidance {value:g})"
    said = []
    for key, name, lower_better in (("fid", "FID", True), ("kid", "KID", True),
                                    ("cas", "class accuracy", False)):
        (alo, ahi), (blo, bhi) = a[f"{key}_ci"], b[f"{key}_ci"]
        better = ahi < blo if lower_better else alo > bhi
        worse = alo > bhi if lower_better else ahi < blo
        said.append(f"{'ahead' if better else 'behind' if worse else 'level'} on {name}")
    return ", ".join(said)


def readme(name: str, rec: dict, meta: dict, sweep: dict | None = None) -> str:
    model, train = meta["model"], meta.get("train", {})
    scales = "; ".join(f"scale {k}: {s['image_size']} px, depth {s['depth']} x width {s['width']}, patch "
                       f"{s['patch_size']}" for k, s in enumerate(model["scales"]))
    paper_cfg = model["samplers"].get("paper", {}).get("cfg_scale", [model["scales"][0]["cfg_scale"]])[0]
    same = ("The two are level on this model (docs/sampler_map.md in the msf repository)." if sweep is None
            else f"At guidance {paper_cfg:g} the two are level on this model (docs/sampler_map.md in the\n"
            "  msf repository); the default's own scores, at its guidance, are under \"Its guidance\".")
    per_class = "\n".join(f"| {c} | {a:.2f} |" for c, a in (rec.get("cas_per_class") or {}).items())
    return f"""# {name}

A `{rec['preset']}` MSF model of the built-in emoji (32 x 32, {model['num_classes']} classes), shipped with
msf so that `msf sample {name} --classes all --per-class 8` shows samples seconds after install.

- Recipe: preset `{rec['preset']}` ({scales}); AdamW lr {train.get('lr')}, batch {train.get('batch_size')},
  EMA {train.get('ema_decay')}, {train.get('lr_schedule')} learning rate, seed {rec['seed']}.
- Training: {rec['steps']} steps, {rec['budget_minutes']:g} minutes of `msf compare`'s equal wall-clock budget
  on a 2-core AMD Zen 4 CPU (the step count from the rates kept there; {rec['train_seconds_total'] / 60:.0f}
  minutes as run).
- Sampling: by default {describe(model)}; `--sampler paper` for the paper's sampler
  ({describe(model, "paper")}), which the scores below were measured with. {same}
- Scores ({rec['num_samples']} samples at the paper's sampler, against the 1,870 training images; 95%
  bootstrap intervals): FID {_ci(rec, 'fid', '.1f')}, KID {_ci(rec, 'kid', '.4f')}, class accuracy
  {_ci(rec, 'cas', '.3f')} (its classifier's own held-out accuracy on real images:
  {rec.get('cas_real', 0):.3f}).
- Weights stored in bf16 (they load into fp32 networks); made by `scripts/ship_pretrained.py`.

| class | accuracy of its samples |
|---|---|
{per_class}
""" + ("" if sweep is None else f"""
## Its guidance

The default sampler guides the base at {sweep['default']:g} rather than the preset's {paper_cfg:g}. A sweep
of this model's base guidance at the default sampler (`msf sweep`, {sweep['rows'][0]['num_samples']}
class-balanced samples each, the same labels and noise; 95% intervals: bootstrap for FID and KID,
Wilson's for class accuracy; level where they overlap) puts it, against {paper_cfg:g}:
{_against(sweep, paper_cfg)}.
(Class-balanced samples score a higher FID than the data's class mix above.)

{_sweep_table(sweep)}
""")


if __name__ == "__main__":
    main()
