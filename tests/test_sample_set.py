"""ADM-format sample sets: balanced labels, determinism, sharding, resume, the CLI."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import HANG

import msf.evaluation.sample_set as ss
from msf.evaluation.sample_set import balanced_labels, parts_dir, read_meta, sample_set
from msf.interfaces.cli import main
from msf.method.pipeline import MSFPipeline
from msf.training.distributed import World

KW = dict(batch_size=4, steps=2, precision="fp32", progress=False)


@pytest.fixture
def pipe(tiny_cfg):
    torch.manual_seed(1)
    p = MSFPipeline(tiny_cfg.model)
    for net in p.networks:  # DiT zero-initialises its output: make the samples depend on the weights
        for param in net.parameters():
            param.data.add_(0.02 * torch.randn_like(param))
    return p


def test_balanced_labels_are_balanced_shuffled_and_seeded():
    y = balanced_labels(103, 10, seed=3)
    counts = np.bincount(y, minlength=10)
    assert counts.max() - counts.min() == 1 and counts.sum() == 103
    assert not np.array_equal(y[:10], np.arange(10))
    np.testing.assert_array_equal(y, balanced_labels(103, 10, seed=3))
    assert not np.array_equal(y, balanced_labels(103, 10, seed=4))


def test_sample_set_is_adm_format_and_matches_the_pipeline(pipe, tmp_path):
    out = tmp_path / "s.npz"
    res = sample_set(pipe, out, 10, seed=5, meta={"model": "m"}, **KW)
    assert res.path == out and res.generated == 10 and res.resumed == 0
    with np.load(out) as d:
        images, labels = d["arr_0"], d["arr_1"]
    size = pipe.config.image_size
    assert images.dtype == np.uint8 and images.shape == (10, size, size, 3)
    np.testing.assert_array_equal(labels, balanced_labels(10, pipe.config.num_classes, 5))
    assert images.std() > 0
    assert not parts_dir(out).exists()  # merged, chunks removed
    meta = read_meta(out)
    assert meta["num_samples"] == 10 and meta["steps"] == [2, 2] and meta["model"] == "m"
    # The third chunk (samples 8, 9) is the pipeline's output for its labels and seed.
    gen = torch.Generator().manual_seed(ss.chunk_seed(5, 2))
    direct = pipe.sample(torch.from_numpy(labels[8:]), steps=2, generator=gen, precision="fp32")
    from msf.training.data import to_uint8

    np.testing.assert_array_equal(images[8:], to_uint8(direct).numpy())


def test_two_ranks_give_the_same_set_as_one(pipe, tmp_path, monkeypatch):
    one = tmp_path / "one.npz"
    sample_set(pipe, one, 13, seed=1, **KW)
    # Two ranks in turn, barrier stubbed: rank 1 draws the odd chunks, rank 0 the even ones and merges.
    monkeypatch.setattr(ss, "barrier", lambda world: None)
    two = tmp_path / "two.npz"
    ss.parts_dir(two).mkdir()
    r1 = sample_set(pipe, two, 13, seed=1, world=World(rank=1, size=2), **KW)
    assert r1.path is None and r1.generated == 4 + 1  # chunks 1 and 3 (the last holds one sample)
    r0 = sample_set(pipe, two, 13, seed=1, world=World(rank=0, size=2), **KW)
    assert r0.generated == 8
    with np.load(one) as a, np.load(two) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


def test_an_interrupted_set_resumes_where_it_stopped(pipe, tmp_path, monkeypatch):
    full = tmp_path / "full.npz"
    sample_set(pipe, full, 16, **KW)
    out = tmp_path / "cut.npz"
    real, calls = pipe.sample, []

    def interrupted(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(pipe, "sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample_set(pipe, out, 16, **KW)
    assert not out.exists() and len(list(parts_dir(out).glob("chunk_*.npz"))) == 2
    # A chunk cut off mid-write is drawn again, not trusted.
    (parts_dir(out) / "chunk_000001.npz").write_bytes(b"PK\x03\x04 truncated")
    monkeypatch.setattr(pipe, "sample", real)
    res = sample_set(pipe, out, 16, **KW)
    assert res.generated == 12 and res.resumed == 4
    with np.load(full) as a, np.load(out) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_a_finished_set_is_reused_only_with_the_same_settings_and_weights(pipe, tmp_path):
    out = tmp_path / "s.npz"
    first = sample_set(pipe, out, 8, **KW)
    assert first.generated == 8
    again = sample_set(pipe, out, 8, **KW)
    assert again.generated == 0 and again.resumed == 8 and again.path == out
    with pytest.raises(ValueError, match=r"exists, drawn with other settings \(seed: 0 -> 1\)"):
        sample_set(pipe, out, 8, seed=1, **KW)  # other settings: refused unless asked
    assert sample_set(pipe, out, 8, seed=1, overwrite=True, **KW).generated == 8
    with torch.no_grad():
        for param in pipe.networks[0].parameters():
            param.add_(0.05)
    before = np.load(out)["arr_0"]
    with pytest.raises(ValueError, match=r"\(weights: "):
        sample_set(pipe, out, 8, seed=1, **KW)  # same settings, other weights
    retrained = sample_set(pipe, out, 8, seed=1, overwrite=True, **KW)
    assert retrained.generated == 8
    assert not np.array_equal(before, np.load(out)["arr_0"])


def test_chunks_from_other_settings_are_refused(pipe, tmp_path, monkeypatch):
    out = tmp_path / "s.npz"
    monkeypatch.setattr(pipe, "sample", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        sample_set(pipe, out, 8, **KW)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"s\.npz\.parts.*cfg_scale: \[.*\] -> \[3\.0, 3\.0\]"):
        sample_set(pipe, out, 8, cfg_scale=3.0, **KW)
    with pytest.raises(ValueError, match="name it \\*.npz"):
        sample_set(pipe, tmp_path / "s.png", 8, **KW)


def test_cli_sample_set_under_torchrun(pipe, tmp_path):
    model = pipe.save_pretrained(tmp_path / "model")
    cmd = ["-m", "msf", "sample", str(model), "--num-samples", "9", "--batch-size", "4", "--steps", "2",
           "--precision", "fp32", "--device", "cpu", "--quiet"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        "2", *cmd, "--npz", str(tmp_path / "two.npz")], capture_output=True, text=True,
                       timeout=HANG)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote 9 samples" in r.stdout
    assert main(cmd[2:] + ["--npz", str(tmp_path / "one.npz")]) == 0
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert a["arr_0"].shape[0] == 9
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    assert read_meta(tmp_path / "two.npz")["model"] == str(model.resolve())


def test_given_labels_replace_the_balanced_ones(pipe, tmp_path):
    y = np.array([0, 0, 0, 1, 2])
    sample_set(pipe, tmp_path / "s.npz", 5, labels=y, **KW)
    with np.load(tmp_path / "s.npz") as d:
        np.testing.assert_array_equal(d["arr_1"], y)
    with pytest.raises(ValueError, match=r"need 4 labels, got shape \(5,\)"):
        sample_set(pipe, tmp_path / "t.npz", 4, labels=y, **KW)
    with pytest.raises(ValueError, match="class label 99 is out of range"):
        sample_set(pipe, tmp_path / "u.npz", 5, labels=np.array([0, 1, 2, 3, 99]), **KW)


def test_a_set_of_given_labels_is_reused_only_for_the_same_labels(pipe, tmp_path):
    out = tmp_path / "s.npz"
    y = np.array([0, 0, 0, 1, 2])
    assert sample_set(pipe, out, 5, labels=y, **KW).generated == 5
    assert sample_set(pipe, out, 5, labels=y.copy(), **KW).generated == 0  # the same labels: reused
    recorded = read_meta(out)["labels"]
    assert recorded.startswith("given:")
    other = np.array([2, 1, 0, 0, 0])  # the same classes in another order: another set
    with pytest.raises(ValueError, match=r"exists, drawn with other settings \(labels: 'given:"):
        sample_set(pipe, out, 5, labels=other, **KW)
    assert sample_set(pipe, out, 5, labels=other, overwrite=True, **KW).generated == 5
    assert read_meta(out)["labels"] not in (recorded, "balanced")
    with np.load(out) as d:
        np.testing.assert_array_equal(d["arr_1"], other)


def test_bf16_weight_copies_sample_close_to_fp32(pipe, tmp_path):
    kw = dict(KW, precision="bf16-weights")
    sample_set(pipe, tmp_path / "fast.npz", 8, **kw)
    sample_set(pipe, tmp_path / "ref.npz", 8, **KW)
    with np.load(tmp_path / "fast.npz") as a, np.load(tmp_path / "ref.npz") as b:
        diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
        # bf16 rounding moves a few pixels by one level (measured: mean 0.04, max 1); another
        # seed's samples differ by ~100 levels on average
        assert diff.mean() < 0.3 and diff.max() <= 4
    assert read_meta(tmp_path / "fast.npz")["precision"] == "bf16-weights"
    assert next(pipe.networks.parameters()).dtype == torch.float32  # the pipeline's weights untouched
    with pytest.raises(ValueError, match="precision must be one of"):
        sample_set(pipe, tmp_path / "x.npz", 8, **dict(KW, precision="fp16"))
    model = pipe.save_pretrained(tmp_path / "model")
    assert main(["sample", str(model), "--per-class", "1", "--steps", "2", "--precision", "bf16-weights",
                 "--device", "cpu", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
