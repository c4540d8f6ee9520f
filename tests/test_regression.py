"""A fixed run against numbers written before a refactoring: training and sampling unchanged.

``tests/fixtures/reference_run.safetensors`` holds the raw and EMA weights after 6 training
steps of a small two-scale model (prior noise, label dropout, std normalisation, warm-up and
cosine lr, gradient clipping) and 4 samples from it (Heun and Euler, guidance on the base).
On the machine and torch that wrote it, a run must give the same bits; elsewhere (another
CPU's kernels round differently) the same numbers to float tolerance.

Rewrite it only for an intended change of behaviour, and say so in the commit:

    .venv/bin/python tests/test_regression.py --write
"""

import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from msf.config import apply_overrides, preset
from msf.train import train

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
    same_machine = meta["machine"] == machine()
    for name, want in expected.items():
        if same_machine:
            assert torch.equal(got[name], want), f"{name} differs from the reference run ({meta['machine']})"
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
    save_file(tensors, str(FIXTURE), metadata={"machine": machine()})
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1e3:.0f} kB) on {machine()}")
