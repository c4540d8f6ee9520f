#!/bin/sh
# The latent space at our scale, on the built-in 64 x 64 emoji, at equal training wall-clock on this
# machine, three seeds: latent-space MSF (latent-demo, the paper's image base E(resize(x, 48))) against
# its K = 1 DiT (dit-latent-demo, the baseline: the first preset); the same MSF with the latent base
# down(E(x), 12) (latent-demo+latentbase); and the same MSF in pixel space (demo64: same networks, same
# token counts). Every preset samples at its defaults; --equal-cost also samples the costlier ones
# at the cheapest one's FLOPs. Resumable: run it again to continue.
# Results: runs/compare_latent/compare.{md,json}, plots.
set -e
cd "$(dirname "$0")/.."
exec .venv/bin/msf compare --presets dit-latent-demo,latent-demo,latent-demo+latentbase,demo64 \
    --data emoji64 --budgets 5 --seeds 0,1,2 --num-samples 1000 --out runs/compare_latent --equal-cost \
    latent-demo+latentbase:model.base_mode=latent "$@"
