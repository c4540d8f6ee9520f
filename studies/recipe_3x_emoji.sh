#!/bin/sh
# Issue 18's second target: does the improved recipe (`demo-plus`) reach, in a third of the time, the
# FID that the paper's recipe (`demo`) reaches at the comparison's longest budget? `demo-plus` at 15
# minutes, three seeds, in the folder of studies/compare_emoji.sh (same kept rates, same reference,
# the paper's sampler), to set against `demo` at 45 minutes there. The report of both budgets, and the
# paired difference (docs/levers.md, "The 3x target"):
#   sh studies/recipe_3x_emoji.sh --report --budgets 15,45 --report-to docs/levers/recipe_3x
#   python scripts/paired.py docs/levers/recipe_3x/compare.json demo-plus demo --budget 15 --budget-b 45
# Resumable: run it again to continue.
set -e
cd "$(dirname "$0")/.."
exec .venv/bin/msf compare --presets demo,demo-plus --data emoji --budgets 15 --seeds 0,1,2 \
    --num-samples 1000 --out runs/compare_emoji --sampler paper "$@"
