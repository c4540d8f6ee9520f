import math

import pytest
import torch
from torch import nn

from msf.method.flow import StepNoise, drop_labels, interpolate, rectified_flow_loss, sample_time
from msf.method.sampler import guided_velocity, solve


class Counting:
    """A velocity field v = a * x, whose flow from t=1 to t=0 is x(0) = x(1) * exp(-a)."""

    def __init__(self, a: float):
        self.a, self.calls = a, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.a * x


def _error(solver, steps, a=1.5):
    x1 = torch.ones(1, dtype=torch.float64)
    field = Counting(a)
    x0 = solve(field, x1, steps, solver)
    return abs(x0.item() - math.exp(-a)), field.calls


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "ab2"])
@pytest.mark.parametrize("steps", [1, 2, 7, 10, 51])
def test_steps_count_network_evaluations(solver, steps):
    _, calls = _error(solver, steps)
    assert calls == steps


def test_euler_is_first_order_and_heun_second_order():
    e1, _ = _error("euler", 20)
    e2, _ = _error("euler", 40)
    assert 1.8 < e1 / e2 < 2.2
    h1, _ = _error("heun", 20)
    h2, _ = _error("heun", 40)
    assert 3.5 < h1 / h2 < 4.5
    assert h2 < e2 / 10  # at equal network evaluations


def _time_field(x, t):
    """``dx/dt = t x``: from x(1) the exact solution is x(0) = x(1) exp(-1/2)."""
    return t * x


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("midpoint", 2), ("ab2", 2)])
def test_order_on_a_time_dependent_field(solver, order):
    # A field that depends on t tells the times apart: a Heun corrector evaluated at the
    # interval's start instead of its end is only first order here.
    exact = math.exp(-0.5)
    errors = [abs(solve(_time_field, torch.ones(1, dtype=torch.float64), n, solver).item() - exact)
              for n in (40, 80)]
    assert 2 ** order * 0.85 < errors[0] / errors[1] < 2 ** order * 1.15


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_euler_and_heun_evaluate_the_field_at_the_right_times(steps):
    # dx/dt = 2t, integrated from t=1 to t=0: Euler is the left Riemann sum over its grid
    # (evaluated at each interval's start), Heun the trapezoid rule, exact for a linear field.
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    euler = solve(lambda x, t: 2 * t + 0 * x, torch.zeros(1, dtype=torch.float64), steps, "euler")
    assert euler.item() == pytest.approx(sum((b - a) * 2 * a for a, b in zip(ts[:-1], ts[1:])), abs=1e-12)
    heun = solve(lambda x, t: 2 * t + 0 * x, torch.zeros(1, dtype=torch.float64), 2 * steps, "heun")
    assert heun.item() == pytest.approx(-1.0, abs=1e-12)
    seen = []
    solve(lambda x, t: seen.append(t) or 0 * x, torch.zeros(1), 2 * steps, "heun")
    assert seen == pytest.approx([u for a, b in zip(ts[:-1], ts[1:]) for u in (a, b)])
    seen.clear()  # an odd count: the last interval is a plain Euler step, evaluated at its start only
    solve(lambda x, t: seen.append(t) or 0 * x, torch.zeros(1), 2 * steps - 1, "heun")
    assert seen == pytest.approx([u for a, b in zip(ts[:-1], ts[1:]) for u in (a, b)][:-1])


def test_solver_integrates_time_dependent_field_exactly_for_linear_paths():
    # A single data point c: the exact rectified-flow velocity is (x - c) / t, and the
    # straight path makes Euler exact at any step count.
    c = torch.tensor([0.3, -1.2], dtype=torch.float64)
    e = torch.tensor([1.0, 2.0], dtype=torch.float64)
    x0 = solve(lambda x, t: (x - c) / t, e, 3, "euler")
    torch.testing.assert_close(x0, c)


def test_unknown_solver_and_zero_steps():
    with pytest.raises(ValueError, match="solver"):
        solve(lambda x, t: x, torch.zeros(1), 4, "rk4")
    with pytest.raises(ValueError, match="steps"):
        solve(lambda x, t: x, torch.zeros(1), 0, "euler")


class LabelNet(nn.Module):
    """Velocity depends on the label on every channel; counts forwards and batch sizes."""

    def __init__(self, channels=4):
        super().__init__()
        self.calls = []
        self.w = torch.randn(11, channels)

    def forward(self, x, t, y, prior=None):
        self.calls.append(x.shape[0])
        return x * 0.5 + self.w[y][:, :, None, None] + (0 if prior is None else prior)


