#!/bin/sh
# Issue 18, items 3-4: the best combination for each family, three seeds, after the levers alone
# (levers_emoji.sh). MSF: SwiGLU, the one lever ahead of `demo` at the first two seeds (chosen then),
# stacked on `demo-plus`'s recipe (lr 4e-3, prior noise 0.2: recipe_emoji.sh), judged against that
# recipe and, as a whole, against `demo`. The DiT: SwiGLU with the cosine velocity term, its two leaders
# at seed 0, judged against SwiGLU alone and against `dit-demo`; and the cosine term with the paper's uniform
# times, the two levers ahead of `dit-demo` by the intervals at two seeds (FID and class accuracy), the
# candidate recipe of `dit-demo-plus`. Same folder of runs (and rates) as the other emoji studies; report:
# $OUT/levers_best/compare.{md,json} and plots.
set -ef  # -f: no globbing of the overrides
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/emoji_studies}"
L='model.scales.*'
MSF=demo,demo+lr4e-3+priornoise,demo+lr4e-3+priornoise+swiglu
DIT=dit-demo,dit-demo+swiglu,dit-demo+swiglu+cosine,dit-demo+cosine,dit-demo+uniform,dit-demo+cosine+uniform
exec .venv/bin/msf compare --data emoji --budgets "${BUDGETS:-5}" --seeds "${SEEDS:-0,1,2}" --num-samples 1000 \
    --out "$OUT" --report-to "$OUT/levers_best" \
    --presets "$MSF,$DIT" \
    "demo+lr4e-3+priornoise:train.lr=4e-3" "demo+lr4e-3+priornoise:model.prior_noise=0.2" \
    "demo+lr4e-3+priornoise+swiglu:train.lr=4e-3" "demo+lr4e-3+priornoise+swiglu:model.prior_noise=0.2" \
    "demo+lr4e-3+priornoise+swiglu:$L.mlp=swiglu" \
    "dit-demo+swiglu:$L.mlp=swiglu" \
    "dit-demo+swiglu+cosine:$L.mlp=swiglu" "dit-demo+swiglu+cosine:train.cosine_loss_weight=0.1" \
    "dit-demo+cosine:train.cosine_loss_weight=0.1" "dit-demo+uniform:train.time_sampler=uniform" \
    "dit-demo+cosine+uniform:train.cosine_loss_weight=0.1" \
    "dit-demo+cosine+uniform:train.time_sampler=uniform" "$@"
