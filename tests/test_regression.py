"""A fixed run against numbers written before a refactoring: training and sampling unchanged.

``tests/fixtures/reference_run.safetensors`` holds the raw and EMA weights after 6 training
steps of a small two-scale model (prior noise, label dropout, std normalisation, warm-up and
cosine lr, gradient clipping) and 4 samples from it (Heun and Euler, guidance on the base).
Where the kernels round as they did where it was written (same torch, ATen CPU capability, threads,
and the same bits from a probe through the operations a step uses), a run must give the same bits;
elsewhere the same numbers to float tolerance. The CPU's name does not decide it: two "AMD EPYC"s, one
with AVX-512 and one with AVX2 only, round differently.

Rewrite it only for an intended change of behaviour, and say so in the commit:

    .venv/bin/python tests/test_regression.py --write
"""

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from msf.config import apply_overrides
from msf.presets import preset
from msf.training.train import train

FIXTURE = Path(__file__).parent / "fixtures" / "reference_run.safetensors"
OVERRIDES = [
    "train.steps=6", "train.batch_size=16", "train.lr=5e-3", "train.warmup_steps=2",
    "train.lr_schedule=cosine", "train.grad_clip=0.5", "train.class_dropout=0.3", "train.ema_decay=0.8",
    "train.precision=fp32", "train.log_every=2", "train.tensorboard=false", "model.prior_noise=0.1",
    "model.normalize=std", "model.scales.0.depth=1", "model.scales.1.depth=1",
]
SAMPLING = dict(steps=[3, 2], cfg_scale=[2.0, 1.0], solver=["heun", "euler"], seed=7)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} / torch {torch.__version__} / {torch.get_num_threads()} threads"


def kernels() -> str:
    """What decides a run's bits here: torch, ATen's CPU kernels, the threads, and the bits of a probe
    through matrix products, LayerNorm, GELU, softmax, a convolution and their gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g, requires_grad=True)
    w, k = torch.randn(96, 96, generator=g) / 10, torch.randn(4, 1, 3, 3, generator=g)
    h = F.gelu(F.layer_norm(x @ w, (96,)))
    out = F.conv2d((h @ h.T / 10).softmax(-1).view(1, 1, 64, 64), k)
    out.square().sum().backward()
    bits = torch.cat([out.detach().flatten(), x.grad.flatten()]).numpy().tobytes()
    return (f"torch {torch.__version__} / {torch.backends.cpu.get_cpu_capability()} / "
            f"{torch.get_num_threads()} threads / probe {hashlib.sha256(bits).hexdigest()[:16]}")


def reference_run(out: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    cfg = apply_overrides(preset("tiny"), [*OVERRIDES, f"train.out_dir={out}"])
    result = train(cfg, progress=False)
    state = torch.load(result.checkpoint, weights_only=True)
    tensors = {}
    for k in ("0", "1"):
        tensors |= {f"raw.{k}.{n}": w for n, w in state["models"][k].items()}
        tensors |= {f"ema.{k}.{n}": w for n, w in state["emas"][k].items()}
    tensors["samples"] = result.pipeline.sample([0, 3, 8, 8], **SAMPLING)
    tensors["component_std"] = torch.tensor(result.pipeline.config.component_std)
    tensors["losses"] = torch.tensor([v for k in ("0", "1") for _, v in state["history"][k]],
                                     dtype=torch.float64)
    return tensors


def test_training_and_sampling_match_the_reference_run(tmp_path):
    expected = load_file(FIXTURE)
    with open(FIXTURE, "rb") as f:  # the header's metadata: where the fixture was written
        meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    got = reference_run(tmp_path)
    assert sorted(got) == sorted(expected)
    same_kernels = meta.get("kernels") == kernels()
    for name, want in expected.items():
        if same_kernels:
            assert torch.equal(got[name], want), f"{name} differs from the reference run ({meta['kernels']})"
        else:
            torch.testing.assert_close(got[name], want, atol=1e-5, rtol=1e-4,
                                       msg=lambda m, n=name: f"{n}: {m}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    torch.set_num_threads(1)  # as the test suite runs (tests/conftest.py)
    with tempfile.TemporaryDirectory() as d:
        tensors = {n: t.contiguous() for n, t in reference_run(Path(d)).items()}
    FIXTURE.parent.mkdir(exist_ok=True)
    save_file(tensors, str(FIXTURE), metadata={"machine": machine(), "kernels": kernels()})
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1e3:.0f} kB) on {machine()}: {kernels()}")