def test_cfg_one_is_the_conditional_pass_in_one_forward():
    net = LabelNet()
    x, y = torch.randn(3, 4, 5, 5), torch.tensor([1, 2, 3])
    v = guided_velocity(net, y, None, 1.0, null_class=10)(x, 0.5)
    torch.testing.assert_close(v, net(x, torch.full((3,), 0.5), y))
    assert net.calls[0] == 3


def test_cfg_guides_every_channel_in_one_batched_forward():
    net = LabelNet(channels=4)
    x, y = torch.randn(3, 4, 5, 5), torch.tensor([1, 2, 3])
    prior = torch.randn(3, 4, 5, 5)
    v = guided_velocity(net, y, prior, 1.7, null_class=10)(x, 0.5)
    assert net.calls == [6]
    t = torch.full((3,), 0.5)
    vc, vu = net(x, t, y, prior), net(x, t, torch.full_like(y, 10), prior)
    torch.testing.assert_close(v, vu + 1.7 * (vc - vu))
    # All four channels differ from the conditional branch (not only the first three).
    assert all(not torch.allclose(v[:, ch], vc[:, ch]) for ch in range(4))


def test_time_samplers():
    u = sample_time(20000, "uniform", noise=StepNoise(0, 1))
    ln = sample_time(20000, "logit-normal", mean=0.0, std=1.0, noise=StepNoise(0, 2))
    for t in (u, ln):
        assert t.min() > 0 and t.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(ln.mean() - 0.5) < 0.01
    assert ln.std() < u.std()  # logit-normal concentrates mass in the middle
    shifted = sample_time(20000, "logit-normal", mean=1.0, std=1.0)
    assert shifted.mean() > 0.6
    with pytest.raises(ValueError):
        sample_time(4, "cosine")


def test_step_noise_is_a_function_of_seed_step_key_and_slices_the_global_batch():
    a, b = StepNoise(3, 10), StepNoise(3, 10)
    assert torch.equal(a.normal("e0", (4, 2)), b.normal("e0", (4, 2)))
    assert not torch.equal(a.normal("e0", (4, 2)), a.normal("e1", (4, 2)))
    assert not torch.equal(a.normal("e0", (4, 2)), StepNoise(3, 11).normal("e0", (4, 2)))
    whole = StepNoise(3, 10).uniform("t0", 6)
    parts = [StepNoise(3, 10, rank=r, world=3).uniform("t0", 2) for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)


def test_each_scale_draws_its_training_noise_under_its_own_key(tiny_cfg, monkeypatch):
    import msf.method.pipeline
    from msf.config import apply_overrides
    from msf.method.pipeline import MSFPipeline

    drawn = []  # (scale, t, noise, prior) as each scale's loss gets them
    real_flow = msf.method.pipeline.rectified_flow_loss

    def flow(net, c, y, t, prior=None, noise=None, **kw):
        drawn.append((0 if prior is None else 1, t, noise, prior))
        return real_flow(net, c, y, t, prior, noise, **kw)

    monkeypatch.setattr(msf.method.pipeline, "rectified_flow_loss", flow)
    pipe = MSFPipeline(apply_overrides(tiny_cfg, ["model.prior_noise=0.5"]).model)
    n = tiny_cfg.model.image_size
    x, y = torch.rand(4, 3, n, n) * 2 - 1, torch.tensor([0, 1, 2, 3])
    pipe.training_losses(x, y, noise=StepNoise(7, 3))
    pipe.training_losses(x, y, scales=[1], noise=StepNoise(7, 3))
    (_, t0, e0, _), (_, t1, e1, p1), (k, t1_alone, e1_alone, p1_alone) = drawn
    assert k == 1  # scale 1 alone draws what it draws beside scale 0: nothing depends on the other's draws
    assert torch.equal(t1, t1_alone) and torch.equal(e1, e1_alone) and torch.equal(p1, p1_alone)
    # and the two scales' draws are not one stream under one key (the leading values would agree)
    assert not torch.allclose(e1.flatten()[:16], e0.flatten()[:16]) and not torch.equal(t1, t0)


def test_label_dropout_rate_and_null_class():
    y = torch.zeros(20000, dtype=torch.long)
    d = drop_labels(y, 0.1, null_class=7)
    assert set(d.unique().tolist()) == {0, 7}
    assert abs((d == 7).float().mean() - 0.1) < 0.01
    assert torch.equal(drop_labels(y, 0.0, 7), y)


