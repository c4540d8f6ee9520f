"""MeanFlow scales (msf.method.meanflow): the target, its JVP, the few-step sampler, training and resume,
flow networks left as they were, and the misuses refused."""

import hashlib
import math
import subprocess
import sys

import pytest
import torch
from helpers import HANG
from safetensors.torch import load_file
from torch import nn

from msf.config import ConfigError, ModelConfig, ScaleConfig, apply_overrides
from msf.interfaces.info import scale_infos
from msf.method.flow import LossSettings, StepNoise
from msf.method.meanflow import WEIGHT_EPS, meanflow_loss, sample_interval, time_derivative
from msf.method.models import DiT, count_parameters
from msf.method.pipeline import MSFPipeline
from msf.method.sampler import SamplerSettings, guided_velocity, mean_velocity, solve, solve_meanflow
from msf.training.train import train

# the base scale of the tiny preset as a MeanFlow scale, 2 steps
MEANFLOW_BASE = ["model.scales.0.objective=meanflow", "model.scales.0.solver=meanflow",
                 "model.scales.0.steps=2"]


def _meanflow_scale(**kw) -> ScaleConfig:
    return ScaleConfig(image_size=8, depth=2, width=32, heads=2, objective="meanflow", solver="meanflow",
                       steps=1, **kw)


