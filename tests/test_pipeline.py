import json

import pytest
import torch

from msf.config import ConfigError, apply_overrides
from msf.data import load_builtin, to_model_range
from msf.pipeline import ModelDirError, MSFPipeline, load_model_config
from msf.train import prepare_data, train


def _images(n=8, size=16):
    data = prepare_data(load_builtin(), size)
    idx = torch.arange(n) * (len(data) // n)
    return to_model_range(data.images[idx]), data.labels[idx]


def test_tiny_model_loss_falls_when_overfitting(tiny_cfg):
    x, y = _images(8)
    pipe = MSFPipeline(tiny_cfg.model)
    opt = torch.optim.AdamW(pipe.parameters(), lr=3e-3)
    torch.manual_seed(0)

    def eval_loss():
        torch.manual_seed(123)  # same noise and times each time
        with torch.no_grad():
            return {k: v.item() for k, v in pipe.training_losses(x, y, class_dropout=0).items()}

    before = eval_loss()
    for _ in range(150):
        loss = sum(pipe.training_losses(x, y).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    for k in before:
        assert after[k] < 0.5 * before[k], (k, before[k], after[k])


def test_save_load_gives_identical_samples(tiny_cfg, tmp_path):
    pipe = MSFPipeline(tiny_cfg.model)
    for p in pipe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    pipe.save_pretrained(tmp_path / "m")
    loaded = MSFPipeline.from_pretrained(tmp_path / "m")
    labels = [0, 3, 8, 8]
    a = pipe.sample(labels, seed=5, cfg_scale=[2.0, 1.0])
    b = loaded.sample(labels, seed=5, cfg_scale=[2.0, 1.0])
    assert torch.equal(a, b)
    assert a.shape == (4, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, loaded.sample(labels, seed=6, cfg_scale=[2.0, 1.0]))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["format"] == "msf-pipeline"


def test_sample_settings_per_scale_and_components(tiny_cfg):
    pipe = MSFPipeline(tiny_cfg.model)
    for p in pipe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    img, comps = pipe.sample([1, 2], steps=[3, 2], solver=["heun", "euler"],
                             return_components=True)
    assert [c.shape[-1] for c in comps] == [8, 16]
    assert not torch.equal(img, pipe.sample([1, 2], steps=[4, 2]))
    with pytest.raises(ValueError, match="one value per scale"):
        pipe.sample([1], steps=[1, 2, 3])


def test_bad_labels_and_images(tiny_cfg):
    pipe = MSFPipeline(tiny_cfg.model)
    with pytest.raises(ValueError, match="class label 9 is out of range.*0..8"):
        pipe.sample([0, 9])
    with pytest.raises(ValueError, match="out of range"):
        pipe.sample([-1])
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        pipe.components(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="expects images \\(B, 3"):
        pipe.components(torch.zeros(2, 4, 16, 16))


def test_missing_or_corrupted_model_dir(tiny_cfg, tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        MSFPipeline.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match="config.json: missing"):
        MSFPipeline.from_pretrained(tmp_path / "empty")

    d = MSFPipeline(tiny_cfg.model).save_pretrained(tmp_path / "m")
    (d / "scale_1.safetensors").write_bytes((d / "scale_1.safetensors").read_bytes()[:100])
    with pytest.raises(ModelDirError, match="scale_1.safetensors: not a readable"):
        MSFPipeline.from_pretrained(d)
    (d / "scale_1.safetensors").unlink()
    with pytest.raises(ModelDirError, match="scale_1.safetensors: missing"):
        MSFPipeline.from_pretrained(d)

    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="not valid JSON"):
        load_model_config(d)
    (d / "config.json").write_text(json.dumps({"format": "msf-pipeline", "version": 1,
                                               "model": {"num_classes": 3}}))
    with pytest.raises(ModelDirError, match="model.scales: required field is missing"):
        load_model_config(d)


def test_weights_that_do_not_match_the_config(tiny_cfg, tmp_path):
    d = MSFPipeline(tiny_cfg.model).save_pretrained(tmp_path / "m")
    meta = json.loads((d / "config.json").read_text())
    meta["model"]["scales"][0]["width"] = 64
    meta["model"]["scales"][0]["heads"] = 2
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="scale_0.safetensors: .* shape"):
        MSFPipeline.from_pretrained(d)


@pytest.mark.parametrize("base_mode", ["image", "latent"])
def test_both_base_modes_train_and_sample(tiny_cfg, base_mode, tmp_path):
    cfg = apply_overrides(tiny_cfg, [f"model.base_mode={base_mode}", "train.steps=2",
                                     f"train.out_dir={tmp_path}"])
    result = train(cfg, progress=False)
    x, _ = _images(2)
    comps = result.pipeline.components(x)
    if base_mode == "latent":
        from msf.factorize import down

        torch.testing.assert_close(comps[0], down(x, 8))
    else:
        from msf.factorize import resize_image

        torch.testing.assert_close(comps[0], resize_image(x, 8))
    assert result.pipeline.sample([0, 1]).shape == (2, 3, 16, 16)