def test_loss_is_zero_for_the_true_velocity_and_positive_otherwise():
    c = torch.randn(4, 3, 6, 6)
    e = torch.randn_like(c)
    t = torch.rand(4) * 0.9 + 0.05

    class Oracle(nn.Module):  # x_t = (1-t)c + t e  =>  e - c = (x_t - c) / t
        def forward(self, x, t, y, prior=None):
            return (x - c) / t.view(-1, 1, 1, 1)

    y = torch.zeros(4, dtype=torch.long)
    assert rectified_flow_loss(Oracle(), c, y, t, noise=e) < 1e-10
    zero = rectified_flow_loss(lambda x, t, y, p: torch.zeros_like(x), c, y, t, noise=e)
    torch.testing.assert_close(zero, ((e - c) ** 2).mean())
    torch.testing.assert_close(interpolate(c, e, torch.zeros(4)), c)
    torch.testing.assert_close(interpolate(c, e, torch.ones(4)), e)


@pytest.mark.parametrize("override,match", [
    ({"cfg_scale": float("nan")}, r"cfg_scale: nan for scale 0 must be a number in \[0, 100\]"),
    ({"cfg_scale": float("inf")}, r"cfg_scale: inf .* in \[0, 100\]"),
    ({"cfg_scale": [1.0, 1e308]}, r"cfg_scale: 1e\+308 for scale 1"),
    ({"steps": -3}, r"steps: -3 for scale 0 must be an integer >= 1"),
    ({"steps": [4, 0]}, r"steps: 0 for scale 1"),
    ({"steps": 2.5}, r"steps: 2.5 .* integer"),
    ({"solver": "rk4"}, r"solver: 'rk4' for scale 0 must be one of \('euler', 'heun', 'midpoint', 'ab2'\)"),
    ({"steps": [1, 2, 3]}, r"steps: need one value per scale \(2\)"),
])
def test_sampler_settings_are_checked_when_made(tiny_cfg, override, match):
    from msf.config import ConfigError, SamplerSettings

    with pytest.raises(ConfigError, match=match):
        SamplerSettings.of(tiny_cfg.model, **override)


def test_sampler_settings_defaults_overrides_and_evaluations(tiny_cfg):
    from msf.config import SamplerSettings

    s = SamplerSettings.of(tiny_cfg.model)
    assert s.steps == (8, 4) and s.cfg_scale == (1.0, 1.0) and s.solver == ("euler", "euler")
    t = SamplerSettings.of(tiny_cfg.model, cfg_scale=[2.0, 1.0], solver="heun")
    assert t.steps == (8, 4) and t.solver == ("heun", "heun") and t.evaluations == 16 + 4
    assert SamplerSettings.of(tiny_cfg.model, steps=3, base=t).to_dict() == {
        "steps": [3, 3], "cfg_scale": [2.0, 1.0], "solver": ["heun", "heun"]}


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "ab2"])
def test_shifted_grids_keep_the_order_and_spend_steps_near_the_noise(solver):
    from msf.method.sampler import evaluation_times, time_grid

    grid = time_grid(8, 3.0)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and all(a > b for a, b in zip(grid, grid[1:]))
    assert grid[4] == pytest.approx(0.75)  # s t / (1 + (s - 1) t) at t = 1/2, s = 3
    assert time_grid(8, 1.0) == torch.linspace(1.0, 0.0, 9).tolist()  # the paper's grid, exactly
    assert sum(t > 0.5 for t in evaluation_times(8, "euler", 3.0)) == 6  # of 8: most near the noise
    exact = math.exp(-0.5)  # the order of the solver on the shifted grid (a smooth change of variable)
    errors = [abs(solve(_time_field, torch.ones(1, dtype=torch.float64), n, solver, 2.0).item() - exact)
              for n in (80, 160)]  # Heun's errors partly cancel at 40 on this grid: past that, its order
    order = 1 if solver == "euler" else 2
    assert 2 ** order * 0.8 < errors[0] / errors[1] < 2 ** order * 1.2


