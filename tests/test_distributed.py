"""torchrun with 2 CPU processes (gloo) computes the same step as one process."""

import subprocess
import sys

import torch
from helpers import HANG

from msf.training.checkpoint import load_latest

ARGS = ["--preset", "tiny", "--quiet", "train.tensorboard=false", "train.steps=2",
        "train.batch_size=16", "train.log_every=1", "train.lr=3e-3", "model.prior_noise=0.1"]


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def test_two_processes_match_one_on_the_same_global_batch(tmp_path):
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "msf", "train", *ARGS, f"train.out_dir={tmp_path / 'ddp'}"])
    _run([sys.executable, "-m", "msf", "train", *ARGS, f"train.out_dir={tmp_path / 'one'}"])
    ddp, _ = load_latest(tmp_path / "ddp" / "checkpoints")
    one, _ = load_latest(tmp_path / "one" / "checkpoints")
    assert ddp["step"] == one["step"] == 2
    assert (ddp["world_size"], one["world_size"]) == (2, 1)
    moved = 0.0
    for k in ("0", "1"):
        for name, w in one["models"][k].items():
            torch.testing.assert_close(ddp["models"][k][name], w, atol=2e-6, rtol=1e-5)
        for pid, st in one["optimizers"][k]["state"].items():
            torch.testing.assert_close(ddp["optimizers"][k]["state"][pid]["exp_avg"],
                                       st["exp_avg"], atol=1e-7, rtol=1e-4)
            moved += st["exp_avg"].abs().sum().item()
    assert moved > 0  # the step did update the weights
    # The logged losses are the means over both processes' halves of the batch.
    for k in ("0", "1"):
        (s1, l1), = [h for h in one["history"][k] if h[0] == 1]
        (s2, l2), = [h for h in ddp["history"][k] if h[0] == 1]
        assert abs(l1 - l2) < 1e-5


def test_fsdp_two_processes_match_one_and_checkpoints_interchange(tmp_path):
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "msf", "train", *ARGS, "train.fsdp=true", "train.sample_every=2",
          f"train.out_dir={tmp_path / 'fsdp'}"])
    _run([sys.executable, "-m", "msf", "train", *ARGS, f"train.out_dir={tmp_path / 'one'}"])
    fsdp, _ = load_latest(tmp_path / "fsdp" / "checkpoints")
    one, _ = load_latest(tmp_path / "one" / "checkpoints")
    assert fsdp["world_size"] == 2
    for k in ("0", "1"):
        for name, w in one["models"][k].items():
            torch.testing.assert_close(fsdp["models"][k][name], w, atol=2e-6, rtol=1e-5)
        for name, w in one["emas"][k].items():
            torch.testing.assert_close(fsdp["emas"][k][name], w, atol=2e-6, rtol=1e-5)
    assert (tmp_path / "fsdp" / "samples" / "step_000000002.png").is_file()
    # The sampling model gathered from the shards equals the single process's.
    from msf.method.pipeline import MSFPipeline

    a = MSFPipeline.from_pretrained(tmp_path / "fsdp" / "model")
    b = MSFPipeline.from_pretrained(tmp_path / "one" / "model")
    torch.testing.assert_close(a.sample([0, 1], seed=0), b.sample([0, 1], seed=0), atol=1e-4, rtol=0)
    # A sharded run's checkpoint resumes in a single process (and the other way round).
    more = [a for a in ARGS if not a.startswith("train.steps")] + ["train.steps=3"]
    _run([sys.executable, "-m", "msf", "train", *more, f"train.out_dir={tmp_path / 'fsdp'}",
          "--resume"])
    assert load_latest(tmp_path / "fsdp" / "checkpoints")[0]["step"] == 3


LEAK_CHECK = """
import gc, os, sys
from torch.distributed.tensor import DTensor
from msf.config import apply_overrides
from msf.presets import preset
from msf.training.train import train
cfg = apply_overrides(preset("tiny"), ["train.tensorboard=false", "train.steps=2", "train.batch_size=16",
                                       "train.fsdp=true", "train.out_dir=" + sys.argv[1]])
result = train(cfg, progress=False, device="cpu")
gc.collect()
n = sum(isinstance(o, DTensor) for o in gc.get_objects())
line = f"shards alive after train(): {n} {'main' if result.model_dir else 'other'} {result.pipeline is None}"
# one file per process: two processes printing to one pipe can interleave their lines
open(sys.argv[1] + "." + os.environ["RANK"] + ".txt", "w").write(line)
"""


def test_fsdp_leaves_no_shards_behind_the_process_group(tmp_path):
    # Sharded tensors that outlive destroy_process_group keep gloo's threads, and the process
    # then aborted at exit ("terminate called without an active exception") in ~1 run in 10.
    script = tmp_path / "check.py"
    script.write_text(LEAK_CHECK)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(script), str(tmp_path / "run")])
    lines = sorted((tmp_path / f"run.{rank}.txt").read_text().strip() for rank in (0, 1))
    assert lines == ["shards alive after train(): 0 main False", "shards alive after train(): 0 other True"]


def test_fsdp_under_bf16_gathers_weights_in_bf16_and_reduces_gradients_in_fp32(tmp_path):
    """Issue 16, item 7: FSDP's mixed-precision policy, in one gloo process."""
    import torch.distributed as dist

    from msf.method.models import DiT
    from msf.presets import preset
    from msf.training.distributed import shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        m = preset("tiny").model.scales[0]
        nets = {p: DiT(m, 8, 3, 4) for p in ("fp32", "bf16")}
        seen = {}
        for precision, net in nets.items():
            shard(net, precision)

            def record(mod, args, p=precision):
                seen.setdefault(p, next(mod.parameters()).dtype)

            net.blocks[0].register_forward_pre_hook(record)
            x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])
            with torch.autocast("cpu", torch.bfloat16):
                out = net(x, t, y)
            out.float().square().mean().backward()
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            assert grads and all(g.dtype == torch.float32 for g in grads)
            assert all(p.dtype == torch.float32 for p in net.parameters())  # the sharded master weights
        assert seen == {"fp32": torch.float32, "bf16": torch.bfloat16}
    finally:
        dist.destroy_process_group()
