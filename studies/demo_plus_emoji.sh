#!/bin/sh
# Issue 21, item 6: `make demo` before and after its recipe changed. Before: the `demo` preset at the demo's
# 1,500 steps (4.18 minutes of the emoji studies' measured rate). After: `demo-plus` (the `demo` model with
# learning rate 4e-3 and prior noise 0.2, the variant demo+lr4e-3+priornoise of recipe_emoji.sh) at its
# 1,800 steps (5 minutes). Both at both budgets, three seeds, so that the change of recipe (at equal time)
# and the extra minute (at equal recipe) can be told apart. Per-class accuracy in the report.
# Shares runs/emoji_studies with the other emoji studies (the 5-minute runs are recipe_emoji.sh's).
# Resumable; with --report, tables only. Results: $OUT/demo_plus/compare.{md,json} and plots.
set -e
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/emoji_studies}"
exec .venv/bin/msf compare --data emoji --budgets 4.18,5 --seeds "${SEEDS:-0,1,2}" --num-samples 1000 \
    --out "$OUT" --report-to "$OUT/demo_plus" --presets demo,demo+lr4e-3+priornoise \
    "demo+lr4e-3+priornoise:train.lr=4e-3" "demo+lr4e-3+priornoise:model.prior_noise=0.2" "$@"