def test_normalised_components_round_trip(tiny_cfg, tmp_path):
    cfg = apply_overrides(tiny_cfg, ["model.normalize=std", "train.steps=2",
                                     f"train.out_dir={tmp_path}"])
    result = train(cfg, progress=False)
    std = result.pipeline.config.component_std
    assert std is not None and std[1] < std[0]  # the residual is smaller than the base
    loaded = MSFPipeline.from_pretrained(result.model_dir)
    assert loaded.config.component_std == std
    assert torch.equal(loaded.sample([4], seed=1), result.pipeline.sample([4], seed=1))


def test_single_scale_training_touches_only_that_scale(tiny_cfg, tmp_path):
    cfg = apply_overrides(tiny_cfg, ["train.scale=1", "train.steps=3",
                                     f"train.out_dir={tmp_path}"])
    torch.manual_seed(cfg.train.seed)
    init = MSFPipeline(cfg.model)
    result = train(cfg, progress=False)
    assert list(result.history) == [1]
    s0 = init.scales[0].state_dict()
    for n, p in result.pipeline.scales[0].state_dict().items():
        assert torch.equal(p, s0[n])
    assert any(not torch.equal(p, init.scales[1].state_dict()[n])
               for n, p in result.pipeline.scales[1].state_dict().items())


def test_bf16_autocast_training_step(tiny_cfg, tmp_path):
    cfg = apply_overrides(tiny_cfg, ["train.precision=bf16", "train.steps=3",
                                     f"train.out_dir={tmp_path}"])
    result = train(cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(v[-1][1])) for v in result.history.values())
    img = result.pipeline.sample([0], precision="bf16")
    assert img.dtype == torch.float32 and torch.isfinite(img).all()


def test_prior_modes_and_conditioning_augmentation(tiny_cfg):
    cfg = apply_overrides(tiny_cfg, ["model.prior_noise=0.5"]).model
    pipe = MSFPipeline(cfg)
    for p in pipe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    assert torch.equal(pipe.sample([1, 2], seed=3), pipe.sample([1, 2], seed=3))
    x, y = _images(4)
    assert set(pipe.training_losses(x, y)) == {0, 1}
    none = MSFPipeline(apply_overrides(tiny_cfg, ["model.prior=none"]).model)
    assert none.scales[1].prior_channels == 0 and pipe.scales[1].prior_channels == 3
    assert none.sample([0]).shape == (1, 3, 16, 16)


@pytest.mark.parametrize("sizes", [[16], [4, 8, 16]])
def test_one_and_three_scale_pipelines(sizes, tiny_cfg, tmp_path):
    from msf.config import ScaleConfig

    cfg = tiny_cfg
    cfg.model.scales = [ScaleConfig(image_size=s, depth=1, width=32, heads=2, steps=2)
                        for s in sizes]
    cfg.train.steps, cfg.train.out_dir = 2, str(tmp_path)
    result = train(cfg, progress=False)
    assert sorted(result.history) == list(range(len(sizes)))
    img, comps = result.pipeline.sample([0, 5], return_components=True)
    assert img.shape == (2, 3, 16, 16) and [c.shape[-1] for c in comps] == sizes
    loaded = MSFPipeline.from_pretrained(result.model_dir)
    assert torch.equal(loaded.sample([0, 5]), img)


def test_per_scale_jobs_equal_an_all_scales_job_and_combine(tiny_cfg, tmp_path):
    common = ["train.steps=6", "train.tensorboard=false", "model.normalize=std",
              "model.prior_noise=0.1"]
    both = train(apply_overrides(tiny_cfg, [*common, f"train.out_dir={tmp_path / 'all'}"]),
                 progress=False)
    s0 = train(apply_overrides(tiny_cfg, [*common, "train.scale=0",
                                          f"train.out_dir={tmp_path / 's0'}"]), progress=False)
    s1 = train(apply_overrides(tiny_cfg, [*common, "train.scale=1",
                                          f"train.other_scales_from={tmp_path / 's0' / 'model'}",
                                          f"train.out_dir={tmp_path / 's1'}"]), progress=False)
    for k in (0, 1):
        for (name, a), b in zip(both.pipeline.scales[k].state_dict().items(),
                                s1.pipeline.scales[k].state_dict().values()):
            assert torch.equal(a, b), (k, name)
    combined = MSFPipeline.from_pretrained(s1.model_dir)
    assert torch.equal(combined.sample([2], seed=0), both.pipeline.sample([2], seed=0))
    bad = apply_overrides(tiny_cfg, [*common, "train.scale=1", "model.scales.0.depth=3",
                                     f"train.other_scales_from={s0.model_dir}",
                                     f"train.out_dir={tmp_path / 'bad'}"])
    with pytest.raises(ConfigError, match="scale 0 differs"):
        train(bad, progress=False)
