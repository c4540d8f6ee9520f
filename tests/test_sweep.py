"""Sweeps over per-scale sampling settings (the paper's Tables 2-5), end to end through the CLI."""

import csv
import json

import numpy as np
import pytest
import torch
from helpers import MeanColour
from PIL import Image

import msf.evaluation.metrics as metrics
import msf.evaluation.sample_set as ss
import msf.evaluation.sweep as sweep
from msf.config import ConfigError
from msf.evaluation.sweep import nfe_per_image, sweep_points
from msf.interfaces.cli import build_parser, cmd_sweep, main
from msf.method.pipeline import MSFPipeline
from msf.training.data import load_builtin, prepare_data


@pytest.fixture
def pipe(tiny_cfg):
    torch.manual_seed(2)
    p = MSFPipeline(tiny_cfg.model)
    for net in p.networks:
        for param in net.parameters():
            param.data.add_(0.02 * torch.randn_like(param))
    return p


def test_points_vary_one_setting_of_one_scale(pipe):
    pts = sweep_points(pipe, 1, "steps", [2, 6])
    assert [p["steps"] for p in pts] == [[8, 2], [8, 6]]
    assert all(p["cfg_scale"] == [s.cfg_scale for s in pipe.config.scales] for p in pts)
    pts = sweep_points(pipe, 0, "cfg_scale", [1.0, 2.5])
    assert [p["cfg_scale"][0] for p in pts] == [1.0, 2.5] and pts[0]["steps"] == [8, 4]
    with pytest.raises(ValueError, match="scales 0..1"):
        sweep_points(pipe, 2, "steps", [1])
    # CFG doubles a scale's evaluations, except at 1.0.
    assert nfe_per_image([100, 50], [1.4, 1.0]) == 250
    assert nfe_per_image([100, 10], [1.0, 1.0]) == 110


def test_cli_sweep_writes_tables_plot_and_resumes(pipe, tmp_path, monkeypatch, capsys):
    # The feature network is not the point here (the real one is tested in test_metrics.py): a stand-in.
    standin, asked = MeanColour(), []
    monkeypatch.setattr(metrics, "load_feature_extractor", lambda *a, **k: asked.append(k) or standin)
    model = pipe.save_pretrained(tmp_path / "model")
    data = prepare_data(load_builtin(), 16)
    ref = tmp_path / "ref.npz"
    some = np.concatenate([np.flatnonzero(data.labels.numpy() == c)[:3] for c in range(data.num_classes)])
    np.savez(ref, arr_0=data.images[some].numpy(), arr_1=data.labels[some].numpy())  # labelled: cas learns
    out = tmp_path / "sweep"
    cmd = ["sweep", str(model), "--ref", str(ref), "--scale", "0", "--cfg", "1,4", "--num-samples", "8",
           "--batch-size", "4", "--out", str(out), "--precision", "fp32", "--device", "cpu", "--quiet",
           "--metrics", "fid,kid,pr,cas", "--bootstraps", "20", "--cache-dir", str(tmp_path / "cache"),
           "--feature-precision", "bf16"]
    assert main(cmd) == 0
    assert asked and asked[0]["precision"] == "bf16"
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["value"]) for r in rows] == [1.0, 4.0]
    assert [int(r["nfe_per_image"]) for r in rows] == [8 + 4, 16 + 4]
    for r in rows:
        assert float(r["fid"]) > 0 and 0 <= float(r["precision"]) <= 1 and float(r["seconds_per_image"]) > 0
        assert r["feature_network"] == MeanColour.network
        # Every quality number carries its interval, and class accuracy its per-class split.
        for key in ("fid", "kid", "cas"):
            lo, hi = json.loads(r[f"{key}_ci"])
            assert lo < hi, (key, lo, hi)
        per_class = json.loads(r["cas_per_class"])
        assert 0 <= float(r["cas"]) <= 1 and len(per_class) >= 2
        assert all(0 <= v <= 1 for v in per_class.values())
    # The two CFG scales drew different samples, so their FIDs differ.
    assert rows[0]["fid"] != rows[1]["fid"]
    assert (out / "sweep.png").stat().st_size > 1000 and (out / "sweep_cost.png").stat().st_size > 1000
    # The strips: one row per class (the first sample of each), one column per value, each cell that
    # value's sample set's image at that index: the same seed across the columns.
    sets = [np.load(out / "samples" / f"scale0_cfg_scale_{v}.npz") for v in (1.0, 4.0)]
    labels = sets[0]["arr_1"]
    firsts = sorted(np.unique(labels, return_index=True)[1])
    strips = np.asarray(Image.open(out / "sweep_strips.png").convert("RGB"))
    up = 96 // 16
    for row, i in enumerate(firsts):
        for col, f in enumerate(sets):
            y, x = 16 + 4 + row * (16 * up + 4), 90 + 4 + col * (max(16 * up, 64) + 4)
            np.testing.assert_array_equal(strips[y:y + 16 * up:up, x:x + 16 * up:up], f["arr_0"][i])
    md = (out / "sweep.md").read_text()
    assert md.count("\n| cfg_scale |") == 2 and "8 samples each" in md
    assert "| cas |" in md and "95% intervals" in md and "Class accuracy per class" in md
    assert "sweep.csv" in capsys.readouterr().out
    # A second run reuses the finished sample sets: nothing is drawn again.
    monkeypatch.setattr(ss, "_save_npz", lambda *a, **k: pytest.fail("a sample set was drawn again"))
    assert main(cmd) == 0
    with open(out / "sweep.csv") as f:
        again = list(csv.DictReader(f))
    assert [r["fid"] for r in again] == [r["fid"] for r in rows]


def test_cli_sweep_needs_exactly_one_setting(pipe, tmp_path, capsys):
    model = pipe.save_pretrained(tmp_path / "model")
    assert main(["sweep", str(model), "--ref", "x.npz", "--device", "cpu"]) == 2
    assert "give exactly one of --cfg" in capsys.readouterr().err
    args = build_parser().parse_args(["sweep", str(model), "--ref", "x", "--cfg", "1", "--steps", "2"])
    with pytest.raises(ConfigError):
        cmd_sweep(args)


def test_cli_refuses_a_missing_reference_before_sampling(pipe, tmp_path, monkeypatch, capsys):
    model = pipe.save_pretrained(tmp_path / "model")
    for where in (ss, sweep):
        monkeypatch.setattr(where, "sample_set", lambda *a, **k: pytest.fail("sampled before checking --ref"))
    monkeypatch.setattr(metrics, "load_feature_extractor", lambda *a, **k: pytest.fail("network loaded"))
    for cmd in (["sweep", str(model), "--cfg", "1,2"], ["eval", "--model", str(model)]):
        assert main([*cmd, "--ref", str(tmp_path / "ref.npz"), "--device", "cpu", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "--ref" in err and "ref.npz" in err and "no such file or folder" in err

