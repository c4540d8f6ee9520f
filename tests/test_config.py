import dataclasses
import json

import pytest

from msf.config import (
    COST_FREE_TRAIN,
    RESUMABLE_FIELDS,
    SAMPLING_FIELDS,
    AutoencoderConfig,
    Config,
    ConfigError,
    ModelConfig,
    SamplerSettings,
    ScaleConfig,
    TrainConfig,
    apply_overrides,
    config_from_json,
    config_to_json,
    validate,
)
from msf.fields import check_declarations, setting
from msf.presets import PRESETS, preset


def _flat(d, prefix: str = "", lists: bool = False) -> dict:
    """A config's JSON as dotted keys; with ``lists``, lists of dicts (the scales) entry by entry."""
    if isinstance(d, list):
        d = dict(enumerate(d))
    out = {}
    for k, v in d.items():
        deeper = isinstance(v, dict) or (lists and isinstance(v, list) and v and isinstance(v[0], dict))
        out |= _flat(v, f"{prefix}{k}.", lists) if deeper else {f"{prefix}{k}": v}
    return out


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_round_trip_through_json(name):
    cfg = preset(name)
    again = config_from_json(config_to_json(cfg))
    assert isinstance(again, Config) and again == cfg


def test_demo_plus_is_demo_with_its_recipe_changed_and_nothing_else():
    # the studies judged demo+lr4e-3+priornoise against demo: demo-plus must be that model, so that
    # docs/levers.md's numbers are its numbers (its step count is the demo's wall-clock, not a change)
    demo, plus = (_flat(json.loads(config_to_json(preset(p)))) for p in ("demo", "demo-plus"))
    changed = {k for k in demo | plus if demo.get(k) != plus.get(k)}
    assert changed == {"train.lr", "model.prior_noise", "train.steps", "train.out_dir", "preset",
                       "model.scales", "model.samplers.paper.cfg_scale"}
    assert (plus["train.lr"], plus["model.prior_noise"]) == (4e-3, 0.2)
    # the scales differ only in the base's default guidance (docs/guidance_demo, chosen after training)
    d, p = preset("demo").model, preset("demo-plus").model
    assert [s.cfg_scale for s in p.scales] == [7.0, d.scales[1].cfg_scale]
    p.scales[0].cfg_scale = d.scales[0].cfg_scale
    assert p.scales == d.scales
    # and the paper's sampler still draws at the paper's guidance
    assert SamplerSettings.named(preset("demo-plus").model, "paper") == SamplerSettings.named(d, "paper")


def test_dit_demo_plus_is_dit_demo_with_the_cosine_term_sampled_at_its_measured_guidance():
    # its training is dit-demo+cosine's, so the runs of studies/guidance_demo.py are its runs
    d, p = preset("dit-demo"), preset("dit-demo-plus")
    assert p.train == dataclasses.replace(d.train, out_dir="runs/dit-demo-plus", cosine_loss_weight=0.1)
    assert [s.cfg_scale for s in d.model.scales] == [3.0] and [s.cfg_scale for s in p.model.scales] == [5.0]
    p.model.scales[0].cfg_scale = 3.0
    assert p.model.scales == d.model.scales
    paper = SamplerSettings.named(preset("dit-demo-plus").model, "paper")
    assert paper == SamplerSettings.named(d.model, "paper")


@pytest.mark.parametrize("name,plus,changes", [
    ("paper-imagenet256", "paper-imagenet256-plus",
     {"model.prior_noise": 0.2, "model.normalize": "std", "train.time_sampler": "logit-normal"}),
    ("dit-xl2", "dit-xl2-plus",
     {"train.cosine_loss_weight": 0.1, "train.time_sampler": "logit-normal"}),
])
def test_the_imagenet_plus_presets_change_only_the_levers_measured_to_help(name, plus, changes):
    # docs/levers.md names these changes; anything else would be unmeasured (the paper's presets stay)
    a, b = (_flat(json.loads(config_to_json(preset(p))), lists=True) for p in (name, plus))
    changed = {k: b.get(k) for k in a | b if a.get(k) != b.get(k)}
    assert changed == changes | {"preset": plus, "train.out_dir": f"runs/{plus}"}


