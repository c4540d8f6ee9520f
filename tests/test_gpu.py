"""The CUDA paths, with tolerances where GPU kernels round differently (issue 16, item 3).

These run only where a GPU is visible: ``MSF_TEST_DEVICE=cuda make test`` (the default suite
hides GPUs, see conftest.py), and ``scripts/gpu_check.sh`` runs this file. On a machine
without one they are skipped: there is nothing to install that would run them.
"""

import pytest
import torch

from msf.config import apply_overrides
from msf.method.flow import StepNoise
from msf.method.pipeline import MSFPipeline
from msf.presets import preset
from msf.training.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a GPU; run with MSF_TEST_DEVICE=cuda")
CUDA = torch.device("cuda")


def test_step_noise_is_drawn_on_the_gpu_and_the_same_at_one_and_two_processes():
    whole = StepNoise(5, 7).normal("e0", (6, 3, 4, 4), CUDA)
    assert whole.device.type == "cuda"
    halves = [StepNoise(5, 7, rank=r, world=2).normal("e0", (3, 3, 4, 4), CUDA) for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)
    assert torch.equal(StepNoise(5, 7).uniform("t0", 6, CUDA), StepNoise(5, 7).uniform("t0", 6, CUDA))
    assert not torch.equal(StepNoise(5, 8).normal("e0", (6, 3, 4, 4), CUDA), whole)


def _cfg(out, steps):
    return apply_overrides(preset("tiny"), [f"train.steps={steps}", f"train.out_dir={out}",
                                            "train.tensorboard=false", "train.precision=bf16",
                                            "train.ckpt_every=3", "model.prior_noise=0.1"])


def test_a_resumed_cuda_run_follows_the_uninterrupted_one(tmp_path):
    whole = train(_cfg(tmp_path / "whole", 6), device="cuda", progress=False).pipeline
    train(_cfg(tmp_path / "part", 3), device="cuda", progress=False)
    resumed = train(_cfg(tmp_path / "part", 6), device="cuda", progress=False, resume=True).pipeline
    for a, b in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # non-deterministic backward kernels


def test_a_deterministic_cuda_run_repeats_bit_for_bit(tmp_path):
    runs = [train(apply_overrides(_cfg(tmp_path / str(i), 3), ["train.deterministic=true"]),
                  device="cuda", progress=False, save=False).pipeline for i in range(2)]
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(a, b)


def test_cuda_sampling_matches_the_cpu(tmp_path):
    pipe = MSFPipeline(preset("tiny").model)
    for net in pipe.networks:  # adaLN-Zero starts at zero output: give the networks something to say
        for p in net.parameters():
            p.data.normal_(0, 0.05)
    cpu = pipe.sample([0, 1, 2, 3], seed=3, precision="fp32")
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = pipe.to(CUDA).sample([0, 1, 2, 3], seed=3, precision="fp32").cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-3)
    bf16 = pipe.sample([0, 1, 2, 3], seed=3, precision="bf16").cpu()
    assert (bf16 - cpu).abs().max() < 0.1
