#!/bin/sh
# Issue 18, item 3: each training lever alone (AdamW's beta2 0.95 and weight decay 0.01 among them), for
# MSF (demo) and its K = 1 DiT (dit-demo) alike, at equal training wall-clock on the built-in emoji (rates
# measured side by side), three seeds. The recipe study's leading change, lr 4e-3 (recipe_emoji.sh, where
# demo+lr4e-3 is trained), is tried on the DiT too: a change that helps both is not an MSF result.
# The paper's recipe is each family's first run; a variant PRESET+LABEL is the preset with its overrides.
# Resumable: run it again to continue; with --report, tables only. Results: $OUT/levers/compare.{md,json}
# and plots, for this study's presets.
# The emoji studies (knobs_emoji.sh, recipe_emoji.sh, levers_emoji.sh, studies.sh) share one folder of
# runs, OUT (default runs/emoji_studies): one set of rates, so one step count per preset, and one set of
# demo and dit-demo runs that every variant is judged against (made once, not once a study).
set -e
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/emoji_studies}"
L='model.scales.*'
exec .venv/bin/msf compare --data emoji --budgets "${BUDGETS:-5}" --seeds "${SEEDS:-0,1,2}" --num-samples 1000 \
    --out "$OUT" --report-to "$OUT/levers" \
    --presets demo,demo+qknorm,demo+rmsnorm,demo+swiglu,demo+rope,demo+sd3shift,demo+cosine,demo+beta95,demo+wd,dit-demo,dit-demo+qknorm,dit-demo+rmsnorm,dit-demo+swiglu,dit-demo+rope,dit-demo+sd3shift,dit-demo+cosine,dit-demo+beta95,dit-demo+wd,demo+lr4e-3,dit-demo+lr4e-3 \
    "demo+qknorm:$L.qk_norm=true" "dit-demo+qknorm:$L.qk_norm=true" \
    "demo+rmsnorm:$L.norm=rmsnorm" "dit-demo+rmsnorm:$L.norm=rmsnorm" \
    "demo+swiglu:$L.mlp=swiglu" "dit-demo+swiglu:$L.mlp=swiglu" \
    "demo+rope:$L.pos_embed=rope" "dit-demo+rope:$L.pos_embed=rope" \
    "demo+sd3shift:train.time_shift_rule=sd3" "dit-demo+sd3shift:train.time_shift_rule=sd3" \
    "demo+cosine:train.cosine_loss_weight=0.1" "dit-demo+cosine:train.cosine_loss_weight=0.1" \
    "demo+beta95:train.betas=[0.9,0.95]" "dit-demo+beta95:train.betas=[0.9,0.95]" \
    "demo+wd:train.weight_decay=0.01" "dit-demo+wd:train.weight_decay=0.01" \
    "demo+lr4e-3:train.lr=4e-3" "dit-demo+lr4e-3:train.lr=4e-3" "$@"