def test_overrides_set_nested_fields_and_lists():
    cfg = apply_overrides(preset("tiny"), [
        "train.lr=3e-4", "model.scales.0.depth=3", "train.scale_steps=[10, 20]",
        "model.base_mode=latent", "train.balance_classes=false",
    ])
    assert cfg.train.lr == 3e-4 and cfg.model.scales[0].depth == 3
    assert cfg.train.scale_steps == [10, 20] and cfg.train.steps_for(1) == 20
    assert cfg.model.base_mode == "latent" and cfg.train.balance_classes is False


def test_an_override_splits_at_its_first_equals_sign():
    cfg = apply_overrides(preset("tiny"), ["train.out_dir=runs/lr=3e-4,wd=0", "train.wandb_project=a=b"])
    assert cfg.train.out_dir == "runs/lr=3e-4,wd=0" and cfg.train.wandb_project == "a=b"
    samplers = apply_overrides(preset("tiny"), ['model.samplers={"x=y": {"steps": [2, 3]}}']).model.samplers
    assert samplers == {"x=y": {"steps": [2, 3]}}


@pytest.mark.parametrize("override,error", [
    ("train.keep_last=1", None), ("train.keep_every=0", None), ("train.keep_every=3", None),
    ("train.keep_last=0", r"train.keep_last must be an integer in \[1, inf\), got 0"),
    ("train.keep_last=-1", r"train.keep_last must be an integer in \[1, inf\), got -1"),
    ("train.keep_last=2.5", r"train.keep_last: expected an integer, got 2.5"),
    ("train.keep_every=-1", r"train.keep_every must be an integer in \[0, inf\), got -1"),
])
def test_checkpoint_retention_bounds(override, error):
    # at least the newest checkpoint is kept; every M-th one for good, or none (0)
    if error is None:
        key, value = override.removeprefix("train.").split("=")
        assert getattr(apply_overrides(preset("tiny"), [override]).train, key) == int(value)
    else:
        with pytest.raises(ConfigError, match=error):
            apply_overrides(preset("tiny"), [override])


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigError, match="train.lrr.*did you mean 'lr'"):
        apply_overrides(preset("tiny"), ["train.lrr=1"])
    with pytest.raises(ConfigError, match="did you mean 'depth'"):
        apply_overrides(preset("tiny"), ["model.scales.1.dept=1"])
    with pytest.raises(ConfigError, match="index must be 0..1"):
        apply_overrides(preset("tiny"), ["model.scales.2.depth=1"])
    with pytest.raises(ConfigError, match="did you mean 'demo'"):
        preset("dem")


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="train.batch_size: expected an integer"):
        apply_overrides(preset("tiny"), ["train.batch_size=many"])
    with pytest.raises(ConfigError, match="model.base_mode must be one of"):
        apply_overrides(preset("tiny"), ["model.base_mode=pixels"])
    with pytest.raises(ConfigError, match="strictly increasing.*\\[16, 16\\]"):
        apply_overrides(preset("tiny"), ["model.scales.0.image_size=16"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(preset("tiny"), ["train.lr"])


def test_size_not_divisible_by_factor_times_patch_names_the_sizes():
    with pytest.raises(ConfigError, match=r"model.scales.1.image_size=18 .* 1 x 4 = 4"):
        apply_overrides(preset("tiny"), ["model.scales.1.image_size=18",
                                         "model.scales.1.patch_size=4"])
    # 24 / 8 = 3 latent pixels cannot be cut into 2 x 2 patches.
    with pytest.raises(ConfigError, match="image_size=24 .* 8 x 2 = 16"):
        apply_overrides(preset("paper-imagenet256"), ["model.scales.0.image_size=24"])


def test_config_file_errors_name_the_source():
    with pytest.raises(ConfigError, match="my.json: not valid JSON"):
        config_from_json("{", source="my.json")
    data = json.loads(config_to_json(preset("tiny")))
    data["model"]["scales"][0]["width"] = "wide"
    with pytest.raises(ConfigError, match="config.model.scales.0.width: expected an integer"):
        config_from_json(json.dumps(data))


def test_paper_preset_matches_the_paper():
    m = preset("paper-imagenet256").model
    assert m.image_sizes == [192, 256] and m.latent_sizes == [24, 32]
    assert [(s.depth, s.width) for s in m.scales] == [(18, 1152), (10, 1280)]
    paper = SamplerSettings.named(m, "paper")  # the defaults are msf's cheaper sampler
    assert (paper.steps, paper.cfg_scale, paper.solver) == ((100, 50), (1.4, 1.0), ("euler", "euler"))
    assert paper.shift == (1.0, 1.0) and paper.guidance_interval == ((0.0, 1.0), (0.0, 1.0))
    assert m.autoencoder.scaling_factor == 0.18215 and m.autoencoder.factor == 8
    t = preset("paper-imagenet256").train
    assert t.batch_size == 2560 and t.scale_steps == [400_000, 250_000]
    assert preset("dit-xl2").model.num_scales == 1


def test_the_names_dit_and_diffusers_users_type_are_accepted_for_the_same_setting(tiny_cfg):
    cfg = apply_overrides(tiny_cfg, ["train.learning_rate=3e-4", "train.global_batch_size=24",
                                     "train.max_train_steps=7", "train.results_dir=runs/x",
                                     "model.scales.0.hidden_size=48", "model.scales.*.num_sampling_steps=5"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.steps, cfg.train.out_dir) == (3e-4, 24, 7, "runs/x")
    assert cfg.model.scales[0].width == 48 and [s.steps for s in cfg.model.scales] == [5, 5]


@pytest.mark.parametrize("typed, meant, why", [
    ("train.epochs", "steps", "not epochs"), ("train.batch", "batch_size", "global batch"),
    ("train.train_batch_size", "batch_size", "not per device"), ("train.stpes", "steps", ""),
    ("train.mixed_precision", "precision", "auto, bf16 or fp32"),
])
def test_an_unknown_key_is_answered_with_the_setting_it_means(tiny_cfg, typed, meant, why):
    with pytest.raises(ConfigError) as e:
        apply_overrides(tiny_cfg, [f"{typed}=3"])
    assert f"did you mean {meant!r}" in str(e.value) and why in str(e.value)
    assert "? Valid keys here: " in str(e.value)


def test_an_unknown_key_with_nothing_near_still_ends_its_sentence(tiny_cfg):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.zzz'\. Valid keys here: "):
        apply_overrides(tiny_cfg, ["train.zzz=1"])


def test_every_config_field_is_declared_with_its_rule_and_a_bare_one_is_named():
    for cls in (AutoencoderConfig, ScaleConfig, ModelConfig, TrainConfig):
        check_declarations(cls)

    @dataclasses.dataclass
    class Grown(TrainConfig):
        new_lever: float = 0.0  # no setting(...): nobody said whether --resume may change it

    with pytest.raises(TypeError, match=r"Grown.new_lever: declare it with msf.fields.setting"):
        check_declarations(Grown)


def test_the_field_lists_follow_the_declarations():
    @dataclasses.dataclass
    class Grown(TrainConfig):
        new_lever: float = setting(0.5, "(0, 1]", cost=False)

    rule = next(f for f in dataclasses.fields(Grown) if f.name == "new_lever").metadata["rule"]
    assert rule.within == (0.0, 1.0, False, True) and not rule.resume and not rule.cost
    assert "lr" in COST_FREE_TRAIN and "lr" not in RESUMABLE_FIELDS and "batch_size" not in COST_FREE_TRAIN
    assert "out_dir" in RESUMABLE_FIELDS and "seed" not in RESUMABLE_FIELDS
    assert SAMPLING_FIELDS == ("steps", "cfg_scale", "solver", "shift", "guidance_interval", "prior_level")
    assert TrainConfig().betas is not TrainConfig().betas  # a list default is a fresh copy each time


@pytest.mark.parametrize("override,message", [
    ("model.scales.0.depth=0", r"model.scales.0.depth must be an integer in \[1, inf\), got 0"),
    ("model.autoencoder.factor=0", r"model.autoencoder.factor must be an integer in \[1, inf\), got 0"),
    ("model.scales.1.solver=rk4", r"model.scales.1.solver must be one of \('euler', 'heun', 'midpoint', "),
    ("model.component_std=[1, -1]", r"model.component_std\[1\] must be a number in \(0, inf\), got -1"),
    ("model.component_std=[1]", r"model.component_std needs 2 values \(one per scale\), got \[1.0\]"),
    ("train.time_shift=[1, 0]", r"train.time_shift\[1\] must be a number in \(0, 100\], got 0"),
    ("train.lr_schedule=linear", r"train.lr_schedule must be one of \('constant', 'cosine'\), got 'linear'"),
])
def test_declared_ranges_and_choices_are_checked_with_the_field_named(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(preset("tiny"), [override])


def test_a_bool_field_set_to_a_number_in_python_is_refused(tiny_cfg):
    tiny_cfg.train.compile = 1
    with pytest.raises(ConfigError, match="train.compile must be true or false, got 1"):
        validate(tiny_cfg)
