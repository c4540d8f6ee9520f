#!/bin/sh
# Issue 21, item 5: MSF (demo: base 16 of 32 px; demo-paper-ratio: base 24 of 32, the paper's
# proportion) against its K = 1 DiT (dit-demo, the baseline: the first preset) on the built-in
# emoji, at equal training wall-clock on this machine, three budgets, three seeds each.
# Each run is also sampled at equal cost (dit-demo and demo-paper-ratio with fewer steps, down to
# demo's sampling FLOPs). Every run samples with the paper's sampler (Euler, uniform grid; the presets'
# defaults when the study began, before issue 17 made them cheaper). Resumable: run it again to continue.
# Results: runs/compare_emoji/compare.{md,json}, plots.
set -e
cd "$(dirname "$0")/.."
exec .venv/bin/msf compare --presets dit-demo,demo,demo-paper-ratio --data emoji \
    --budgets 5,15,45 --seeds 0,1,2 --num-samples 1000 --out runs/compare_emoji --equal-cost --sampler paper "$@"
