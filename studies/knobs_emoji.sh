#!/bin/sh
# Issue 18, item 1: MSF's own knobs at equal training wall-clock on the built-in emoji (rates measured
# side by side), against its K = 1 DiT (dit-demo, the first preset, the baseline of every verdict):
#   base size      demo (16 of 32 px), demo+base20 (five eighths), demo-paper-ratio (24: three quarters);
#   compute split  demo+deepbase (base 8 blocks, not 6), demo+lightres (residual 2 blocks, not 4);
#   prior noise    demo-paper-ratio+priornoise (conditioning noise 0.2 on the prior: the exposure gap
#                  docs/compare_emoji.md found for the 24 px base), demo+priornoise (the same on 16 px);
#   normalisation  demo+nonorm (components at their own variance, not scaled to unit std);
#   step split     demo+papersplit (the residual trains 5 steps for every 8 of the base: the paper's
#                  400K and 250K; msf compare reads train.scale_steps as proportions).
# Presets added later share the kept rates of presets of the same work, or are measured beside one.
# Every run samples at its preset's defaults. Resumable: run it again to continue, or with more seeds;
# with --report, tables only. BUDGETS and SEEDS (default 5 and 0) choose the budgets in minutes and the
# training seeds. Results: $OUT/knobs/compare.{md,json} and plots, for this study's presets.
# The emoji studies (knobs_emoji.sh, recipe_emoji.sh, levers_emoji.sh, studies.sh) share one folder of
# runs, OUT (default runs/emoji_studies): one set of rates, so one step count per preset, and one set of
# demo and dit-demo runs that every variant is judged against (made once, not once a study).
set -e
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/emoji_studies}"
exec .venv/bin/msf compare --data emoji --budgets "${BUDGETS:-5}" --seeds "${SEEDS:-0}" --num-samples 1000 \
    --out "$OUT" --report-to "$OUT/knobs" \
    --presets dit-demo,demo,demo+base20,demo-paper-ratio,demo-paper-ratio+priornoise,demo+deepbase,demo+lightres,\
demo+nonorm,demo+priornoise,demo+papersplit \
    "demo+base20:model.scales.0.image_size=20" \
    "demo-paper-ratio+priornoise:model.prior_noise=0.2" \
    "demo+deepbase:model.scales.0.depth=8" \
    "demo+lightres:model.scales.1.depth=2" \
    "demo+nonorm:model.normalize=none" "demo+priornoise:model.prior_noise=0.2" \
    "demo+papersplit:train.scale_steps=[8,5]" "$@"
