"""One GPU check for a person with one NVIDIA GPU (issue 16): correctness first, then speed.

    .venv/bin/python scripts/gpu_check.py --out gpu_check.md          # on the GPU, ~5-8 minutes
    .venv/bin/python scripts/gpu_check.py --toy --out toy.md          # anywhere, tiny sizes, CPU

Sections, each reported even when an earlier one failed:

1. environment: torch, CUDA, driver, the GPU, the architectures the wheel was built for, TF32;
2. attention at the paper's head dims (72 = 1152/16, 80 = 1280/16): which SDPA kernels run, fwd+bwd time;
3. a paper-size training step per network (MSF scale 1 and 2, DiT-XL/2): images/s and peak memory,
   with and without activation checkpointing;
4. a tiny train, resume and sample on the device: resumed == uninterrupted within tolerance;
5. determinism: the same 2 steps twice, the largest weight difference;
6. the benchmarks on the device (``benchmarks/sampling_cost.py --quick``, ``backbone.py --quick``,
   ``compile_loop.py``: the training loop eager against compiled, at the paper's network sizes);
7. the GPU tests (``MSF_TEST_DEVICE=cuda pytest tests/test_gpu.py``), not with ``--toy``.

``--toy`` runs every section at tiny sizes on the CPU (CI runs it that way, ``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
report: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    report.append(line)


def section(title: str, fn, *args) -> None:
    say(f"\n## {title}\n")
    started = time.perf_counter()
    try:
        fn(*args)
    except Exception:  # every section is reported, whatever an earlier one did
        say("FAILED:\n```\n" + traceback.format_exc(limit=4) + "```")
    say(f"\n({time.perf_counter() - started:.1f} s)")


def environment(dev: torch.device) -> None:
    say(f"- torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'}")
    if dev.type != "cuda":
        say(f"- device: {dev} ({torch.get_num_threads()} threads)")
        return
    p = torch.cuda.get_device_properties(dev)
    say(f"- device: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
        f"{p.multi_processor_count} SMs")
    say(f"- wheel's architectures: {', '.join(torch.cuda.get_arch_list())}")
    say(f"- TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.used,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        say(f"- nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    except (OSError, subprocess.TimeoutExpired) as e:
        say(f"- nvidia-smi: not run ({e})")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def attention_kernels(dev: torch.device, toy: bool) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, tokens = (2, 16) if toy else (32, 256)
    dtype = torch.bfloat16
    backends = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
    cases = [(hd, 16, b) for hd in (72, 80) for b in backends]

    def once(head_dim: int, heads: int, backend) -> float:
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=dev, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        with sdpa_kernel(backend):
            _sync(dev)
            t0 = time.perf_counter()
            torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
            _sync(dev)
        return time.perf_counter() - t0

    # every kernel runs 3 times before any is timed (the first kernel timed once took 14.9 ms against
    # 0.75 a moment later); then rounds over all kernels in turn, the median kept
    times: dict[tuple, list[float] | str] = {}
    for case in cases:
        try:
            for _ in range(3):
                once(*case)
            times[case] = []
        except RuntimeError as e:
            times[case] = f"not available ({str(e).splitlines()[0][:60]})"
    for _ in range(3 if toy else 20):
        for case, got in times.items():
            if isinstance(got, list):
                got.append(once(*case))
    say("| head dim | heads | backend | fwd+bwd ms (median) | min | max |\n|---|---|---|---|---|---|")
    for (head_dim, heads, backend), got in times.items():
        cells = (got if isinstance(got, str) else
                 " | ".join(f"{f(got) * 1e3:.2f}" for f in (statistics.median, min, max)))
        say(f"| {head_dim} | {heads} | {backend.name} | {cells} |")


def training_steps(dev: torch.device, toy: bool) -> None:
    from msf.method.flow import rectified_flow_loss
    from msf.method.pipeline import autocast, build_scale_networks
    from msf.presets import preset

    names = ["tiny"] if toy else ["paper-imagenet256", "dit-xl2"]
    batch = 2 if toy else 32
    say("| network | batch | checkpointing | images/s | peak memory GiB |\n|---|---|---|---|---|")
    for name in names:
        cfg = preset(name).model
        for k, net in enumerate(build_scale_networks(cfg)):
            net = net.to(dev)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=dev.type == "cuda" or None)
            n, ch = cfg.latent_sizes[k], cfg.autoencoder.channels
            for checkpointing in (False, True):
                net.grad_checkpointing = checkpointing
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                times = []
                for _ in range(3):
                    c = torch.randn(batch, ch, n, n, device=dev)
                    prior = torch.randn_like(c) if net.prior_channels else None
                    y = torch.randint(0, cfg.num_classes, (batch,), device=dev)
                    t = torch.rand(batch, device=dev)
                    _sync(dev)
                    t0 = time.perf_counter()
                    with autocast(dev, "bf16"):
                        loss = rectified_flow_loss(net, c, y, t, prior)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    _sync(dev)
                    times.append(time.perf_counter() - t0)
                peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
                rate = batch / min(times[1:])
                say(f"| {name} scale {k} | {batch} | {checkpointing} | {rate:.1f} | {peak:.1f} |")
            del net, opt
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def train_resume_sample(dev: torch.device) -> None:
    from msf.config import apply_overrides
    from msf.presets import preset
    from msf.training.train import train

    base = ["train.tensorboard=false", "train.lr=3e-3", "train.precision=bf16", "train.lr_schedule=constant"]
    with tempfile.TemporaryDirectory() as d:
        train(apply_overrides(preset("tiny"), [*base, "train.steps=3", f"train.out_dir={d}/a"]),
              device=str(dev), progress=False)
        resumed = train(apply_overrides(preset("tiny"), [*base, "train.steps=6", f"train.out_dir={d}/a"]),
                        device=str(dev), progress=False, resume=True)
        whole = train(apply_overrides(preset("tiny"), [*base, "train.steps=6", f"train.out_dir={d}/b"]),
                      device=str(dev), progress=False)
        diff = max((a - b).abs().max().item() for a, b in zip(resumed.pipeline.parameters(),
                                                               whole.pipeline.parameters()))
        verdict = "bit for bit" if diff == 0 else "within tolerance" if diff < 1e-3 else "TOO LARGE"
        say(f"- resumed at step 3 to 6 against 6 uninterrupted steps: largest EMA weight difference "
            f"{diff:.2e} ({verdict})")
        images = resumed.pipeline.sample([0, 1, 2, 3], precision="bf16")
        say(f"- sample: {tuple(images.shape)}, finite {bool(torch.isfinite(images).all())}, "
            f"range [{images.min():.2f}, {images.max():.2f}]")
        # sharded checkpoints (DCP) written on the GPU: resume, and read back whole by
        # msf.interfaces.load, whose
        # unpickler admits DCP's own metadata classes only
        from msf.interfaces.load import load_pipeline

        sharded = [*base, "train.ckpt_format=sharded"]
        train(apply_overrides(preset("tiny"), [*sharded, "train.steps=3", f"train.out_dir={d}/c"]),
              device=str(dev), progress=False)
        again = train(apply_overrides(preset("tiny"), [*sharded, "train.steps=6", f"train.out_dir={d}/c"]),
                      device=str(dev), progress=False, resume=True)
        diff = max((a - b).abs().max().item() for a, b in zip(again.pipeline.parameters(),
                                                               whole.pipeline.parameters()))
        loaded = load_pipeline(f"{d}/c", device=dev)
        same = all(torch.equal(a, b) for a, b in zip(loaded.parameters(), again.pipeline.parameters()))
        say(f"- sharded checkpoint, resumed at step 3 to 6: largest EMA weight difference {diff:.2e}; "
            f"read back whole by msf.interfaces.load: {'identical' if same else 'DIFFERENT'}")


def determinism(dev: torch.device) -> None:
    from msf.config import apply_overrides
    from msf.presets import preset
    from msf.training.train import train

    runs = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(2):
            cfg = apply_overrides(preset("tiny"), ["train.steps=2", "train.precision=bf16",
                                                   f"train.out_dir={d}/{i}"])
            runs.append(train(cfg, device=str(dev), progress=False, save=False).pipeline)
    diff = max((a - b).abs().max().item() for a, b in zip(runs[0].parameters(), runs[1].parameters()))
    say(f"- the same 2 steps twice: largest weight difference {diff:.2e} "
        f"({'deterministic' if diff == 0 else 'not bit-exact: non-deterministic kernels'})")


def benchmarks(dev: torch.device, toy: bool) -> None:
    runs = [["sampling_cost.py", "--quick", "--device", str(dev)]]
    if not toy:
        runs.append(["backbone.py", "--quick", "--sections", "1,3,4", "--device", str(dev)])
        # the real loop eager against train.compile=true at the paper's network sizes (2-3 minutes)
        runs.append(["compile_loop.py", "--preset", "demo-paper-ratio", "--paper-networks", "--batch", "128",
                     "--steps", "100", "--log-every", "10", "--device", str(dev)])
    for args in runs:
        r = subprocess.run([sys.executable, *args], cwd=ROOT / "benchmarks", capture_output=True, text=True,
                           timeout=600)
        say(f"### benchmarks/{' '.join(args)}\n\n```\n{(r.stdout + r.stderr)[-3000:].strip()}\n```")


def gpu_tests() -> None:
    env = dict(os.environ, MSF_TEST_DEVICE="cuda")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    say(f"```\n{(r.stdout + r.stderr)[-3000:].strip()}\n```")
    if r.returncode:
        raise RuntimeError(f"tests/test_gpu.py failed (exit {r.returncode})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="tiny sizes on the CPU (for CI and a dry run)")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --toy")
    ap.add_argument("--out", default="gpu_check.md", help="where the report is written")
    args = ap.parse_args()
    dev = torch.device(args.device or ("cpu" if args.toy else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available here; run with --toy for a dry run on the CPU")
    sizes = "toy sizes" if args.toy else "paper sizes"
    say(f"# msf GPU check ({sizes}, {dev}), {time.strftime('%Y-%m-%d %H:%M')}")
    section("1. Environment", environment, dev)
    section("2. Attention kernels at the paper's head dims (bf16)", attention_kernels, dev, args.toy)
    section("3. Training step per network (bf16 autocast, AdamW)", training_steps, dev, args.toy)
    section("4. Train, resume, sample", train_resume_sample, dev)
    section("5. Determinism", determinism, dev)
    section("6. Benchmarks", benchmarks, dev, args.toy)
    if dev.type == "cuda":
        section("7. GPU tests", gpu_tests)
    Path(args.out).write_text("\n".join(report) + "\n")
    print(f"\nreport: {args.out}")
    return 1 if any(line.startswith("FAILED") for line in report) else 0


if __name__ == "__main__":
    sys.exit(main())
