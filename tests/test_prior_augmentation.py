"""Conditioning augmentation with its level told (``model.prior_aug_max``, ``scales.k.prior_level``).

Training noises each residual scale's prior at a level ``s ~ U[0, prior_aug_max]`` per sample and gives
``s`` to the network; sampling noises the generated prior at the sampler's ``prior_level``. Off (the
default), the model is today's bit for bit.
"""

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import msf.evaluation.sweep as sweep
import msf.method.pipeline
from msf.config import ConfigError, ScaleConfig, apply_overrides
from msf.evaluation.sweep import sweep_points
from msf.interfaces.cli import build_parser, cmd_sweep, main
from msf.interfaces.info import scale_infos
from msf.method.factorize import down, input_priors, up
from msf.method.flow import LossSettings, StepNoise
from msf.method.models import DiT, count_parameters
from msf.method.pipeline import MSFPipeline
from msf.method.sampler import SamplerSettings
from msf.training.checkpoint import CheckpointError
from msf.training.train import train

AUG = ["model.prior_aug_max=0.5"]


def _perturbed(pipe):
    """Weights off their zero-initialised start, so that every input reaches the output."""
    for p in pipe.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return pipe


def _batch(n=4, size=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.arange(n)


# --------------------------------------------------------------------------- off: today's model


def test_off_keeps_the_parameters_losses_and_samples_of_before(tiny_cfg):
    """Reference numbers written by the code before this option: the same seeded tiny pipeline."""
    torch.manual_seed(0)
    pipe = _perturbed(MSFPipeline(apply_overrides(tiny_cfg, ["model.normalize=none"]).model))
    keys = list(pipe.state_dict())
    assert len(keys) == 62 and not any("level" in k for k in keys)
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest().startswith("288b921ba3843ace")
    x, y = _batch()
    losses = pipe.training_losses(x, y, noise=StepNoise(7, 3))
    assert [losses[k].item() for k in (0, 1)] == pytest.approx([1.1290027, 1.3921390], abs=1e-5)
    _, comps = pipe.sample([1, 2], seed=3, return_components=True)
    assert [c.sum().item() for c in comps] == pytest.approx([15.621283, 80.374359], abs=1e-3)
    assert [c.square().sum().item() for c in comps] == pytest.approx([408.707062, 1698.439453], abs=1e-2)
    # the untold prior noise (model.prior_noise) is today's too
    noisy = MSFPipeline(apply_overrides(tiny_cfg, ["model.prior_noise=0.3"]).model)
    noisy.load_state_dict(pipe.state_dict())
    assert noisy.training_losses(x, y, noise=StepNoise(7, 3))[1].item() == pytest.approx(1.3904103, abs=1e-5)
    _, comps = noisy.sample([1, 2], seed=3, return_components=True)
    assert comps[1].sum().item() == pytest.approx(76.900116, abs=1e-3)


# --------------------------------------------------------------------------- the network


def test_a_residual_network_embeds_the_level_and_the_base_gets_nothing(tiny_cfg):
    on = MSFPipeline(apply_overrides(tiny_cfg, AUG).model)
    off = MSFPipeline(tiny_cfg.model)
    assert list(on.networks[0].state_dict()) == list(off.networks[0].state_dict())
    extra = [k for k in on.networks[1].state_dict() if k not in off.networks[1].state_dict()]
    assert extra == [f"level_embedder.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
    assert [i.parameters for i in scale_infos(on.config)] == [count_parameters(n) for n in on.networks]

    torch.manual_seed(0)
    net = _perturbed(DiT(ScaleConfig(image_size=8, depth=2, width=32, heads=2), 8, 3, 4, prior_channels=3,
                         augmented_prior=True))
    g = torch.Generator().manual_seed(1)
    x, prior = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    t, y = torch.tensor([0.3, 0.9]), torch.tensor([1, 3])
    with torch.no_grad():
        at = {s: net(x, t, y, prior, level=s) for s in (0.0, 0.3)}
        per_sample = net(x, t, y, prior, level=torch.tensor([0.0, 0.3]))
    assert (at[0.0] - at[0.3]).abs().mean() > 1e-3  # the level reaches the output
    torch.testing.assert_close(per_sample, torch.stack([at[0.0][0], at[0.3][1]]))  # one level per sample
    with pytest.raises(ValueError, match="noised at a level it is told .* give level"):
        net(x, t, y, prior)
    with pytest.raises(ValueError, match="without conditioning augmentation and takes no level"):
        off.networks[1](x, t, y, prior, level=0.1)


# --------------------------------------------------------------------------- training


def test_training_draws_per_sample_levels_from_the_step_noise(tiny_cfg, monkeypatch):
    seen = []
    real = msf.method.pipeline.rectified_flow_loss

    def flow(net, c, y, t, prior=None, noise=None, **kw):
        seen.append((getattr(net, "keywords", {}).get("level"), prior))
        return real(net, c, y, t, prior, noise, **kw)

    monkeypatch.setattr(msf.method.pipeline, "rectified_flow_loss", flow)
    pipe = MSFPipeline(apply_overrides(tiny_cfg, [*AUG, "model.normalize=none"]).model)
    x, y = _batch(8)
    pipe.training_losses(x, y, noise=StepNoise(7, 3))
    (base_level, base_prior), (level, prior) = seen
    assert base_level is None and base_prior is None
    want = StepNoise(7, 3).uniform("level1", 8) * 0.5  # the step's own draw, keyed by the scale
    assert torch.equal(level, want) and len(set(level.tolist())) == 8  # one level per sample
    clean = input_priors(pipe.components(x))[1]
    n = StepNoise(7, 3).normal("prior1", tuple(clean.shape))
    torch.testing.assert_close(prior, clean + level.view(-1, 1, 1, 1) * n, rtol=0, atol=1e-6)
    # the same step draws the same levels (a resumed run); another step others
    pipe.training_losses(x, y, noise=StepNoise(7, 3))
    pipe.training_losses(x, y, noise=StepNoise(7, 4))
    assert torch.equal(seen[3][0], level) and not torch.equal(seen[5][0], level)
    many = pipe._prior_levels(1, 20000, StepNoise(0, 1), "cpu")
    assert 0 <= many.min() < 0.01 and 0.49 < many.max() <= 0.5 and abs(many.mean().item() - 0.25) < 0.01
    assert pipe._prior_levels(0, 4, StepNoise(0, 1), "cpu") is None


def test_a_meanflow_residual_is_told_its_level_in_every_call_of_its_loss(tiny_cfg):
    meanflow = ["model.scales.1.objective=meanflow", "model.scales.1.solver=meanflow",
                "model.scales.1.steps=2"]
    pipe = MSFPipeline(apply_overrides(tiny_cfg, [*AUG, *meanflow]).model)
    levels = []
    pipe.networks[1].register_forward_pre_hook(lambda m, a, kw: levels.append(kw.get("level")),
                                               with_kwargs=True)
    x, y = _batch()
    loss = pipe.training_losses(x, y, noise=StepNoise(7, 3), settings=LossSettings(meanflow_guidance=[1, 2]))
    want = StepNoise(7, 3).uniform("level1", 4) * 0.5
    assert torch.isfinite(loss[1]) and len(levels) == 3  # guided field, JVP, trained forward
    assert all(torch.equal(level, want) for level in levels)


@pytest.mark.filterwarnings("ignore:the EMA weights")
def test_an_augmented_run_resumes_exactly_and_refuses_another_max(tiny_cfg, tmp_path):
    def cfg(out, steps, extra=()):
        return apply_overrides(tiny_cfg, [*AUG, "train.lr=3e-3", "train.log_every=1",
                                          "train.tensorboard=false", f"train.steps={steps}",
                                          f"train.out_dir={out}", *extra])

    train(cfg(tmp_path / "a", 2), progress=False)
    resumed = train(cfg(tmp_path / "a", 4, ["model.scales.1.prior_level=0.1"]), progress=False, resume=True)
    straight = train(cfg(tmp_path / "b", 4), progress=False)
    a = {k: load_file(str(resumed.model_dir / f"scale_{k}.safetensors")) for k in (0, 1)}
    b = {k: load_file(str(straight.model_dir / f"scale_{k}.safetensors")) for k in (0, 1)}
    assert all(torch.equal(a[k][name], b[k][name]) for k in a for name in a[k])
    assert "level_embedder.mlp.0.weight" in a[1] and "level_embedder.mlp.0.weight" not in a[0]
    assert resumed.history == straight.history
    with pytest.raises(CheckpointError, match=r"differs from this run's in \['prior_aug_max'\]"):
        train(cfg(tmp_path / "a", 6, ["model.prior_aug_max=0.3"]), progress=False, resume=True)


# --------------------------------------------------------------------------- sampling


def _spy_prior(pipe):
    """Scale 1's network inputs as the sampler gives them: (prior, level) per call."""
    seen = []
    pipe.networks[1].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[3], kwargs.get("level"))), with_kwargs=True)
    return seen


