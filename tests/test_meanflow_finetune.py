"""A trained flow model made few-step by fine-tuning (``train.init_from``, Decoupled MeanFlow's route): the
meanflow network starts as the flow network, the other scales as they were, and the run trains and resumes
as any other; what does not fit is refused with the setting named. Also: the presets' named samplers leave
a base made meanflow as it is."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import HANG
from safetensors.torch import load_file

from msf.config import ConfigError, TrainConfig, apply_overrides, validate
from msf.interfaces.hub import model_card
from msf.method.pipeline import MSFPipeline
from msf.method.sampler import SamplerSettings
from msf.presets import preset
from msf.training.checkpoint import load_latest
from msf.training.train import train

# the base scale made a 2-step MeanFlow scale (the tiny preset samples it at cfg_scale 1 already)
MEANFLOW_BASE = ["model.scales.0.objective=meanflow", "model.scales.0.solver=meanflow",
                 "model.scales.0.steps=2", "model.scales.0.cfg_scale=1"]
QUIET = ["train.tensorboard=false", "train.log_every=1"]

pytestmark = pytest.mark.filterwarnings("ignore:the EMA weights")  # runs of a few steps


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """A tiny flow model, trained 2 steps: the run directory."""
    out = tmp_path_factory.mktemp("flow")
    torch.manual_seed(0)
    train(apply_overrides(preset("tiny"), [*QUIET, "train.steps=2", "train.lr=3e-3", f"train.out_dir={out}"]),
          progress=False)
    return out


def _fine_tune(flow_run, out, *extra):
    return apply_overrides(preset("tiny"), [*QUIET, *MEANFLOW_BASE, f"train.init_from={flow_run}",
                                            "train.lr=3e-3", f"train.out_dir={out}", *extra])


def test_the_meanflow_network_starts_as_the_flow_network_for_every_r(flow_run, tmp_path):
    flow = MSFPipeline.from_pretrained(flow_run / "model")  # the EMA weights init_from takes
    start = train(_fine_tune(flow_run, tmp_path / "ft", "train.steps=0"), progress=False, save=False)
    net = start.pipeline.networks[0]
    first, last = net.interval_embedder.mlp[0], net.interval_embedder.mlp[2]
    assert not last.weight.any() and not last.bias.any() and first.weight.any()
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)
    t = torch.rand(6, generator=g)
    r = t * torch.rand(6, generator=g)  # r <= t, and r = t for two of them
    r[:2] = t[:2]
    with torch.no_grad():
        u, v = net(z, t, y, r=r), flow.networks[0](z, t, y)
    assert v.abs().mean() > 1e-3  # trained: a comparison of more than adaLN-Zero's zeros
    assert torch.equal(u, v)
    for name, w in flow.networks[1].state_dict().items():  # the residual scale, loaded unchanged
        assert torch.equal(start.pipeline.networks[1].state_dict()[name], w), name


def test_the_fine_tune_trains_the_interval_embedder_and_leaves_the_other_scale_as_loaded(flow_run, tmp_path):
    run = train(_fine_tune(flow_run, tmp_path / "ft", "train.scale=0", "train.steps=3"), progress=False)
    state = load_latest(tmp_path / "ft" / "checkpoints")[0]
    assert state["models"]["0"]["interval_embedder.mlp.2.weight"].abs().sum() > 0  # it trains
    assert all(torch.isfinite(torch.tensor(v)) for _, v in run.history[0])
    source = load_file(str(flow_run / "model" / "scale_1.safetensors"))
    saved = load_file(str(run.model_dir / "scale_1.safetensors"))
    assert all(torch.equal(saved[name], w) and torch.equal(state["models"]["1"][name], w)
               for name, w in source.items())


def test_a_fine_tune_resumes_exactly_and_its_checkpoint_wins_over_init_from(flow_run, tmp_path):
    train(_fine_tune(flow_run, tmp_path / "a", "train.steps=2"), progress=False)
    # on --resume init_from is not read (here: it names nothing); the checkpoint holds the run
    resumed = train(_fine_tune(flow_run, tmp_path / "a", "train.steps=4",
                               f"train.init_from={tmp_path / 'gone'}"), progress=False, resume=True)
    straight = train(_fine_tune(flow_run, tmp_path / "b", "train.steps=4"), progress=False)
    for k in (0, 1):
        a = load_file(str(resumed.model_dir / f"scale_{k}.safetensors"))
        b = load_file(str(straight.model_dir / f"scale_{k}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a), k
    assert resumed.history == straight.history


def test_what_does_not_fit_is_refused_naming_the_setting(flow_run, tmp_path):
    with pytest.raises(ConfigError, match=r"train.init_from=.*: scale 0's depth is 2 there, 3 here"):
        train(_fine_tune(flow_run, tmp_path / "a", "model.scales.0.depth=3"), progress=False, save=False)
    # a difference the configs' scales do not show, the weights do: the residual's level embedder
    with pytest.raises(ConfigError, match=r"init_from=.*: scale 1's weights do not fit .*level_embedder"):
        train(_fine_tune(flow_run, tmp_path / "b", "model.prior_aug_max=0.2"), progress=False, save=False)
    with pytest.raises(ConfigError, match=r"train.init_from=.*: model.prior is 'concat' there, 'none' here"):
        train(_fine_tune(flow_run, tmp_path / "c", "model.prior=none"), progress=False, save=False)
    with pytest.raises(ConfigError, match=r"train.init_from=.*nothing.*does not exist"):
        train(_fine_tune(tmp_path / "nothing", tmp_path / "d"), progress=False, save=False)
    # a meanflow network cannot start a flow scale: the fine-tune's own model, back into flow
    ft = train(_fine_tune(flow_run, tmp_path / "e", "train.steps=0"), progress=False)
    with pytest.raises(ConfigError, match=r"scale 0 is a meanflow network there .*: set model.scales.0.obj"):
        back = [f"train.init_from={ft.model_dir}", f"train.out_dir={tmp_path / 'f'}"]
        train(apply_overrides(preset("tiny"), back), progress=False, save=False)
    with pytest.raises(ConfigError, match=r"train.init_from=.* lies in train.out_dir"):
        _fine_tune(flow_run, flow_run)  # --overwrite would delete what it loads


def test_an_empty_init_from_is_the_default_and_loads_nothing(tiny_cfg, tmp_path):
    assert TrainConfig().init_from == tiny_cfg.train.init_from == ""
    assert apply_overrides(tiny_cfg, ["train.pretrained=runs/x"]).train.init_from == "runs/x"  # DMF's name
    start = train(apply_overrides(tiny_cfg, ["train.steps=0", f"train.out_dir={tmp_path}"]), progress=False,
                  save=False)
    torch.manual_seed(tiny_cfg.train.seed)
    seeded = MSFPipeline(tiny_cfg.model)  # what a fresh run starts from: the seeded initialisation
    for k in (0, 1):
        for name, w in seeded.networks[k].state_dict().items():
            assert torch.equal(start.pipeline.networks[k].state_dict()[name], w), (k, name)


def test_the_documented_command_fine_tunes_a_flow_run_from_the_command_line(flow_run, tmp_path):
    out = tmp_path / "few-step"
    r = subprocess.run([sys.executable, "-m", "msf", "train", "--config", str(flow_run / "config.json"),
                        "--quiet", *MEANFLOW_BASE, f"train.init_from={flow_run}", "train.scale=0",
                        "train.steps=2", f"train.out_dir={out}"], capture_output=True, text=True,
                       timeout=HANG)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"train.init_from={flow_run}: every scale from the EMA weights of" in r.stdout
    assert "scale 0: flow made meanflow" in r.stdout
    pipe = MSFPipeline.from_pretrained(out / "model")
    assert pipe.config.scales[0].objective == "meanflow"
    images = pipe.sample([0, 1], seed=0)  # 2 jumps, then the residual's own 4 Euler steps
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    card = model_card(json.loads((out / "model" / "config.json").read_text()), "org/few-step")
    assert f"every scale started from the weights of {flow_run}" in card
    assert f"the other scales' weights came from {flow_run}" in card


def test_a_named_sampler_for_flow_scales_leaves_a_meanflow_base_as_it_is():
    demo = apply_overrides(preset("demo"), MEANFLOW_BASE)  # its `paper` sampler: Euler, steps [50, 20]
    paper = SamplerSettings.named(demo.model, "paper")
    assert (paper.steps, paper.solver, paper.cfg_scale) == ((2, 20), ("meanflow", "euler"), (1.0, 1.0))
    assert SamplerSettings.named(demo.model, "paper").shift[0] == demo.model.scales[0].shift
    # a named sampler that names the meanflow solver for it still sets it, and is checked
    demo.model.samplers["fast"] = {"solver": ["meanflow", "heun"], "steps": [3, 10]}
    assert SamplerSettings.named(validate(demo).model, "fast").steps == (3, 10)
    demo.model.samplers["fast"]["steps"] = [8, 10]
    with pytest.raises(ConfigError, match=r"samplers.fast: steps: 8 for scale 0 \(meanflow\) must be 1"):
        validate(demo)
