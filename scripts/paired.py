"""Two presets of an `msf compare` report against each other, paired by training seed.

`msf compare` judges each variant against its own root and a stack against its longest listed prefix;
this prints any other pair of the same report with the same machinery (Student's t on the seed-by-seed
differences, msf.intervals), e.g. a stack against another of its parts:

    python scripts/paired.py docs/levers/levers_best/compare.json dit-demo+cosine+uniform dit-demo+uniform
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from msf.intervals import paired_difference, verdict

METRICS = (("fid", True), ("kid", True), ("cas", False))  # name, lower is better


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="a compare.json")
    ap.add_argument("a", help="the preset judged")
    ap.add_argument("b", help="the preset it is judged against")
    ap.add_argument("--budget", type=float, help="minutes (default: the report's only budget)")
    args = ap.parse_args()
    runs = json.loads(args.report.read_text())["runs"]
    runs = [r for r in runs if r.get("sampling", "defaults") == "defaults"]
    budgets = sorted({r["budget_minutes"] for r in runs})
    budget = args.budget if args.budget is not None else budgets[0]
    if args.budget is None and len(budgets) > 1:
        raise SystemExit(f"{args.report}: budgets {budgets}; choose one with --budget")
    by = {(r["preset"], r["seed"]): r for r in runs if r["budget_minutes"] == budget}
    seeds = sorted(s for p, s in by if p == args.a and (args.b, s) in by)
    if len(seeds) < 2:
        raise SystemExit(f"{args.report}: {args.a} and {args.b} share {len(seeds)} seed(s) at "
                         f"{budget:g} min; a paired interval needs 2 or more")
    print(f"{args.a} against {args.b}, {budget:g} min, seeds {seeds}, paired:")
    for m, lower in METRICS:
        d = paired_difference([by[(args.a, s)][m] for s in seeds], [by[(args.b, s)][m] for s in seeds])
        print(f"  {m}: {d.value:+.4g} [{d.low:+.4g}, {d.high:+.4g}] {verdict(d, lower_is_better=lower)}")


if __name__ == "__main__":
    main()
