#!/bin/sh
# Every quality study of docs/, in the order we want their answers, one at a time (they time training
# on this machine: two at once would each run many times slower). Each study resumes where it stopped,
# so this script can be started again in every session until it ends; finished runs are skipped.
# A fresh checkout has no runs/: first bring back the finished runs from the committed reports with
# scripts/restore_runs.py (see docs/levers.md, "Running the studies"), or everything is trained again.
#   1. knobs_emoji.sh    MSF's own knobs, 10 variants x 3 seeds x 5 min   (issue 18, item 1)  done
#   2. levers_emoji.sh   the training levers (issue 18, item 3), a seed at a time: the DiT's at seed 0,
#                        then every lever at seed 1, then 2, then MSF's again at 0 (its first screen's
#                        runs were lost)                                    done
#   2b. levers_best_emoji.sh  each family's best combination, three seeds, and the DiT's cosine term
#                        with uniform times (`dit-demo-plus`'s candidate)   (issue 18, items 3-4)  done
#   3. the knobs that won at 5 minutes, at 15: demo, demo+lightres, demo+priornoise, 3 seeds
#      (issue 18, item 1: does the answer move with budget?)               done
#   4. compare_emoji.sh  MSF against its DiT at 5, 15 and 45 minutes      (issue 21, item 5)  done
#   4b. recipe_3x_emoji.sh  `demo-plus` at 15 minutes beside them, for issue 18's 3x target
#                        (against `demo` at 45)                            done
#   4c. demo-paper-ratio+priornoise at 45 minutes beside the comparison's runs, paired with
#                        demo-paper-ratio: does prior noise close the exposure gap the 45-minute
#                        `why` found (docs/compare_emoji.md)?                ~2.5 h
#   5. recipe_emoji.sh   the demo's recipe: seeds 1-2 of the single-seed variants (drop20, wide; ema999
#                        and lr8e-3, which diverged at seed 0) remain      (issue 21, item 6) ~1.2 h
#   demo_plus_emoji.sh   `make demo` before and after                     (issue 21)  done
# studies/guidance_demo.py (the demo's guidance, issue 21 item 6) is done and not rerun here.
# All but compare_emoji.sh share runs/emoji_studies: one set of rates, and demo and dit-demo run once,
# by the first.
# The hours are for a 2-core CPU (about 7 minutes a run: 5 of training, 2 to sample and score).
# Stop it with Ctrl-C or `kill -TERM` (a training leg saves its checkpoint); `kill -9` loses at most
# the last 5 minutes of a leg. After a study advances, `sh benchmarks/<study>.sh --report` (with the
# same SEEDS) writes its tables and plots from the finished runs, for docs/ (runs/emoji_studies/<study>/).
set -e
cd "$(dirname "$0")/.."
SEEDS=0,1,2 sh studies/knobs_emoji.sh
FAMILIES=dit-demo SEEDS=0 sh studies/levers_emoji.sh
SEEDS=1 sh studies/levers_emoji.sh
sh studies/levers_best_emoji.sh
SEEDS=2 sh studies/levers_emoji.sh
FAMILIES=demo SEEDS=0 sh studies/levers_emoji.sh
.venv/bin/msf compare --data emoji --budgets 15 --seeds 0,1,2 --num-samples 1000 --out runs/emoji_studies \
    --report-to runs/emoji_studies/knobs15 --presets demo,demo+lightres,demo+priornoise \
    "demo+lightres:model.scales.1.depth=2" "demo+priornoise:model.prior_noise=0.2"
sh studies/compare_emoji.sh
sh studies/recipe_3x_emoji.sh
.venv/bin/msf compare --data emoji --budgets 45 --seeds 0,1,2 --num-samples 1000 --out runs/compare_emoji \
    --sampler paper --report-to runs/compare_emoji/priornoise45 \
    --presets demo-paper-ratio,demo-paper-ratio+priornoise "demo-paper-ratio+priornoise:model.prior_noise=0.2"
SEEDS=0,1,2 sh studies/demo_plus_emoji.sh
SEEDS=0,1,2 sh studies/recipe_emoji.sh
