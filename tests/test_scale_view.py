import json

import numpy as np
import pytest
import torch
from PIL import Image

from msf.interfaces.cli import main
from msf.interfaces.scale_view import scales_figure, view_columns, view_scales
from msf.method.factorize import up
from msf.method.pipeline import MSFPipeline
from msf.presets import preset
from msf.training.data import to_uint8
from msf.training.run_log import honour_cap
from msf.training.train import train


def _pipe():
    pipe = MSFPipeline(preset("tiny").model)
    for p in pipe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return pipe


def test_batched_sampling_draws_the_same_images_and_reports_each_evaluation():
    pipe, labels = _pipe(), [0, 1, 2, 0, 1]
    whole = pipe.sample(labels, seed=3, steps=[3, 2], cfg_scale=[2.0, 1.0], solver=["heun", "euler"])
    events = []
    batched = pipe.sample(labels, seed=3, steps=[3, 2], cfg_scale=[2.0, 1.0], solver=["heun", "euler"],
                          batch_size=2, callback=lambda *e: events.append(e))
    torch.testing.assert_close(batched, whole, atol=1e-6, rtol=0)
    # three batches (2, 2, 1): scale 0 has 3 evaluations per batch (heun, odd), scale 1 two
    assert events == [(0, i, 9) for i in range(1, 10)] + [(1, i, 6) for i in range(1, 7)]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        pipe.sample(labels, batch_size=0)


def test_view_scales_keeps_each_scale_in_pixels():
    pipe, labels = _pipe(), [3, 1, 4]
    view = view_scales(pipe, labels, seed=5, steps=2)
    images, comps = pipe.sample(labels, seed=5, steps=2, return_components=True)
    torch.testing.assert_close(view.images, images, atol=0, rtol=0)
    # pixel space (tiny): the base is c_0, the upsampled base up(c_0), the residual's addition the rest
    torch.testing.assert_close(view.base, comps[0].clamp(-1, 1))
    torch.testing.assert_close(view.base_up, up(comps[0], 16).clamp(-1, 1))
    torch.testing.assert_close(view.base_up + view.additions[0], images, atol=1e-6, rtol=0)
    assert view.base.shape[-1] == 8 and len(view.seconds) == 2 and min(view.seconds) > 0
    assert view.labels == labels and view.settings.steps == (2, 2)


def test_scales_figure_has_a_row_per_sample_and_its_settings(tmp_path):
    pipe = _pipe()
    view = view_scales(pipe, [0, 1], seed=0, steps=1)
    cols = view_columns(view)
    assert [t for t, _ in cols] == ["base (8 px)", "base, upsampled", "scale 1 adds (stretched)", "image"]
    np.testing.assert_array_equal(cols[-1][1].numpy(), to_uint8(view.images).numpy())
    one = scales_figure(view, tmp_path / "two.png")
    view4 = view_scales(pipe, [0, 1, 2, 3], seed=0, steps=1)
    four = scales_figure(view4, tmp_path / "four.png")
    h2, h4 = Image.open(one).height, Image.open(four).height
    assert h4 - h2 == 2 * (16 * 3 + 4)  # two more rows of 3x-upscaled 16 px cells
    meta = json.loads(Image.open(four).text["msf"])
    assert meta["labels"] == [0, 1, 2, 3] and meta["settings"]["steps"] == [1, 1]


def test_sample_show_scales_and_grid_settings(tmp_path, capsys):
    model = _pipe().save_pretrained(tmp_path / "m")
    png = tmp_path / "g.png"
    assert main(["sample", str(model), "--classes", "0,1", "--per-class", "3", "--steps", "2",
                 "--batch-size", "4", "--show-scales", "--out", str(png), "--precision", "fp32",
                 "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "wrote 6 samples" in out and "g_scales.png" in out
    meta = json.loads(Image.open(png).text["msf"])
    assert meta["steps"] == [2, 2] and meta["labels"] == [0, 0, 0, 1, 1, 1] and meta["seed"] == 0
    assert Image.open(tmp_path / "g_scales.png").height > 6 * 16 * 3


def test_time_cap_warns_and_the_bar_counts_to_the_cap(tmp_path):
    cfg = preset("tiny")
    cfg.train.steps, cfg.train.out_dir = 50, str(tmp_path / "run")
    with pytest.warns(UserWarning, match=r"time cap \(0 min\) stopped training at step 1 of 50"):
        result = train(cfg, progress=False, max_seconds=0.0)
    assert result.time_capped and result.steps == 1 and result.total_steps == 50

    class Bar:
        total, desc = 1000, ""

        def set_description(self, d):
            self.desc = d

        def refresh(self):
            pass

    bar = Bar()
    honour_cap(bar, step=150, start_step=100, total_steps=1000, elapsed=60.0, max_seconds=300.0)
    assert bar.total == 350 and "time cap: ~350 of 1000" in bar.desc  # 50 steps a minute, 5 minutes
    bar = Bar()
    honour_cap(bar, step=150, start_step=100, total_steps=1000, elapsed=1.0, max_seconds=300.0)
    assert bar.total == 1000 and bar.desc == ""  # the cap is not in reach: nothing changes


def test_given_components_are_kept_and_the_rest_sampled_on_them():
    pipe, labels = _pipe(), [0, 1, 2]
    free, comps = pipe.sample(labels, seed=2, steps=2, return_components=True)
    real = torch.rand(3, 3, 16, 16) * 2 - 1
    base = pipe.components(real)[0]
    images, got = pipe.sample(labels, seed=2, steps=2, return_components=True, given={0: base})
    torch.testing.assert_close(got[0], base)
    assert not torch.allclose(got[1], comps[1])  # the residual drawn on the real base, not the sampled one
    # given its own sampled base, the residual is the one sampled without: the same random numbers
    again = pipe.sample(labels, seed=2, steps=2, given={0: comps[0]})
    torch.testing.assert_close(again, free, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"given\[0\]: expected shape \(3, 3, 8, 8\)"):
        pipe.sample(labels, given={0: base[:2]})