def test_ab2_and_midpoint_evaluate_at_the_right_times():
    from msf.method.sampler import evaluation_times, time_grid

    ts = time_grid(4)
    assert evaluation_times(4, "ab2") == pytest.approx(ts[:-1])  # one evaluation per interval, at its start
    mids = [u for a, b in zip(ts[::2][:-1], ts[::2][1:]) for u in (a, (a + b) / 2)]
    assert evaluation_times(4, "midpoint") == pytest.approx(mids)
    # dx/dt = 2t is linear in t: AB2's extrapolated line is exact after its first (Euler) interval
    x = solve(lambda x, t: 2 * t + 0 * x, torch.zeros(1, dtype=torch.float64), 4, "ab2")
    euler_first = 2 * 1.0 * (-0.25)
    assert x.item() == pytest.approx(euler_first + (0.0 - 0.75 ** 2), abs=1e-12)  # then t^2 from 0.75 to 0
    # ... on an uneven (shifted) grid too, which needs the step-size ratio in its coefficients
    g = time_grid(5, 3.0)
    x = solve(lambda x, t: 2 * t + 0 * x, torch.zeros(1, dtype=torch.float64), 5, "ab2", 3.0)
    assert x.item() == pytest.approx(2 * g[0] * (g[1] - g[0]) + (0.0 - g[1] ** 2), abs=1e-6)


def test_guidance_interval_guides_only_inside_it_and_counts_its_evaluations():
    from msf.config import SamplerSettings
    from msf.presets import preset

    calls = []

    def net(x, t, y, prior):
        calls.append((round(float(t[0]), 6), x.shape[0]))
        return torch.ones_like(x) * (y == 0).float().view(-1, 1, 1, 1)  # conditional 0, unconditional 1

    v = guided_velocity(net, torch.tensor([0, 0]), None, 3.0, 1, interval=(0.2, 0.6))
    x = torch.zeros(2, 1, 2, 2)
    assert torch.equal(v(x, 0.4), torch.full_like(x, 3.0))  # 1 + 3 * (0 - 1) ... uncond 0, cond 1: 3 * 1
    assert torch.equal(v(x, 0.8), torch.ones_like(x))  # outside: the conditional alone
    assert calls == [(0.4, 4), (0.8, 2)]
    model = preset("tiny").model
    full = SamplerSettings.of(model, steps=10, cfg_scale=2.0)
    part = SamplerSettings.of(model, steps=10, cfg_scale=2.0, guidance_interval=(0.0, 0.45))
    assert full.evaluations == 40 and part.evaluations == 2 * (10 + 4)  # t = 0.4 ... 0.1 of 1.0 ... 0.1
    assert part.to_dict()["guidance_interval"] == [[0.0, 0.45]] * 2 and "shift" not in part.to_dict()
    assert "guidance_interval" not in full.to_dict()  # the paper's settings record as before
    with pytest.raises(Exception, match=r"guidance_interval: \[0.5, 0.2\] for scale 0 must satisfy"):
        SamplerSettings.of(model, guidance_interval=(0.5, 0.2))
    with pytest.raises(Exception, match="shift: 0 for scale 1 must be a number in"):
        SamplerSettings.of(model, shift=[1.0, 0])


def test_named_samplers_paper_reproduces_todays_samples_and_survives_new_defaults(tmp_path):
    import json

    import torch

    from msf.config import ConfigError, SamplerSettings, apply_overrides, config_from_json, to_dict
    from msf.interfaces.cli import main
    from msf.method.pipeline import MSFPipeline
    from msf.presets import preset

    cfg = preset("tiny")
    assert SamplerSettings.named(cfg.model, "paper") == SamplerSettings.named(cfg.model)
    torch.manual_seed(0)
    pipe = MSFPipeline(cfg.model)
    with torch.no_grad():  # adaLN-Zero: an untrained network predicts 0 whatever the sampler
        for p in pipe.networks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    today = pipe.sample([0, 5], seed=4)
    # the defaults move to a cheaper sampler and "paper" pins the old steps (as issue 17 will do for a
    # preset): it still draws today's images, bit for bit
    moved = apply_overrides(cfg, ["model.scales.*.steps=2", "model.scales.0.solver=ab2",
                                  "model.scales.*.shift=3", 'model.samplers={"paper": {"solver": "euler", '
                                  '"shift": 1, "guidance_interval": [0, 1], "steps": [8, 4]}}'])
    pipe.config = moved.model
    assert not torch.equal(pipe.sample([0, 5], seed=4), today)
    paper = SamplerSettings.named(moved.model, "paper")
    assert torch.equal(pipe.sample([0, 5], settings=paper, seed=4), today)
    assert SamplerSettings.of(moved.model, name="paper", steps=3).steps == (3, 3)  # flags refine it
    # the names travel with the model; a name it lacks is refused with the names it has
    model_dir = pipe.save_pretrained(tmp_path / "m")
    assert main(["sample", str(model_dir), "--sampler", "paper", "--classes", "0,5", "--per-class", "1",
                 "--seed", "4", "--precision", "fp32", "--out", str(tmp_path / "g.png"), "--quiet"]) == 0
    with pytest.raises(ConfigError, match=r"sampler 'fast': this model names \['default', 'paper'\]"):
        SamplerSettings.named(moved.model, "fast")
    # a model saved before named settings existed: "paper" is its plain Euler default
    old = to_dict(cfg)
    del old["model"]["samplers"]
    assert SamplerSettings.named(config_from_json(json.dumps(old)).model, "paper").steps == (8, 4)
    with pytest.raises(ConfigError, match=r"model.samplers.x: steps: need one value per scale"):
        apply_overrides(cfg, ['model.samplers={"x": {"steps": [1, 2, 3]}}'])
    with pytest.raises(ConfigError, match=r"model.samplers.x.step"):
        apply_overrides(cfg, ['model.samplers={"x": {"step": [1, 2]}}'])


