import json

import pytest
import torch

from msf.config import ConfigError, apply_overrides
from msf.method.factorize import compose
from msf.method.flow import LossSettings
from msf.method.pipeline import ModelDirError, MSFPipeline, load_model_config
from msf.training.data import load_builtin, prepare_data, to_model_range
from msf.training.train import train


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
            losses = pipe.training_losses(x, y, settings=LossSettings(class_dropout=0))
            return {k: v.item() for k, v in losses.items()}

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
    calls = {0: [], 1: []}
    counted = {k: _Counting(net, calls[k]) for k, net in enumerate(pipe.networks)}
    img, comps = pipe.sample([1, 2], steps=[3, 2], solver=["heun", "euler"], cfg_scale=[2.0, 1.0],
                             return_components=True, nets=counted)
    # steps = evaluations per CFG branch: scale 0 runs 3 batched (x2) forwards, scale 1 two plain ones
    assert calls == {0: [4, 4, 4], 1: [2, 2]}
    assert [c.shape[-1] for c in comps] == [8, 16]
    torch.testing.assert_close(img, compose(comps).clamp(-1, 1), atol=0, rtol=0)
    # the defaults come from each scale's config: 8 and 4 evaluations, no guidance
    for c in calls.values():
        c.clear()
    default = pipe.sample([1, 2], nets=counted)
    assert calls == {0: [2] * 8, 1: [2] * 4}
    assert not torch.equal(default, img)
    with pytest.raises(ValueError, match="one value per scale"):
        pipe.sample([1], steps=[1, 2, 3])


class _Counting(torch.nn.Module):
    """Wraps a network and records the batch size of each forward."""

    def __init__(self, net, calls):
        super().__init__()
        self.net, self.calls = net, calls

    def forward(self, x, t, y, prior=None):
        self.calls.append(x.shape[0])
        return self.net(x, t, y, prior)


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
        from msf.method.factorize import down

        torch.testing.assert_close(comps[0], down(x, 8))
    else:
        from msf.method.factorize import resize_image

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
    s0 = init.networks[0].state_dict()
    for n, p in result.pipeline.networks[0].state_dict().items():
        assert torch.equal(p, s0[n])
    assert any(not torch.equal(p, init.networks[1].state_dict()[n])
               for n, p in result.pipeline.networks[1].state_dict().items())


def test_bf16_autocast_training_follows_fp32(tiny_cfg, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = apply_overrides(tiny_cfg, [f"train.precision={precision}", "train.steps=3", "train.log_every=1",
                                         "train.lr=3e-3", f"train.out_dir={tmp_path / precision}"])
        runs[precision] = train(cfg, progress=False)
    torch.manual_seed(cfg.train.seed)
    init = MSFPipeline(cfg.model).networks.state_dict()
    a, b = (runs[p].pipeline.networks.state_dict() for p in ("fp32", "bf16"))
    for k in (0, 1):  # the same losses and the same updates, to bf16's precision
        for (s1, l1), (s2, l2) in zip(runs["fp32"].history[k], runs["bf16"].history[k]):
            assert s1 == s2 and l2 == pytest.approx(l1, rel=0.03)
    moved = torch.cat([(a[n] - init[n]).flatten() for n in a])
    apart = torch.cat([(b[n] - a[n]).flatten() for n in a])
    assert 0 < apart.norm() < 0.1 * moved.norm()  # bf16 did run (the runs differ), and stayed close
    pipe = runs["bf16"].pipeline
    for p in pipe.parameters():  # a model whose samples are not all near zero
        p.data.add_(0.05 * torch.randn_like(p))
    img, ref = pipe.sample([0, 3], precision="bf16"), pipe.sample([0, 3], precision="fp32")
    assert img.dtype == torch.float32
    assert 0 < (img - ref).abs().mean() < 0.02 and ref.abs().mean() > 0.1


def test_prior_modes_and_conditioning_augmentation(tiny_cfg):
    cfg = apply_overrides(tiny_cfg, ["model.prior_noise=0.5"]).model
    pipe = MSFPipeline(cfg)
    for p in pipe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    # the prior's noise comes from the sampler's generator, not the global RNG: a seed repeats
    torch.manual_seed(1)
    a = pipe.sample([1, 2], seed=3)
    torch.manual_seed(2)
    assert torch.equal(a, pipe.sample([1, 2], seed=3))
    without = MSFPipeline(apply_overrides(tiny_cfg, ["model.prior_noise=0"]).model)
    without.load_state_dict(pipe.state_dict())
    assert (a - without.sample([1, 2], seed=3)).abs().mean() > 1e-3  # the noise does reach scale 1
    # prior=none: scale 1's network has no prior channels and is never given a prior
    none = MSFPipeline(apply_overrides(tiny_cfg, ["model.prior=none"]).model)
    assert none.networks[1].prior_channels == 0 and pipe.networks[1].prior_channels == 3
    seen = []

    def spy(module, args):
        seen.append(args[3] if len(args) > 3 else None)

    none.networks[1].register_forward_pre_hook(spy)
    x, y = _images(4)
    none.training_losses(x, y)
    assert none.sample([0]).shape == (1, 3, 16, 16)
    assert len(seen) == 1 + 4 and all(p is None for p in seen)


@pytest.mark.parametrize("sizes", [[16], [4, 8, 16]])
def test_one_and_three_scale_pipelines(sizes, tiny_cfg, tmp_path):
    from msf.config import ScaleConfig
    from msf.method.sampler import guided_velocity, solve

    cfg = tiny_cfg
    cfg.model.scales = [ScaleConfig(image_size=s, depth=1, width=32, heads=2, steps=2)
                        for s in sizes]
    cfg.train.steps, cfg.train.out_dir = 2, str(tmp_path)
    result = train(cfg, progress=False)
    assert sorted(result.history) == list(range(len(sizes)))
    pipe = result.pipeline
    for p in pipe.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    img, comps = pipe.sample([0, 5], cfg_scale=2.0, return_components=True)
    assert img.shape == (2, 3, 16, 16) and [c.shape[-1] for c in comps] == sizes
    torch.testing.assert_close(img, compose(comps).clamp(-1, 1), atol=0, rtol=0)
    if len(sizes) == 1:  # K = 1 is a plain DiT sampled with CFG: the same numbers, written out
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(2, 3, 16, 16, generator=g)
        v = guided_velocity(pipe.networks[0], torch.tensor([0, 5]), None, 2.0, cfg.model.num_classes)
        with torch.no_grad():
            torch.testing.assert_close(img, solve(v, noise, 2, "euler").clamp(-1, 1))
    pipe.save_pretrained(tmp_path / "m")
    loaded = MSFPipeline.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.sample([0, 5], cfg_scale=2.0), img)


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
        for (name, a), b in zip(both.pipeline.networks[k].state_dict().items(),
                                s1.pipeline.networks[k].state_dict().values()):
            assert torch.equal(a, b), (k, name)
    combined = MSFPipeline.from_pretrained(s1.model_dir)
    assert torch.equal(combined.sample([2], seed=0), both.pipeline.sample([2], seed=0))
    bad = apply_overrides(tiny_cfg, [*common, "train.scale=1", "model.scales.0.depth=3",
                                     f"train.other_scales_from={s0.model_dir}",
                                     f"train.out_dir={tmp_path / 'bad'}"])
    with pytest.raises(ConfigError, match="scale 0 differs"):
        train(bad, progress=False)
