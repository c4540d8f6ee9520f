"""The paper's claim at our scale: MSF against the single-scale DiT at equal training compute.

Trains the ``demo`` preset (MSF, two scales: a 16 px base and a 32 px residual) and
the ``dit-demo`` preset (one DiT on the 32 px image, the K = 1 case of the same code)
on the built-in emoji for the same wall-clock budget on this machine, samples both,
and reports FID, precision and recall against the training images, and sampling time
per image, side by side.

Equal wall-clock on a shared, noisy machine: each model's step rate is measured first
in short interleaved bursts, and each then trains for ``budget x rate`` steps. The table
also gives the wall-clock each run really took and its training FLOPs.

Samples use the training set's own labels (the emoji groups are imbalanced, 85-363
images), so FID compares like with like. FID is against all 1,870 training images; the
FID of one half of the data against the other half is printed as about the floor this
data allows at this sample size. Inception runs at ~0.4 s per image on 2 CPU cores, so
the default is 1,000 samples per model.

    python studies/equal_compute.py                 # 6 min of training per model
    python studies/equal_compute.py --quick         # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from timing import interleaved, machine  # benchmarks/timing.py

from msf.config import apply_overrides
from msf.evaluation.metrics import (
    compute_reference,
    evaluate,
    frechet_distance_from_features,
    load_feature_extractor,
)
from msf.evaluation.sample_set import sample_set
from msf.interfaces.info import model_info
from msf.interfaces.viz import save_sample_grid
from msf.presets import preset
from msf.training.data import load_builtin
from msf.training.train import train

MODELS = {"MSF (demo, 2 scales)": "demo", "DiT (dit-demo, 1 scale)": "dit-demo"}


def config(name: str, out: Path, steps: int, extra: list[str]):
    return apply_overrides(preset(name), [f"train.out_dir={out}", f"train.steps={steps}",
                                          "train.tensorboard=false", *extra])


def step_rates(out: Path, calib_steps: int, repeats: int, extra: list[str]) -> dict[str, float]:
    """Training steps per second of each model, from short interleaved runs (median)."""
    rates: dict[str, list[float]] = {n: [] for n in MODELS}
    for r in range(repeats):
        for label, name in MODELS.items():
            cfg = config(name, out / f"calib_{name}_{r}", calib_steps, extra)
            res = train(cfg, progress=False, save=False)
            rates[label].append(res.steps / res.seconds)
    return {n: statistics.median(v) for n, v in rates.items()}


def sampling_seconds_per_image(pipes: dict, labels: torch.Tensor, repeats: int) -> dict[str, float]:
    """Interleaved timed sample calls at the models' default settings, bf16 where native (median)."""
    # .cpu(): on a GPU the timer stops when the images are here, not when their kernels are queued
    fns = {n: (lambda p=p: p.sample(labels, seed=1, precision="auto").cpu()) for n, p in pipes.items()}
    return {n: statistics.median(t) / len(labels) for n, t in interleaved(fns, repeats).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-minutes", type=float, default=6.0, help="training wall-clock per model")
    ap.add_argument("--calib-steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/equal_compute")
    ap.add_argument("--docs", default=None, help="also write the sample grids here (e.g. docs)")
    ap.add_argument("--num-samples", type=int, default=1000, help="samples per model for the metrics")
    ap.add_argument("--quick", action="store_true", help="smoke run: 10 s budget, 50 samples, 100 references")
    ap.add_argument("overrides", nargs="*", help="train.* overrides applied to both models")
    args = ap.parse_args()
    if args.quick:
        args.budget_minutes, args.calib_steps, args.repeats, args.num_samples = 10 / 60, 10, 1, 50
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())

    data = load_builtin()
    n = args.num_samples
    # Reference: the training images (a subset in a smoke run); features computed once and kept.
    ref_images = data.images.numpy()[:100] if args.quick else data.images.numpy()
    extractor = load_feature_extractor()
    ref = out / f"ref_stats_{len(ref_images)}.npz"
    if not ref.is_file():
        src = out / "emoji32_ref.npz"
        np.savez(src, arr_0=ref_images)
        compute_reference(src, extractor, ref, progress=True)

    t0 = time.perf_counter()
    rates = step_rates(out, args.calib_steps, args.repeats, args.overrides)
    budget = args.budget_minutes * 60
    rows, pipes = {}, {}
    for label, name in MODELS.items():
        steps = max(1, round(budget * rates[label]))
        cfg = config(name, out / name, steps, args.overrides)
        res = train(cfg, progress=False, max_seconds=2 * budget, overwrite=True)
        pipes[label] = res.pipeline
        info = model_info(cfg.model)
        # forward + backward = 3 forwards, every scale once per step
        per_image = 3 * sum(s["flops_per_forward"] for s in info["scales"])
        train_flops = per_image * cfg.train.batch_size * res.steps
        rows[label] = {"preset": name, "steps": res.steps, "train_seconds": res.seconds,
                       "params": info["parameters"], "train_flops": train_flops,
                       "sample_flops": info["flops_per_sample"]}

    # Labels drawn as in the data (imbalanced groups), shuffled with a fixed seed.
    labels = torch.from_numpy(np.random.default_rng(0).permutation(data.labels.numpy())[:n])
    timing = sampling_seconds_per_image(pipes, labels[:64], args.repeats)
    with np.load(ref) as d:
        feats = d["features"]
    perm = np.random.default_rng(1).permutation(len(feats))
    m = min(n, len(feats) // 2)
    floor = {"fid": frechet_distance_from_features(feats[perm[:m]], feats[perm[m:2 * m]])}
    for label, pipe in pipes.items():
        name = MODELS[label]
        path = out / f"{name}_samples.npz"
        sample_set(pipe, path, n, labels=labels.numpy(), batch_size=128, seed=0, precision="auto",
                   progress=False, meta={"model": name})
        r = evaluate(str(path), str(ref), metrics=("fid", "kid", "pr"), extractor=extractor, progress=True)
        rows[label].update(fid=r["fid"], precision=r["precision"], recall=r["recall"], kid=r["kid"],
                           sec_per_image=timing[label], features=r["feature_network"])
        grid_labels = [c for c in range(pipe.config.num_classes) for _ in range(10)]
        grid = pipe.sample(grid_labels, seed=0, precision="auto")
        for where in [out] + ([Path(args.docs)] if args.docs else []):
            save_sample_grid(grid, grid_labels, pipe.config.class_names, where / f"equal_compute_{name}.png")

    print(f"\nMSF vs DiT at equal training wall-clock ({args.budget_minutes:.3g} min each), built-in emoji; "
          f"{machine()}, {time.strftime('%Y-%m-%d')}")
    print(f"FID of {m} training images against {m} others (about the floor here): {floor['fid']:.2f}; "
          f"{n} samples per model; features: {rows[next(iter(rows))]['features']}\n")
    cols = ["preset", "params", "steps", "train_seconds", "train_flops", "fid", "kid", "precision", "recall",
            "sample_flops", "sec_per_image"]
    print("| model | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for label, r in rows.items():
        cells = []
        for c in cols:
            v = r[c]
            if c in ("train_flops", "sample_flops"):
                cells.append(f"{v / 1e12:.2f} T" if c == "train_flops" else f"{v / 1e9:.2f} G")
            elif c == "params":
                cells.append(f"{v / 1e6:.1f}M")
            elif isinstance(v, float):
                cells.append(f"{v:.4g}")
            else:
                cells.append(str(v))
        print(f"| {label} | " + " | ".join(cells) + " |")
    msf, dit = rows[next(iter(MODELS))], rows[list(MODELS)[1]]
    print(f"\nsampling time MSF / DiT: {msf['sec_per_image'] / dit['sec_per_image']:.2f}; "
          f"FID MSF / DiT: {msf['fid'] / dit['fid']:.2f}; total {time.perf_counter() - t0:.0f} s")
    (out / "results.json").write_text(json.dumps({"rows": rows, "floor_fid": floor["fid"],
                                                  "rates": rates, "args": vars(args)}, indent=2, default=str))


if __name__ == "__main__":
    main()
