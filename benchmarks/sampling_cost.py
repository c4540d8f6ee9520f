"""MSF's sampling cost against DiT-XL/2: FLOPs per image (counted) and time per image (measured).

The ``paper-imagenet256`` model at the paper's settings (scale 1: 100 steps, CFG 1.4;
scale 2: 50 steps, no CFG; also scale 2 at 10 steps, the paper's Table 5) against
``dit-xl2`` at 100 and 250 steps with CFG. Random weights; bf16 on this machine.

What is timed: the latent generation only. Both pipelines are built with an identity
autoencoder at the SD VAE's latent shapes (4 channels; 24 x 24 and 32 x 32 latents),
so no VAE is loaded; the VAE decode, the same for both models, is excluded.

How: a full 100-step DiT-XL/2 sample at batch 8 takes ~15 minutes here, so each network
is timed for one evaluation at the exact batch the sampler feeds it (CFG batches the
two branches: 2B; no CFG: B), all networks interleaved, median of ``--repeats``; then

    time per image = sum over scales of  evaluations x time per evaluation / batch.

That extrapolation is checked against real ``MSFPipeline.sample`` calls with
``--check-steps`` steps per scale (overhead = measured / predicted - 1).

Two precision paths, both timed: ``autocast`` (fp32 weights under bf16 autocast:
``sample(precision="bf16")``) and ``bf16 weights`` (``sample(nets=...)`` with
``msf.speed.inference_copy``); ``--paths compiled`` adds ``compile_for_inference``
(bf16 weights, inductor with frozen weights; its compilation is in the warm-up, untimed).
The autocast path is timed in steady state: the sampler runs all steps of a scale in
one autocast region, whose cache casts each fp32 weight to bf16 once, not per step.
``--load N`` times every path a second time, interleaved with the first, while N
processes spin on the CPU: how a shared machine changes each network and the ratio.

    python benchmarks/sampling_cost.py --batch 8 --repeats 3
    python benchmarks/sampling_cost.py --batch 1 --repeats 5
    python benchmarks/sampling_cost.py --batch 8 --paths compiled
    python benchmarks/sampling_cost.py --batch 8 --paths bf16 --load 1   # + timed beside a busy process
    python benchmarks/sampling_cost.py --batch 64 --device cuda          # on a GPU
    python benchmarks/sampling_cost.py --quick     # smoke run: narrow, shallow networks
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing as mp
import statistics
import time

import torch
from timing import interleaved, machine  # benchmarks/timing.py, beside this script

from msf.config import ModelConfig, SamplerSettings
from msf.interfaces.info import scale_infos
from msf.method.autoencoder import IdentityAutoencoder
from msf.method.pipeline import MSFPipeline, autocast
from msf.presets import preset
from msf.speed import compile_for_inference, inference_copy

# (label, sampler settings) for each setting compared: the pipeline's own SamplerSettings.
MSF_SETTINGS = [("paper: 100 CFG 1.4 + 50", SamplerSettings((100, 50), (1.4, 1.0), ("euler", "euler"))),
                ("scale 2 at 10 steps", SamplerSettings((100, 10), (1.4, 1.0), ("euler", "euler"))),
                # msf's default since issue 17: 2nd-order Adams-Bashforth on a shifted grid
                ("msf default: 25 ab2 shift 2 CFG 1.4 + 10",
                 SamplerSettings((25, 10), (1.4, 1.0), ("ab2", "euler"), (2.0, 1.0)))]
DIT_SETTINGS = [("100 steps CFG 1.5", SamplerSettings((100,), (1.5,), ("euler",))),
                ("250 steps CFG 1.5", SamplerSettings((250,), (1.5,), ("euler",))),
                ("msf default: 25 ab2 shift 2 CFG 1.5", SamplerSettings((25,), (1.5,), ("ab2",), (2.0,)))]


def shrink(cfg: ModelConfig) -> ModelConfig:
    """--quick: same tokens and steps, networks 256 wide and ~1/6 as deep."""
    cfg = dataclasses.replace(cfg, scales=[
        dataclasses.replace(s, width=256, heads=4, depth=max(1, s.depth // 6)) for s in cfg.scales])
    return cfg


def build(cfg: ModelConfig, device: torch.device) -> MSFPipeline:
    """A pipeline at the config's latent shapes with an identity autoencoder (no VAE)."""
    pipe = MSFPipeline(cfg, autoencoder=IdentityAutoencoder(channels=cfg.autoencoder.channels))
    with torch.no_grad():  # small random weights: adaLN-Zero's zeros would skip real work
        for p in pipe.networks.parameters():
            p.normal_(0.0, 0.02)
    return pipe.to(device).eval()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer sees it (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_image(cfg: ModelConfig, sampler: SamplerSettings) -> tuple[int, list]:
    cfg = dataclasses.replace(cfg, scales=[
        dataclasses.replace(s, steps=n, cfg_scale=w)
        for s, n, w in zip(cfg.scales, sampler.steps, sampler.cfg_scale)])
    infos = scale_infos(cfg)
    return sum(i.flops_per_sample for i in infos), [i.forwards_per_sample for i in infos]


def eval_inputs(pipe: MSFPipeline, k: int, batch: int, cfg_scale: float):
    """The arguments the sampler passes to scale k's network: CFG doubles the batch."""
    cfg = pipe.config
    fed = 2 * batch if cfg_scale != 1.0 else batch
    n, c = cfg.latent_sizes[k], cfg.autoencoder.channels
    dev = pipe.device
    x = torch.randn(fed, c, n, n, device=dev)
    t = torch.full((fed,), 0.5, device=dev)
    y = torch.randint(0, cfg.num_classes, (fed,), device=dev)
    prior = torch.randn(fed, c, n, n, device=dev) if pipe.networks[k].prior_channels else None
    return fed, (x, t, y, prior)


def _spin(on) -> None:
    while True:
        on.wait()
        for _ in range(100_000):  # a few ms of pure Python between checks
            pass


class BusyLoad:
    """``n`` processes that keep a core each busy while switched on: a shared machine."""

    def __init__(self, n: int):
        ctx = mp.get_context("fork")
        self.on = ctx.Event()
        self.procs = [ctx.Process(target=_spin, args=(self.on,), daemon=True) for _ in range(n)]
        for p in self.procs:
            p.start()

    @contextlib.contextmanager
    def running(self):
        self.on.set()
        try:
            yield
        finally:
            self.on.clear()

    def close(self) -> None:
        for p in self.procs:
            p.terminate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check-steps", type=int, default=2, help="steps per scale of the real samples")
    ap.add_argument("--check-repeats", type=int, default=1)
    ap.add_argument("--paths", default="autocast,bf16",
                    help="comma-separated precision paths: autocast, bf16 (weights), compiled")
    ap.add_argument("--load", type=int, default=0,
                    help="also time every path beside this many busy processes")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--quick", action="store_true", help="smoke run: narrow, shallow networks")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    msf_cfg, dit_cfg = preset("paper-imagenet256").model, preset("dit-xl2").model
    if args.quick:
        msf_cfg, dit_cfg = shrink(msf_cfg), shrink(dit_cfg)
    pipes = {"MSF": build(msf_cfg, device), "DiT-XL/2": build(dit_cfg, device)}
    settings = {"MSF": MSF_SETTINGS, "DiT-XL/2": DIT_SETTINGS}
    B = args.batch
    print(f"# sampling cost{' (--quick: reduced networks)' if args.quick else ''}: batch {B}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{machine()} at start, {time.strftime('%Y-%m-%d')}\n")

    # Precision paths: (name, autocast precision, per-pipeline net replacements).
    wanted = args.paths.split(",")
    paths = []
    if "autocast" in wanted:
        paths.append(("autocast", "bf16", {m: None for m in pipes}))
    for name, label, make in (("bf16", "bf16 weights", inference_copy),
                              ("compiled", "compiled", compile_for_inference)):
        if name in wanted:
            paths.append((label, "fp32", {
                m: {k: make(n) for k, n in enumerate(p.networks)} for m, p in pipes.items()}))

    # --- one network evaluation per scale, at the batch the sampler feeds it, interleaved
    load = BusyLoad(args.load) if args.load else None
    checked = list(paths)  # the loaded paths are not checked against real samples
    if load:
        paths += [(f"{p[0]}, loaded", *p[1:]) for p in paths]
    cfg_of = {"MSF": MSF_SETTINGS[0][1].cfg_scale, "DiT-XL/2": DIT_SETTINGS[0][1].cfg_scale}
    fns, fed = {}, {}
    for m, pipe in pipes.items():
        for k, net in enumerate(pipe.networks):
            fed[m, k], inputs = eval_inputs(pipe, k, B, cfg_of[m][k])
            for path, precision, nets in paths:
                use = net if nets[m] is None else nets[m][k]
                busy = path.endswith(", loaded")

                def run(use=use, inputs=inputs, precision=precision, busy=busy) -> float:
                    with (load.running() if busy else contextlib.nullcontext()), torch.no_grad(), \
                            autocast(device, precision):
                        if precision != "fp32":
                            use(*inputs)  # fills autocast's weight-cast cache, as the first step does
                        synchronize(device)
                        t0 = time.perf_counter()
                        use(*inputs)
                        synchronize(device)
                        return time.perf_counter() - t0
                fns[m, k, path] = run
    t0 = time.perf_counter()
    try:
        times = interleaved(fns, args.repeats)
    finally:
        if load:
            load.close()
    per_eval = {key: statistics.median(v) for key, v in times.items()}
    print(f"(per-evaluation timing: {time.perf_counter() - t0:.0f} s)\n")
    print("## seconds per network evaluation (median of interleaved repeats)\n")
    print("| model | scale | tokens | depth x width | batch fed | " + " | ".join(p[0] for p in paths) + " |")
    print("|---|---|---|---|---|" + "---|" * len(paths))
    for m, pipe in pipes.items():
        for k, info in enumerate(scale_infos(pipe.config)):
            print(f"| {m} | {k} | {info.tokens} | {info.depth} x {info.width} | {fed[m, k]} | "
                  + " | ".join(f"{per_eval[m, k, p[0]]:.3f}" for p in paths) + " |")
    if load:
        print(f"\n## slowdown beside {args.load} busy process(es): loaded / idle seconds\n")
        print("| model | scale | " + " | ".join(p[0] for p in checked) + " |")
        print("|---|---|" + "---|" * len(checked))
        for m, pipe in pipes.items():
            for k in range(pipe.num_scales):
                print(f"| {m} | {k} | " + " | ".join(
                    f"{per_eval[m, k, f'{p[0]}, loaded'] / per_eval[m, k, p[0]]:.2f}"
                    for p in checked) + " |")

    def time_per_image(m: str, steps: tuple[int, ...], path: str) -> float:
        return sum(n * per_eval[m, k, path] for k, n in enumerate(steps)) / B

    def ratio(m: str, steps: tuple[int, ...], path: str, ref_steps: tuple[int, ...]) -> str:
        """Ratio of the medians to DiT-XL/2's; in brackets, the range of the per-repeat ratios."""
        def one(r, mm, st):
            return sum(n * times[mm, k, path][r] for k, n in enumerate(st))
        each = [one(r, m, steps) / one(r, "DiT-XL/2", ref_steps) for r in range(args.repeats)]
        med = time_per_image(m, steps, path) / time_per_image("DiT-XL/2", ref_steps, path)
        return f"{med:.3f} [{min(each):.2f}-{max(each):.2f}]"

    # --- FLOPs and time per image
    ref_steps = DIT_SETTINGS[0][1].steps
    ref_flops, _ = flops_per_image(dit_cfg, DIT_SETTINGS[0][1])
    print("\n## per image: counted FLOPs and extrapolated time; ratios to DiT-XL/2 at 100 steps\n")
    print("Time ratio: of the median times; in brackets the range of the ratio within each repeat.")
    print("FLOPs: matrix products (msf.interfaces.info), 1 multiply-add (MAC) = 2 FLOPs; per image, "
          "CFG's two branches counted. Time: latent generation only, VAE decode excluded.\n")
    print("| model | setting | evaluations per scale | GFLOPs | GMACs | FLOPs ratio | "
          + " | ".join(f"s/image {p[0]} | ratio {p[0]}" for p in paths) + " |")
    print("|---|---|---|---|---|---|" + "---|---|" * len(paths))
    for m in pipes:
        cfg = msf_cfg if m == "MSF" else dit_cfg
        for label, sampler in settings[m]:
            steps = sampler.steps
            flops, forwards = flops_per_image(cfg, sampler)
            row = f"| {m} | {label} | {' + '.join(map(str, forwards))} | {flops / 1e9:,.0f} " \
                  f"| {flops / 2e9:,.0f} | {flops / ref_flops:.3f} |"
            for path, _, _ in paths:
                row += f" {time_per_image(m, steps, path):.2f} " \
                       f"| {ratio(m, steps, path, ref_steps)} |"
            print(row)

    # --- check the extrapolation against real MSFPipeline.sample calls
    n = args.check_steps
    labels = torch.randint(0, 1000, (B,))
    checks = {}
    for path, precision, nets in checked:
        for m, pipe in pipes.items():
            w = list(settings[m][0][1].cfg_scale)

            def sample(pipe=pipe, w=w, precision=precision, nets=nets[m]):
                pipe.sample(labels, steps=n, cfg_scale=w, precision=precision, nets=nets)
                synchronize(device)
            checks[m, path] = sample
    stimes = interleaved(checks, args.check_repeats)
    print(f"\n## check: real MSFPipeline.sample calls, {n} steps per scale, batch {B}\n")
    print("| model | path | predicted s | measured s | overhead |")
    print("|---|---|---|---|---|")
    for (m, path), v in stimes.items():
        pred = time_per_image(m, [n] * pipes[m].num_scales, path) * B
        meas = statistics.median(v)
        print(f"| {m} | {path} | {pred:.2f} | {meas:.2f} | {meas / pred - 1:+.1%} |")


if __name__ == "__main__":
    main()
