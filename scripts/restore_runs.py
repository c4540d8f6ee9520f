"""Rebuild an `msf compare` output folder's finished runs from the reports committed in docs/.

A study's folder of runs (runs/emoji_studies, runs/compare_emoji) is not committed: its checkpoints and
sample sets are large. Its reports (compare.json) are, and each holds every finished run's record. This
script writes those records back as the folder's run.json / equal_cost.json files, its settings.json
(the settings and every preset's overrides, which must agree across the reports), and its rates.json
where one is given, so that `msf compare` skips the runs already done and times the rest as before.

Only the records come back: a later budget of a restored run trains from the start, not from a
checkpoint (same steps, so the same result at a constant learning rate, at the full cost).

    python scripts/restore_runs.py --out runs/emoji_studies --rates docs/levers/rates.json \
        docs/levers/compare.json docs/levers/recipe/compare.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import fields
from pathlib import Path

from msf.evaluation.compare import VARIABLE_SETTINGS, CompareSettings, budget_key
from msf.files import atomic_write_text

# what a finished run's result depends on: the same in every report restored into one folder
_FIXED = tuple(f.name for f in fields(CompareSettings) if f.name not in VARIABLE_SETTINGS)


def restore(reports: list[Path], out: Path, rates: Path | None = None) -> dict[str, int]:
    """Write the runs of ``reports`` under ``out``; returns counts of runs written and already there."""
    fixed: dict | None = None
    overrides: dict[str, list[str]] = {}
    records: list[tuple[Path, dict, Path]] = []
    for report in reports:
        if not report.is_file():
            sys.exit(f"{report}: no such report")
        summary = json.loads(report.read_text())
        settings = summary.get("settings")
        if not settings or "runs" not in summary:
            sys.exit(f"{report}: not a compare.json (no 'settings' or 'runs')")
        # a setting newer than a report is not in it: msf compare reads it as its default
        mine = {k: settings[k] for k in _FIXED if k in settings}
        if fixed is None:
            fixed = mine
        else:
            diff = {k: (fixed[k], mine[k]) for k in fixed.keys() & mine.keys() if fixed[k] != mine[k]}
            if diff:
                sys.exit(f"{report}: made with other settings than {reports[0]}: {diff}")
            fixed |= mine
        for p, o in settings.get("preset_overrides", {}).items():
            if overrides.setdefault(p, o) != o:
                sys.exit(f"{report}: preset {p} has overrides {o}, another report {overrides[p]}")
        for rec in summary["runs"]:
            name = "run.json" if rec.get("sampling", "defaults") == "defaults" else "equal_cost.json"
            run_dir = out / "runs" / rec["preset"] / f"seed{rec['seed']}" / budget_key(rec["budget_minutes"])
            records.append((run_dir / name, rec, report))
    # A folder that already holds runs keeps them only if they were made as the reports' were: checked
    # before anything is written, so a refused restore leaves the folder as it was.
    settings_file = out / "settings.json"
    if settings_file.is_file():
        old = json.loads(settings_file.read_text())
        old_overrides = old.get("preset_overrides", {})
        changed = {k: (old[k], v) for k, v in (fixed or {}).items() if k in old and old[k] != v}
        changed |= {f"overrides of {p}": (old_overrides[p], o) for p, o in overrides.items()
                    if p in old_overrides and old_overrides[p] != o}
        if changed:
            sys.exit(f"{settings_file}: the folder's runs were made with other settings than the reports' "
                     f"(folder, reports): {changed}")
        overrides = old_overrides | overrides
    counts = {"written": 0, "present": 0}
    for file, rec, report in records:
        if file.is_file():
            if json.loads(file.read_text()) != rec:
                sys.exit(f"{file}: already holds another record of this run than {report}'s")
            counts["present"] += 1
            continue
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(file, json.dumps(rec, indent=2))
        counts["written"] += 1
    atomic_write_text(settings_file, json.dumps({**(fixed or {}), "preset_overrides": overrides}, indent=2))
    if rates is not None and not (out / "rates.json").is_file():
        shutil.copyfile(rates, out / "rates.json")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path, help="compare.json files")
    ap.add_argument("--out", type=Path, required=True, help="the compare output folder to rebuild")
    ap.add_argument("--rates", type=Path, help="a committed rates.json (kept if the folder has one)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    counts = restore(a.reports, a.out, a.rates)
    print(f"{a.out}: {counts['written']} runs written, {counts['present']} already there")


if __name__ == "__main__":
    main()