def _randomized(net: nn.Module, seed: int = 0) -> nn.Module:
    """Past adaLN-Zero's zeros, so that every parameter shapes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


# --------------------------------------------------------------------------- (a) the target by hand


class LinearField(nn.Module):
    """``u(z, r, t | y) = a z + b t + d r + e_y``: its time derivative along ``(v, 0, 1)`` is ``a v + b``."""

    def __init__(self, classes: int):
        super().__init__()
        self.a, self.b, self.d = (nn.Parameter(torch.tensor(v)) for v in (0.7, -0.4, 0.25))
        self.e = nn.Parameter(torch.linspace(-0.3, 0.3, classes + 1))  # the null class last

    def forward(self, x, t, y, prior=None, r=None):
        return self.a * x + (self.b * t + self.d * r + self.e[y]).view(-1, 1, 1, 1)


def test_the_loss_regresses_u_on_the_meanflow_identity_with_guidance_and_adaptive_weights():
    g = torch.Generator().manual_seed(0)
    c, e = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t, r = torch.tensor([0.9, 0.6, 0.5, 0.8]), torch.tensor([0.1, 0.6, 0.2, 0.3])  # one pair with r = t
    y, null, w, p = torch.tensor([0, 3, 1, 2]), 3, 2.5, 0.5  # the second label dropped to the null class
    net = LinearField(classes=3)
    loss = meanflow_loss(net, c, y, t, r, noise=e, guidance=w, null_class=null, weight_power=p)
    loss.backward()

    # by hand: the guided velocity, its total derivative a v~ + b, the target, the adaptive weight
    a, b, d, emb = (q.detach() for q in (net.a, net.b, net.d, net.e))
    col = lambda s: s.view(-1, 1, 1, 1)  # noqa: E731
    z, v = col(1 - t) * c + col(t) * e, e - c
    uncond = a * z + col(b * t + d * t + emb[null])  # u(z_t, t, t | null)
    v_g = torch.where(col(y != null), w * v + (1 - w) * uncond, v)
    u_tgt = v_g - col(t - r) * (a * v_g + b)
    params = [nn.Parameter(q.clone()) for q in (a, b, d, emb)]
    u = params[0] * z + col(params[1] * t + params[2] * r + params[3][y])
    err = (u - u_tgt).square().flatten(1).sum(1)
    weighted = ((err.detach() + WEIGHT_EPS) ** -p * err).mean()
    weighted.backward()
    assert loss.item() == pytest.approx(err.mean().item() / c[0].numel(), rel=1e-6)  # the value: plain MSE
    for mine, hand in zip((net.a, net.b, net.d, net.e), params):  # the gradient: the weighted loss's
        torch.testing.assert_close(mine.grad, hand.grad, rtol=1e-5, atol=1e-7)


def test_training_pairs_are_sorted_and_a_share_of_them_is_plain_flow_matching():
    settings = LossSettings(time_sampler="logit-normal", logit_mean=-0.4, meanflow_flow_share=0.75)
    r, t = sample_interval(40_000, settings, 0, StepNoise(seed=3, step=7))
    assert (r <= t).all() and ((0 < r) & (t < 1)).all()
    assert (r == t).float().mean().item() == pytest.approx(0.75, abs=0.01)
    assert (t - r)[r < t].mean() > 0.2  # the others span real intervals
    r2, t2 = sample_interval(40_000, settings, 0, StepNoise(seed=3, step=7))
    assert torch.equal(r, r2) and torch.equal(t, t2)  # a function of (seed, step): resumable


# --------------------------------------------------------------------------- (b) the JVP


def test_the_time_derivative_is_the_networks_jvp_along_v_0_1():
    net = _randomized(DiT(_meanflow_scale(), 8, 3, 4, prior_channels=3)).double()
    g = torch.Generator().manual_seed(1)
    z, v, prior = (torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    t, r = (torch.tensor(v, dtype=torch.float64) for v in ([0.7, 0.4, 0.9], [0.2, 0.4, 0.05]))
    y = torch.tensor([0, 4, 2])
    dudt = time_derivative(net, z, r, t, v, y, prior)

    def u(dz, dt):
        with torch.no_grad():
            return net(z + dz, t + dt, y, prior, r=r)

    eps = 1e-7  # the time embedding's frequencies reach 1000 / unit time: a small step, in float64
    central = (u(eps * v, eps) - u(-eps * v, -eps)) / (2 * eps)
    torch.testing.assert_close(dudt, central, rtol=1e-6, atol=1e-6)
    along_t = (u(0, eps) - u(0, -eps)) / (2 * eps)
    assert along_t.norm() > 0.05 * central.norm()  # both parts count: a dropped time tangent would fail


def test_the_jvp_under_bf16_autocast_and_on_bf16_weights_stays_within_two_percent():
    net = _randomized(DiT(_meanflow_scale(), 8, 3, 4))
    g = torch.Generator().manual_seed(2)
    z, v = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t, r, y = (torch.tensor(v) for v in ([0.9, 0.5, 0.3, 0.7], [0.1, 0.5, 0.0, 0.6], [0, 1, 2, 4]))
    ref = time_derivative(net, z, r, t, v, y, None)
    with torch.autocast("cpu", torch.bfloat16):
        mixed = time_derivative(net, z, r, t, v, y, None)
        # bf16 weights (FSDP's bf16 gather): oneDNN's bf16 Linear, which drops tangents, must not run
        low = time_derivative(net.to(torch.bfloat16), z, r, t, v, y, None)
    for d in (mixed, low):  # about 1%, twice the bf16 forward's own rounding (0.5%); dropped tangents: 100%
        assert ((d.float() - ref).norm() / ref.norm()).item() < 0.02


# --------------------------------------------------------------------------- (c) the sampler


class GaussianMeanFlow(nn.Module):
    """The exact average velocity of rectified flow from N(0, I) noise to N(mu, sigma^2) data: the ODE
    moves each noise e along ``z_t = (1 - t) mu + s(t) e``, ``s(t) = sqrt((1 - t)^2 sigma^2 + t^2)``,
    so ``u(z_t, r, t) = (z_t - z_r) / (t - r)``. Counts its evaluations."""

    def __init__(self, mu: float, sigma: float):
        super().__init__()
        self.mu, self.sigma, self.calls = mu, sigma, 0
        self.anchor = nn.Parameter(torch.zeros(()))  # a device for the pipeline

    def s(self, t):
        return ((1 - t) ** 2 * self.sigma**2 + t**2).sqrt()

    def forward(self, x, t, y, prior=None, r=None):
        self.calls += 1
        t, r = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
        e = (x - (1 - t) * self.mu) / self.s(t)
        return (x - (1 - r) * self.mu - self.s(r) * e) / (t - r)


def test_meanflow_steps_land_exactly_where_the_flow_goes_and_euler_does_not():
    mu, sigma = 0.2, 0.3
    net, e, y = GaussianMeanFlow(mu, sigma), torch.randn(5, 3, 4, 4), torch.zeros(5, dtype=torch.int64)
    for steps in (1, 2, 3, 4):
        x = solve_meanflow(mean_velocity(net, y, None), e, steps, shift=1.0 if steps < 3 else 2.0)
        torch.testing.assert_close(x, mu + sigma * e, rtol=0, atol=1e-5)
    velocity = lambda x, t: net(x, torch.full((5,), t), y, r=torch.full((5,), t - 1e-4))  # noqa: E731
    assert (solve(velocity, e, 1) - (mu + sigma * e)).abs().max() > 0.5  # one Euler step cannot


def test_a_meanflow_scale_samples_in_one_evaluation_per_step_everywhere_they_are_counted():
    mu, sigma, n, steps = 0.2, 0.3, 4, 3
    scale = ScaleConfig(image_size=n, depth=1, width=8, heads=2, objective="meanflow", solver="meanflow",
                        steps=steps)
    model = ModelConfig(num_classes=2, scales=[scale])
    net = GaussianMeanFlow(mu, sigma)
    pipe, ticks = MSFPipeline(model, networks=[net]), []
    images = pipe.sample([0, 1, 1], seed=5, callback=lambda k, done, total: ticks.append((done, total)))
    noise = torch.randn(3, 3, n, n, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(images, (mu + sigma * noise).clamp(-1, 1), rtol=0, atol=1e-5)
    assert net.calls == steps == SamplerSettings.named(model).evaluations
    assert scale_infos(model)[0].forwards_per_sample == steps
    assert ticks == [(i, steps) for i in range(1, steps + 1)]


# --------------------------------------------------------------------------- (d) training and resume


def _weights(model_dir, scales=(0, 1)):
    return {k: load_file(str(model_dir / f"scale_{k}.safetensors")) for k in scales}


@pytest.mark.filterwarnings("ignore:the EMA weights")
def test_a_meanflow_run_with_guidance_resumes_exactly(tiny_cfg, tmp_path):
    def cfg(out, steps):
        return apply_overrides(tiny_cfg, [*MEANFLOW_BASE, "train.meanflow_guidance=[2.0,1.0]",
                                          "train.lr=3e-3", "train.class_dropout=0.3", "train.log_every=3",
                                          "train.tensorboard=false", f"train.steps={steps}",
                                          f"train.out_dir={out}"])

    train(cfg(tmp_path / "a", 3), progress=False)
    resumed = train(cfg(tmp_path / "a", 6), progress=False, resume=True)
    straight = train(cfg(tmp_path / "b", 6), progress=False)
    a, b = _weights(resumed.model_dir), _weights(straight.model_dir)
    assert all(torch.equal(a[k][name], b[k][name]) for k in a for name in a[k])
    assert "interval_embedder.mlp.0.weight" in a[0] and "interval_embedder.mlp.0.weight" not in a[1]
    assert resumed.history == straight.history and all(math.isfinite(v) for _, v in straight.history[0])
    images = straight.pipeline.sample([0, 1], seed=0)  # the model directory samples with its own solver
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.filterwarnings("ignore:the EMA weights")
def test_a_compiled_meanflow_run_compiles_the_network_once_and_keeps_the_jvp_eager(tiny_cfg, tmp_path,
                                                                                 monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=recording, **kw))
    torch._dynamo.reset()
    counters.clear()
    cfg = apply_overrides(tiny_cfg, [*MEANFLOW_BASE, "train.compile=true", "train.steps=3",
                                     "train.tensorboard=false", f"train.out_dir={tmp_path}"])
    try:
        result = train(cfg, progress=False)
    finally:
        torch._dynamo.reset()
    assert result.steps == 3 and len(graphs) == 2 and not counters["graph_break"]


def test_meanflow_under_ddp_and_fsdp_computes_what_one_process_does(tmp_path):
    from msf.training.checkpoint import load_latest

    args = ["-m", "msf", "train", "--preset", "tiny", "--quiet", "train.tensorboard=false", "train.steps=2",
            "train.batch_size=8", "train.lr=3e-3", "train.meanflow_guidance=[2.0,1.0]", *MEANFLOW_BASE]
    runs = {"one": [sys.executable], "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc_per_node", "2"]}
    runs["fsdp"] = runs["ddp"]
    for name, launch in runs.items():
        extra = ["train.fsdp=true"] if name == "fsdp" else []
        r = subprocess.run([*launch, *args, *extra, f"train.out_dir={tmp_path / name}"], capture_output=True,
                           text=True, timeout=HANG)
        assert r.returncode == 0, r.stderr[-3000:]
    one = load_latest(tmp_path / "one" / "checkpoints")[0]
    for name in ("ddp", "fsdp"):
        other = load_latest(tmp_path / name / "checkpoints")[0]
        assert other["world_size"] == 2
        for name_, w in one["models"]["0"].items():
            torch.testing.assert_close(other["models"]["0"][name_], w, atol=2e-6, rtol=1e-5)


def test_repas_wrapper_passes_the_interval_through_and_its_term_is_added():
    from msf.training.repa import AlignedNet, Projector

    net = _randomized(DiT(_meanflow_scale(), 8, 3, 4))
    aligned = AlignedNet(net, Projector(32, 16, 8), depth=1)
    c, e, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    t, r = torch.tensor([0.8, 0.5]), torch.tensor([0.2, 0.5])
    plain = meanflow_loss(net, c, y, t, r, noise=e)
    with_term = meanflow_loss(aligned, c, y, t, r, noise=e, field=net, align=lambda z: 0 * z.sum() + 5.0)
    assert with_term.item() == pytest.approx(plain.item() + 5.0, rel=1e-5)


# --------------------------------------------------------------------------- (e) flow networks unchanged


def test_a_flow_network_keeps_its_parameters_and_outputs():
    """Reference numbers written by the code before MeanFlow: keys and outputs of the same seeded DiT."""
    torch.manual_seed(0)
    net = DiT(ScaleConfig(image_size=8, depth=2, width=32, heads=2), 8, 3, 4, prior_channels=3)
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    keys = list(net.state_dict())
    assert len(keys) == 31
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest().startswith("0da5ca7b1ac038a3")
    g = torch.Generator().manual_seed(1)
    x, prior = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        out = net(x, torch.tensor([0.3, 0.9]), torch.tensor([1, 4]), prior)
    assert out.sum().item() == pytest.approx(-18.509565, abs=1e-4)
    assert out.square().sum().item() == pytest.approx(29.714241, abs=1e-4)
    first = torch.tensor([-0.2093204, -0.0903923, -0.0214993, -0.5561252])
    torch.testing.assert_close(out.flatten()[:4], first, rtol=0, atol=1e-5)
    mean = DiT(_meanflow_scale(), 8, 3, 4, prior_channels=3)  # the same keys and one more time embedder
    extra = [k for k in mean.state_dict() if k not in keys]
    assert extra == [f"interval_embedder.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
    assert scale_infos(ModelConfig(num_classes=4, scales=[_meanflow_scale()]))[0].parameters \
        == count_parameters(DiT(_meanflow_scale(), 8, 3, 4))


# --------------------------------------------------------------------------- (f) misuses refused


def test_misuses_are_refused_with_the_setting_named(tiny_cfg):
    with pytest.raises(ConfigError, match=r"scales.0.objective='meanflow' .* set model.scales.0.solver"):
        apply_overrides(tiny_cfg, ["model.scales.0.objective=meanflow"])
    with pytest.raises(ConfigError, match=r"model.scales.1.solver='meanflow' is for a scale with objective"):
        apply_overrides(tiny_cfg, ["model.scales.1.solver=meanflow"])
    with pytest.raises(ConfigError, match=r"steps=1..4"):
        apply_overrides(tiny_cfg, [*MEANFLOW_BASE, "model.scales.0.steps=8"])
    with pytest.raises(ConfigError, match=r"time_convention must be 'msf'"):
        apply_overrides(tiny_cfg, [*MEANFLOW_BASE, "model.scales.0.time_convention=sit"])
    with pytest.raises(ConfigError, match=r"train.meanflow_guidance\[1\]=2: scale 1 trains rectified flow"):
        apply_overrides(tiny_cfg, [*MEANFLOW_BASE, "train.meanflow_guidance=[1.0,2.0]"])
    with pytest.raises(ConfigError, match=r"set train.class_dropout > 0"):
        apply_overrides(tiny_cfg, [*MEANFLOW_BASE, "train.meanflow_guidance=[2.0,1.0]",
                                   "train.class_dropout=0"])

    mixed = apply_overrides(tiny_cfg, MEANFLOW_BASE).model
    with pytest.raises(ConfigError, match=r"solver: 'euler' for scale 0, whose network \(meanflow\)"):
        SamplerSettings.of(mixed, solver=["euler", "euler"])
    with pytest.raises(ConfigError, match=r"cfg_scale: 2 for scale 0 \(meanflow\) must be 1"):
        SamplerSettings.of(mixed, cfg_scale=[2.0, 1.0])
    with pytest.raises(ConfigError, match=r"solver: 'meanflow' fits none of this model's scales"):
        SamplerSettings.of(tiny_cfg.model, solver="meanflow")
    # one value for every scale sets the scales it fits: the meanflow base keeps its solver
    assert SamplerSettings.of(mixed, solver="heun", cfg_scale=3.0).solver == ("meanflow", "heun")

    # the networks themselves: a mean-velocity network needs r, a velocity network takes none
    mean = DiT(_meanflow_scale(), 8, 3, 4)
    flow = DiT(ScaleConfig(image_size=8, depth=1, width=32, heads=2), 8, 3, 4)
    x, y = torch.randn(1, 3, 8, 8), torch.tensor([0])
    with pytest.raises(ValueError, match="objective 'meanflow'.* takes the start r"):
        solve(guided_velocity(mean, y, None, 1.0, 4), x, 2)  # a flow solver on a meanflow network
    with pytest.raises(ValueError, match="objective 'flow'.* takes no r"):
        solve_meanflow(mean_velocity(flow, y, None), x, 1)  # and the other way round
    with pytest.raises(ValueError, match="use solve_meanflow"):
        solve(lambda x, t: x, x, 1, "meanflow")