def test_sampling_noises_the_generated_prior_at_the_level_asked(tiny_cfg):
    torch.manual_seed(0)
    pipe = _perturbed(MSFPipeline(apply_overrides(tiny_cfg, AUG).model))
    seen = _spy_prior(pipe)
    _, clean_comps = pipe.sample([1, 2], seed=3, prior_level=0.0, return_components=True)
    prior0, level0 = seen[0]
    clean = down(up(clean_comps[0], 16), 16) / pipe._std(0)  # the generated prior, Algorithm 3
    assert level0 == 0.0 and torch.equal(prior0, clean)  # level 0: the clean prior, exactly
    seen.clear()
    _, comps = pipe.sample([1, 2], seed=3, prior_level=0.3, return_components=True)
    prior, level = seen[0]
    g = torch.Generator().manual_seed(3)  # the sampler's draws: each scale's noise, then the prior's
    torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    n = torch.randn(2, 3, 16, 16, generator=g)
    assert level == 0.3 and len(seen) == pipe.config.scales[1].steps
    torch.testing.assert_close(prior, clean + 0.3 * n, rtol=0, atol=1e-6)
    assert torch.equal(comps[0], clean_comps[0]) and not torch.equal(comps[1], clean_comps[1])
    # the level is a sampler setting: the scale's default, recorded where it is not 0
    same = pipe.sample([1, 2], seed=3, settings=SamplerSettings.of(pipe.config, prior_level=[0, 0.3]))
    assert torch.equal(same, pipe.sample([1, 2], seed=3, prior_level=0.3))
    settings = SamplerSettings.of(pipe.config, prior_level=0.3)
    assert settings.prior_level == (0.0, 0.3) and settings.to_dict()["prior_level"] == [0.0, 0.3]
    assert "prior level 0,0.3" in settings.describe()
    assert "prior_level" not in SamplerSettings.of(pipe.config).to_dict()


