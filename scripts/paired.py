"""Two presets of an `msf compare` report against each other, paired by training seed.

`msf compare` judges each variant against its own root and a stack against its longest listed prefix;
this prints any other pair of the same report with the same machinery (Student's t on the seed-by-seed
differences, msf.evaluation.intervals), e.g. a stack against another of its parts:

    python scripts/paired.py docs/levers/levers_best/compare.json dit-demo+cosine+uniform dit-demo+uniform

or one preset at a budget against another at a longer one (issue 18's 3x target):

    python scripts/paired.py docs/compare_emoji/compare.json demo-plus demo --budget 15 --budget-b 45
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from msf.evaluation.intervals import paired_difference, verdict

METRICS = (("fid", True), ("kid", True), ("cas", False))  # name, lower is better


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="a compare.json")
    ap.add_argument("a", help="the preset judged")
    ap.add_argument("b", help="the preset it is judged against")
    ap.add_argument("--budget", type=float, help="minutes (default: the report's only budget)")
    ap.add_argument("--budget-b", type=float, help="minutes of b's runs (default: --budget)")
    args = ap.parse_args()
    runs = json.loads(args.report.read_text())["runs"]
    runs = [r for r in runs if r.get("sampling", "defaults") == "defaults"]
    budgets = sorted({r["budget_minutes"] for r in runs})
    budget = args.budget if args.budget is not None else budgets[0]
    if args.budget is None and len(budgets) > 1:
        raise SystemExit(f"{args.report}: budgets {budgets}; choose one with --budget")
    budget_b = args.budget_b if args.budget_b is not None else budget
    a = {r["seed"]: r for r in runs if r["preset"] == args.a and r["budget_minutes"] == budget}
    b = {r["seed"]: r for r in runs if r["preset"] == args.b and r["budget_minutes"] == budget_b}
    seeds = sorted(set(a) & set(b))
    at = f"{budget:g} min" if budget_b == budget else f"{budget:g} min against {budget_b:g} min"
    if len(seeds) < 2:
        raise SystemExit(f"{args.report}: {args.a} and {args.b} share {len(seeds)} seed(s) at {at}; "
                         "a paired interval needs 2 or more")
    print(f"{args.a} against {args.b}, {at}, seeds {seeds}, paired:")
    for m, lower in METRICS:
        d = paired_difference([a[s][m] for s in seeds], [b[s][m] for s in seeds])
        print(f"  {m}: {d.value:+.4g} [{d.low:+.4g}, {d.high:+.4g}] {verdict(d, lower_is_better=lower)}")


if __name__ == "__main__":
    main()
