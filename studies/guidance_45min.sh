#!/bin/sh
# Issue 21, item 5 (guidance against diversity, where MSF is behind): the base's guidance of the three
# 45-minute `demo` models of the emoji comparison (studies/compare_emoji.sh), 2 against the paper's
# 3, at the paper's sampler otherwise (the models carry it), 1,000 class-balanced samples each, the
# same labels and noise at both values. Writes runs/compare_emoji/sweep45/demo_seed<s>/ (sweep.md,
# .csv); docs/compare_emoji.md has the table. About 8 minutes a model on one core.
set -e
cd "$(dirname "$0")/.."
for s in ${SEEDS:-0 1 2}; do
  .venv/bin/msf sweep runs/compare_emoji/runs/demo/seed$s/45min/model --ref emoji --scale 0 \
    --cfg-values "${CFG_VALUES:-2,3}" --num-samples 1000 --precision bf16 --feature-precision bf16 \
    --metrics fid,kid,pr,cas --device cpu --out runs/compare_emoji/sweep45/demo_seed$s
done