# --------------------------------------------------------------------------- misuse


@pytest.mark.parametrize("overrides,message", [
    (["model.prior_noise=0.2", *AUG], r"model.prior_noise=0.2 and model.prior_aug_max=0.5: set one of them"),
    (["model.prior=none", *AUG], r"model.prior_aug_max=0.5: no scale sees a prior"),
    (["model.scales.1.time_convention=sit", *AUG], r"scale 1 is a converted network"),
    (["model.scales.1.prior_level=0.2"], r"scales.1.prior_level=0.2 must be in \[0, 0\].*prior_aug_max=0"),
    ([*AUG, "model.scales.1.prior_level=0.6"], r"model.scales.1.prior_level=0.6 must be in \[0, 0.5\]"),
    ([*AUG, "model.scales.0.prior_level=0.1"], r"scales.0.prior_level=0.1 .*scale 0 has no prior"),
    ([*AUG, 'model.samplers={"noisy": {"prior_level": [0, 0.7]}}'], r"model.samplers.noisy: prior_level"),
])
def test_misuse_is_refused_with_the_fields_named(tiny_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(tiny_cfg, overrides)


def test_a_level_the_network_was_not_trained_with_is_refused_before_sampling(tiny_cfg):
    plain = MSFPipeline(tiny_cfg.model)
    with pytest.raises(ConfigError, match=r"prior_level: 0.2 fits none .*\(model.prior_aug_max=0\)"):
        plain.sample([0], prior_level=0.2)
    with pytest.raises(ConfigError, match=r"prior_level: 0.2 for scale 1, whose network was trained without"):
        plain.sample([0], prior_level=[0.0, 0.2])
    aug = MSFPipeline(apply_overrides(tiny_cfg, AUG).model)
    with pytest.raises(ConfigError, match=r"prior_level: 0.6 for scale 1 must be a number in \[0, 0.5\]"):
        aug.sample([0], prior_level=0.6)
    with pytest.raises(ConfigError, match=r"for scale 0, whose network was trained without"):
        aug.sample([0], prior_level=[0.1, 0.1])
    assert plain.sample([0], prior_level=0).shape == (1, 3, 16, 16)  # 0 is every model's clean prior


# --------------------------------------------------------------------------- command line


def test_the_cli_flag_reaches_the_sampler_and_the_sweep(tiny_cfg, tmp_path, monkeypatch, capsys):
    model = MSFPipeline(apply_overrides(tiny_cfg, AUG).model).save_pretrained(tmp_path / "aug")
    plain = MSFPipeline(tiny_cfg.model).save_pretrained(tmp_path / "plain")
    asked = []
    real = MSFPipeline.sample
    monkeypatch.setattr(MSFPipeline, "sample", lambda self, *a, **k: asked.append(k["settings"])
                        or real(self, *a, **k))
    grid = ["--classes", "0", "--per-class", "1", "--device", "cpu", "--quiet", "--precision", "fp32"]
    assert main(["sample", str(model), "--prior-level", "0.25", "--out", str(tmp_path / "g.png"), *grid]) == 0
    assert asked[-1].prior_level == (0.0, 0.25)
    assert main(["sample", str(plain), "--prior-level", "0.25", "--out", str(tmp_path / "p.png"), *grid]) == 2
    assert "prior_level: 0.25 fits none" in capsys.readouterr().err and not (tmp_path / "p.png").exists()

    pipe = MSFPipeline.from_pretrained(model)
    points = sweep_points(pipe, 1, "prior_level", [0.0, 0.2])
    assert [p["prior_level"] for p in points] == [[0.0, 0.0], [0.0, 0.2]]
    with pytest.raises(ConfigError, match="for scale 0, whose network was trained without"):
        sweep_points(pipe, 0, "prior_level", [0.1])
    drawn = []

    class Stop(Exception):
        pass

    def sample_set(pipe, path, num, **kw):
        drawn.append(kw["prior_level"])
        raise Stop

    monkeypatch.setattr(sweep, "sample_set", sample_set)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((2, 16, 16, 3), np.uint8), arr_1=np.zeros(2, np.int64))
    args = build_parser().parse_args(["sweep", str(model), "--ref", str(ref), "--scale", "1",
                                      "--prior-levels", "0,0.2", "--device", "cpu", "--quiet",
                                      "--out", str(tmp_path / "s")])
    with pytest.raises(Stop):
        cmd_sweep(args)
    assert drawn == [[0.0, 0.0]]
    assert main(["sweep", str(model), "--ref", str(ref), "--cfg", "1", "--prior-levels", "0", "--device",
                 "cpu"]) == 2
    assert "give exactly one of --cfg-values" in capsys.readouterr().err
