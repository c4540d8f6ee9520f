"""Score a model: a class-balanced sample set, then FID and KID with 95% intervals, the real-against-real
floor, and class accuracy, against the built-in emoji (or --ref).

    python examples/evaluate.py runs/demo/model --num-samples 1000
"""

import argparse

from msf.evaluation.metrics import evaluate, format_results
from msf.evaluation.reference import build_reference
from msf.evaluation.sample_set import sample_set
from msf.interfaces.load import load_pipeline

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--ref", default=None, help="reference .npz (default: the training data, built here)")
p.add_argument("--num-samples", type=int, default=1000)
p.add_argument("--num-ref", type=int, default=None, help="reference images drawn from the data (default all)")
p.add_argument("--metrics", default="fid,kid,cas")
p.add_argument("--out", default="runs/eval")
args = p.parse_args()

pipe = load_pipeline(args.model)
ref = args.ref or build_reference("emoji", f"{args.out}/ref.npz", pipe.config.image_size,
                                  num_images=args.num_ref)
sample_set(pipe, f"{args.out}/samples.npz", args.num_samples, seed=0, overwrite=True)
result = evaluate(f"{args.out}/samples.npz", ref, metrics=tuple(args.metrics.split(",")),
                  feature_precision="bf16", bootstraps=50)
print(format_results(result))
