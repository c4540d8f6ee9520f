#!/bin/sh
# Issue 18, item 3: each training lever alone (AdamW's beta2 0.95 and weight decay 0.01 among them), for
# MSF (demo) and its K = 1 DiT (dit-demo) alike, at equal training wall-clock on the built-in emoji (rates
# measured side by side), three seeds. The recipe study's leading change, lr 4e-3 (recipe_emoji.sh, where
# demo+lr4e-3 is trained), is tried on the DiT too: a change that helps both is not an MSF result; so is
# the paper's uniform time sampler in place of the emoji presets' logit-normal one (recipe_emoji.sh).
# The paper's recipe is each family's first run; a variant FAMILY+LABEL is the family's preset with the
# lever's overrides. FAMILIES (default "demo dit-demo") runs one family alone, e.g. FAMILIES=dit-demo,
# and LEVERS (default all) some levers alone, e.g. LEVERS="swiglu cosine".
# Resumable: run it again to continue; with --report, tables only. Results: $OUT/levers/compare.{md,json}
# and plots, for this study's presets.
# The emoji studies (knobs_emoji.sh, recipe_emoji.sh, levers_emoji.sh, studies.sh) share one folder of
# runs, OUT (default runs/emoji_studies): one set of rates, so one step count per preset, and one set of
# demo and dit-demo runs that every variant is judged against (made once, not once a study).
set -ef  # -f: no globbing of the overrides' brackets
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/emoji_studies}"
L='model.scales.*'
PRESETS=
VARIANTS=
for F in ${FAMILIES:-demo dit-demo}; do
    PRESETS="$PRESETS,$F"
    for LEVER in "qknorm:$L.qk_norm=true" "rmsnorm:$L.norm=rmsnorm" "swiglu:$L.mlp=swiglu" \
                 "rope:$L.pos_embed=rope" "sd3shift:train.time_shift_rule=sd3" \
                 "cosine:train.cosine_loss_weight=0.1" "beta95:train.betas=[0.9,0.95]" \
                 "wd:train.weight_decay=0.01" "lr4e-3:train.lr=4e-3" \
                 "uniform:train.time_sampler=uniform"; do
        case " ${LEVERS:-${LEVER%%:*}} " in *" ${LEVER%%:*} "*) ;; *) continue ;; esac
        PRESETS="$PRESETS,$F+${LEVER%%:*}"
        VARIANTS="$VARIANTS $F+$LEVER"
    done
done
# shellcheck disable=SC2086  # VARIANTS: one word per variant, none with spaces
exec .venv/bin/msf compare --data emoji --budgets "${BUDGETS:-5}" --seeds "${SEEDS:-0,1,2}" --num-samples 1000 \
    --out "$OUT" --report-to "$OUT/levers" --presets "${PRESETS#,}" $VARIANTS "$@"