def _two_branch_net(calls):
    """Conditional branch (label 0) 1, unconditional (null label 1) 0: a guided value is then w itself."""
    def net(x, t, y, prior):
        calls.append(x.shape[0])
        return torch.ones_like(x) * (y == 0).float().view(-1, 1, 1, 1)
    return net


def test_guidance_applies_at_the_intervals_ends_and_not_just_outside():
    from msf.method.sampler import guided

    calls = []
    v = guided_velocity(_two_branch_net(calls), torch.tensor([0, 0]), None, 3.0, 1, interval=(0.25, 0.75))
    x = torch.zeros(2, 1, 2, 2)
    for t, inside in ((0.25, True), (0.75, True), (0.5, True), (0.25 - 1e-6, False), (0.75 + 1e-6, False)):
        calls.clear()
        assert guided(t, (0.25, 0.75)) == inside, t
        assert torch.equal(v(x, t), torch.full_like(x, 3.0 if inside else 1.0)), t
        assert calls == ([4] if inside else [2]), t  # both branches in one forward, or the conditional alone


@pytest.mark.parametrize("w", [0.0, 0.4, 0.9])
def test_guidance_scales_below_one_interpolate_towards_the_unconditional(w):
    net = LabelNet(channels=2)
    x, y = torch.randn(3, 2, 4, 4), torch.tensor([1, 2, 3])
    t = torch.full((3,), 0.3)
    vc, vu = net(x, t, y), net(x, t, torch.full_like(y, 10))
    net.calls.clear()
    v = guided_velocity(net, y, None, w, null_class=10)(x, 0.3)
    assert net.calls == [6]  # w != 1: both branches run
    torch.testing.assert_close(v, vu + w * (vc - vu))
    assert not torch.allclose(v, vc, atol=1e-3)  # not clamped to the conditional pass (w = 1)


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "ab2"])
def test_reported_evaluations_are_the_network_calls_each_solver_makes(solver, tiny_cfg):
    from msf.config import SamplerSettings, evaluations

    cases = [(5, 1.0, 2.0, (0.3, 0.7)), (6, 3.0, 2.0, (0.3, 0.7)), (7, 1.0, 1.5, (0.0, 1.0)),
             (4, 2.0, 1.0, (0.3, 0.7)), (9, 1.0, 0.5, (0.0, 0.45))]  # steps, shift, guidance, interval
    for steps, shift, w, interval in cases:
        calls = []
        velocity = guided_velocity(_two_branch_net(calls), torch.tensor([0, 0]), None, w, 1, interval)
        solve(velocity, torch.zeros(2, 1, 2, 2), steps, solver, shift)
        made = sum(calls) // 2  # network evaluations per image, both branches counted
        case = (steps, shift, w, interval)
        assert evaluations(steps, w, solver, shift, interval) == made, case
        settings = SamplerSettings.of(tiny_cfg.model, steps=steps, cfg_scale=w, solver=solver, shift=shift,
                                      guidance_interval=interval)
        assert settings.scale_evaluations(0) == made and settings.evaluations == 2 * made, case
    assert 9 < made < 18  # the last case guides only part of its evaluations
