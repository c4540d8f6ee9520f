"""One training step's details, through ``train``: the EMA's value and the label dropout."""

import pytest
import torch

import msf.method.pipeline
from msf.config import apply_overrides
from msf.method.pipeline import MSFPipeline
from msf.training.checkpoint import list_checkpoints
from msf.training.train import train


def _cfg(tiny_cfg, out, *extra):
    return apply_overrides(tiny_cfg, ["train.tensorboard=false", f"train.out_dir={out}", *extra])


def test_ema_after_each_step_is_the_decayed_average(tiny_cfg, tmp_path):
    decay = 0.7
    cfg = _cfg(tiny_cfg, tmp_path, "train.steps=2", "train.ckpt_every=1", "train.keep_last=5",
               f"train.ema_decay={decay}", "train.lr=1e-2")
    torch.manual_seed(cfg.train.seed)
    init = MSFPipeline(cfg.model).networks.state_dict()
    result = train(cfg, progress=False)
    states = [torch.load(p, weights_only=True) for _, p in list_checkpoints(tmp_path / "checkpoints")]
    assert [s["step"] for s in states] == [1, 2]
    expected = {name: w.clone() for name, w in init.items()}
    for s in states:
        for k in ("0", "1"):
            for name, raw in s["models"][k].items():
                key = f"{k}.{name}"
                expected[key] = decay * expected[key] + (1 - decay) * raw
                torch.testing.assert_close(s["emas"][k][name], expected[key], atol=1e-6, rtol=1e-5)
    moved = max((s["models"]["0"][n] - init[f"0.{n}"]).abs().max().item() for n in s["models"]["0"])
    assert moved > 1e-3  # the raw weights did change, so the average is not trivially equal
    final = result.pipeline.networks.state_dict()
    for key, w in expected.items():
        torch.testing.assert_close(final[key], w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_labels_drop_to_the_null_class_at_the_configured_rate(tiny_cfg, tmp_path, monkeypatch, rate):
    seen = []  # (labels given to the step, labels the network got, scale)
    real_losses, real_flow = MSFPipeline.training_losses, msf.method.pipeline.rectified_flow_loss

    def losses(self, images, labels, *a, **kw):
        seen.append(("batch", labels.clone()))
        return real_losses(self, images, labels, *a, **kw)

    def flow(net, c, y, t, prior=None, noise=None, **kw):
        seen.append(("net", y.clone()))
        return real_flow(net, c, y, t, prior, noise, **kw)

    monkeypatch.setattr(MSFPipeline, "training_losses", losses)
    monkeypatch.setattr(msf.method.pipeline, "rectified_flow_loss", flow)
    cfg = _cfg(tiny_cfg, tmp_path, "train.steps=8", "train.batch_size=64", f"train.class_dropout={rate}")
    train(cfg, progress=False, save=False)
    null = cfg.model.num_classes
    batches = [y for kind, y in seen if kind == "batch"]
    given = [y for kind, y in seen if kind == "net"]
    assert len(batches) == 8 and len(given) == 16  # two scales per step
    dropped = kept = 0
    for step, y in enumerate(batches):
        y0, y1 = given[2 * step], given[2 * step + 1]
        assert torch.equal(y0, y1)  # one draw per step, shared by the scales
        drop = y0 == null
        assert torch.equal(y0[~drop], y[~drop])  # the others keep their label
        assert (y < null).all()
        dropped, kept = dropped + int(drop.sum()), kept + int((~drop).sum())
    assert dropped / (dropped + kept) == pytest.approx(rate, abs=0.06)  # 512 labels: 4 sigma


def test_each_update_uses_the_scheduled_lr_and_clipped_gradients(tiny_cfg, tmp_path, monkeypatch):
    from msf.training.train import learning_rate

    seen = []  # (lr, gradient norm) at each optimizer step
    real_step = torch.optim.AdamW.step

    def step(self, *a, **kw):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append((self.param_groups[0]["lr"], torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()))
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cfg = _cfg(tiny_cfg, tmp_path, "train.steps=6", "train.warmup_steps=3", "train.lr_schedule=cosine",
               "train.lr=1e-2", "train.min_lr_ratio=0.1", "train.grad_clip=0.05")
    train(cfg, progress=False, save=False)
    assert len(seen) == 12  # two scales, six steps
    for i, (lr, norm) in enumerate(seen):
        assert lr == pytest.approx(learning_rate(cfg.train, i // 2 + 1, 6))
        assert norm <= 0.05 * (1 + 1e-4)
    assert seen[0][0] < seen[4][0] > seen[-1][0] > 0  # warm-up, then decay


def test_training_times_follow_the_configured_sampler(tiny_cfg, tmp_path, monkeypatch):
    times = {0: [], 1: []}
    real_flow = msf.method.pipeline.rectified_flow_loss

    def flow(net, c, y, t, prior=None, noise=None, **kw):
        times[0 if prior is None else 1].append(t.clone())
        return real_flow(net, c, y, t, prior, noise, **kw)

    monkeypatch.setattr(msf.method.pipeline, "rectified_flow_loss", flow)
    cfg = _cfg(tiny_cfg, tmp_path, "train.steps=8", "train.batch_size=64", "train.time_sampler=logit-normal",
               "train.logit_mean=1.0", "train.logit_std=0.5")
    train(cfg, progress=False, save=False)
    for k in (0, 1):
        logit = torch.logit(torch.cat(times[k]).double())
        assert logit.mean().item() == pytest.approx(1.0, abs=0.1)
        assert logit.std().item() == pytest.approx(0.5, abs=0.06)
    assert not torch.equal(times[0][0], times[1][0])  # each scale draws its own times


def test_gradient_checkpointing_gives_the_same_gradients(tiny_cfg):
    from msf.training.data import load_builtin, prepare_data, to_model_range

    data = prepare_data(load_builtin(), 16)
    x, y = to_model_range(data.images[:8]), data.labels[:8]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        pipe = MSFPipeline(tiny_cfg.model)
        for p in pipe.parameters():
            torch.nn.init.normal_(p, std=0.05)
        for net in pipe.networks:
            net.grad_checkpointing = checkpointing
        torch.manual_seed(1)
        sum(pipe.training_losses(x, y).values()).backward()
        grads.append([p.grad.clone() for p in pipe.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_std_normalisation_gives_unit_variance_components(tiny_cfg, tmp_path):
    from msf.training.data import load_builtin, prepare_data, to_model_range

    cfg = _cfg(tiny_cfg, tmp_path, "model.normalize=std", "train.steps=1")
    pipe = train(cfg, progress=False, save=False).pipeline
    std = pipe.config.component_std
    data = prepare_data(load_builtin(), 16)
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(5))[:2000]
    comps = pipe.components(to_model_range(data.images[pick]))
    for k, c in enumerate(comps):  # measured on other examples than these: unit variance to ~5%
        assert (c / std[k]).std().item() == pytest.approx(1.0, abs=0.05)
    assert std[1] < 0.5 * std[0]


@pytest.mark.parametrize("flip", ["true", "false"])
def test_a_step_of_train_is_the_method_written_out(tiny_cfg, tmp_path, flip):
    # Step 2 of train(), redone by hand from step 1's checkpoint: the step's batch (IndexStream),
    # its randomness (StepNoise), the per-scale losses (eq. 5), backward, clipping, the scheduled
    # lr, AdamW, and the EMA. Any missing zero_grad, wrong key, lr or clip shows as a difference.
    from msf.method.flow import LossSettings, StepNoise
    from msf.training.data import IndexStream, iterate_batches, load_dataset, prepare_data
    from msf.training.train import ema_update, learning_rate

    cfg = _cfg(tiny_cfg, tmp_path, "train.steps=2", "train.ckpt_every=1", "train.keep_last=5",
               "train.lr=1e-2", "train.warmup_steps=2", "train.grad_clip=0.5", "train.class_dropout=0.3",
               "model.prior_noise=0.1", "train.ema_decay=0.8", "train.log_every=1",
               f"train.random_flip={flip}")
    train(cfg, progress=False)
    (_, first), (_, second) = list_checkpoints(tmp_path / "checkpoints")
    s1, s2 = (torch.load(p, weights_only=True) for p in (first, second))
    t = cfg.train
    pipe = MSFPipeline(cfg.model)
    ema = MSFPipeline(cfg.model)
    opts = {}
    for k in (0, 1):
        pipe.networks[k].load_state_dict(s1["models"][str(k)])
        ema.networks[k].load_state_dict(s1["emas"][str(k)])
        opts[k] = torch.optim.AdamW(pipe.networks[k].parameters(), lr=t.lr, betas=tuple(t.betas),
                                    weight_decay=t.weight_decay)
        opts[k].load_state_dict(s1["optimizers"][str(k)])
    data = prepare_data(load_dataset(t.data, cfg.model.image_size), cfg.model.image_size)
    stream = IndexStream(data.labels, t.batch_size, seed=t.seed, balance_classes=t.balance_classes,
                         flip=t.random_flip)
    ((step, x, y, _),) = list(iterate_batches(data, stream, 2, 2))
    settings = LossSettings(class_dropout=t.class_dropout, time_sampler=t.time_sampler)
    losses = pipe.training_losses(x, y, settings=settings, noise=StepNoise(t.seed, 2))
    sum(losses.values()).backward()
    for k in (0, 1):
        torch.nn.utils.clip_grad_norm_(pipe.networks[k].parameters(), t.grad_clip)
        for g in opts[k].param_groups:
            g["lr"] = learning_rate(t, 2, t.steps)
        opts[k].step()
        ema_update(ema.networks[k], pipe.networks[k], t.ema_decay)
        for name, w in pipe.networks[k].state_dict().items():
            torch.testing.assert_close(s2["models"][str(k)][name], w, atol=1e-7, rtol=1e-6)
        for name, w in ema.networks[k].state_dict().items():
            torch.testing.assert_close(s2["emas"][str(k)][name], w, atol=1e-7, rtol=1e-6)
    assert [v for s, v in s2["history"]["0"] if s == 2][0] == pytest.approx(losses[0].item(), rel=1e-5)


def test_each_scale_trains_its_own_number_of_steps(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, tmp_path, "train.scale_steps=[4, 2]", "train.log_every=1", "train.ckpt_every=1",
               "train.keep_last=10")
    result = train(cfg, progress=False)
    assert [s for s, _ in result.history[0]] == [1, 2, 3, 4]
    assert [s for s, _ in result.history[1]] == [1, 2]
    states = {s: torch.load(p, weights_only=True) for s, p in list_checkpoints(tmp_path / "checkpoints")}
    assert sorted(states) == [1, 2, 3, 4]
    for name, w in states[2]["models"]["1"].items():  # scale 1 stops after its 2 steps ...
        assert torch.equal(states[4]["models"]["1"][name], w)
        assert torch.equal(states[4]["emas"]["1"][name], states[2]["emas"]["1"][name])
    changed = [not torch.equal(states[4]["models"]["0"][n], w) for n, w in states[3]["models"]["0"].items()]
    assert any(changed)  # ... while scale 0 goes on
    moved = [not torch.equal(states[2]["models"]["1"][n], w) for n, w in states[1]["models"]["1"].items()]
    assert any(moved)  # and its second step did update it


def test_deterministic_mode_trains_the_same_and_is_switched_back_off(tiny_cfg, tmp_path):
    plain = train(_cfg(tiny_cfg, tmp_path / "a", "train.steps=2"), progress=False, save=False)
    det = train(_cfg(tiny_cfg, tmp_path / "b", "train.steps=2", "train.deterministic=true"), progress=False,
                save=False)
    assert not torch.are_deterministic_algorithms_enabled()  # the process's setting is restored
    for a, b in zip(plain.pipeline.parameters(), det.pipeline.parameters()):
        assert torch.equal(a, b)  # on the CPU the kernels were deterministic already


def test_time_shift_and_cosine_loss_are_off_by_default_and_do_what_they_say():
    import torch

    from msf.config import ConfigError, validate
    from msf.method.flow import rectified_flow_loss, shift_time
    from msf.presets import preset

    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(shift_time(t, 1.0), t)
    torch.testing.assert_close(shift_time(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))

    class Fixed(torch.nn.Module):  # predicts v = 2 (e - c): right direction, twice the length
        def forward(self, x, t, y, prior=None):
            return self.target * 2

    c, e = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    net = Fixed()
    net.target = e - c
    mse = ((e - c) ** 2).mean()
    plain = rectified_flow_loss(net, c, None, torch.rand(3), noise=e)
    torch.testing.assert_close(plain, mse)
    same_way = rectified_flow_loss(net, c, None, torch.rand(3), noise=e, cosine_weight=0.5)
    torch.testing.assert_close(same_way, mse)
    net.target = -(e - c)  # the opposite direction: 1 - cos = 2 per sample
    opposite = rectified_flow_loss(net, c, None, torch.rand(3), noise=e, cosine_weight=0.5)
    torch.testing.assert_close(opposite, (((e - c) * 3) ** 2).mean() + 0.5 * 2)
    cfg = preset("tiny")
    cfg.train.time_shift = [1.0]
    with pytest.raises(ConfigError, match="train.time_shift needs 2 values"):
        validate(cfg)


def test_each_scale_trains_at_its_shifted_times(tiny_cfg, monkeypatch):
    import torch

    import msf.method.pipeline
    from msf.method.flow import LossSettings, Noise
    from msf.method.pipeline import MSFPipeline

    class Half(Noise):
        def uniform(self, key, n, device="cpu"):
            return torch.full((n,), 0.5, device=device)

    seen = {}
    real = msf.method.pipeline.rectified_flow_loss

    def flow(net, c, y, t, prior=None, noise=None, **kw):
        seen[0 if prior is None else 1] = (t.clone(), kw)
        return real(net, c, y, t, prior, noise, **kw)

    monkeypatch.setattr(msf.method.pipeline, "rectified_flow_loss", flow)
    pipe = MSFPipeline(tiny_cfg.model)
    images, labels = torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 3])
    pipe.training_losses(images, labels, noise=Half(),
                         settings=LossSettings(time_shift=[3.0, 1.0], cosine_weight=0.25))
    torch.testing.assert_close(seen[0][0], torch.full((4,), 0.75))  # 3 * 0.5 / (1 + 2 * 0.5)
    torch.testing.assert_close(seen[1][0], torch.full((4,), 0.5))
    assert seen[0][1] == seen[1][1] == {"cosine_weight": 0.25, "align": None}


def test_sd3_rule_derives_each_scales_shift_from_its_size_and_training_uses_it(tmp_path, monkeypatch):
    import math

    from msf.config import ConfigError, apply_overrides, time_shifts
    from msf.method.pipeline import MSFPipeline
    from msf.presets import preset
    from msf.training.train import train

    paper = apply_overrides(preset("paper-imagenet256"), ["train.time_shift_rule=sd3"])
    assert time_shifts(paper.train, paper.model) == [0.75, 1.0]  # 24x24x4 and 32x32x4 latents, ref 32x32x4
    tiny = apply_overrides(preset("tiny"), ["train.time_shift_rule=sd3", "train.time_shift_ref=48"])
    assert time_shifts(tiny.train, tiny.model) == [math.sqrt(8 * 8 * 3 / 48), math.sqrt(16 * 16 * 3 / 48)]
    assert time_shifts(preset("tiny").train, preset("tiny").model) is None  # off by default
    with pytest.raises(ConfigError, match="set one of them"):
        apply_overrides(tiny, ["train.time_shift=[2,1]"])
    seen = []
    real = MSFPipeline.training_losses

    def spy(self, *args, **kw):
        seen.append(kw["settings"].time_shift)
        return real(self, *args, **kw)

    monkeypatch.setattr(MSFPipeline, "training_losses", spy)
    train(apply_overrides(tiny, ["train.steps=2", "train.batch_size=4", "train.tensorboard=false",
                                 f"train.out_dir={tmp_path}"]), progress=False)
    assert seen == [[2.0, 4.0]] * 2


def test_a_compiled_run_compiles_each_scales_network_once_with_static_shapes(tiny_cfg, tmp_path, monkeypatch):
    """train.compile: no recompilation from step to step, no graph break, no symbolic shapes (the scales'
    networks share DiT.forward; the second size must not turn it dynamic). A recording backend stands in
    for inductor: recompiles and graph breaks are decided before the backend runs."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    graphs = []

    def recording(gm, example_inputs):  # the inputs of symbolic size
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        graphs.append([v for v in values if isinstance(v, torch.SymInt)
                       or any(isinstance(d, torch.SymInt) for d in getattr(v, "shape", ()))])
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=recording, **kw))
    torch._dynamo.reset()
    counters.clear()
    cfg = _cfg(tiny_cfg, tmp_path, "train.steps=6", "train.compile=true", "train.log_every=2")
    try:
        result = train(cfg, progress=False)
    finally:
        torch._dynamo.reset()
    assert result.steps == 6 and all(len(h) for h in result.history.values())
    assert len(graphs) == cfg.model.num_scales  # one graph per scale's network, for all six steps
    assert graphs == [[]] * cfg.model.num_scales  # static: no symbolic sizes among the inputs
    assert not counters["graph_break"]


def test_the_logged_rate_is_the_windows_not_the_runs_since_the_start(tiny_cfg, tmp_path, monkeypatch):
    """A slow first step (a compilation) slows the first log window only: the rate at a later log line is
    that window's, so a compiled run shows its speed once compiled."""
    import re
    import time

    import msf.training.train

    real, calls = msf.training.train.train_step, []

    def first_slow(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(2.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(msf.training.train, "train_step", first_slow)
    cfg = _cfg(tiny_cfg, tmp_path, "train.steps=6", "train.log_every=2", "train.batch_size=16")
    train(cfg, progress=False)
    log = (tmp_path / "log.txt").read_text()
    rates = [float(r) for r in re.findall(r"images_per_second=([0-9.e+-]+)", log)]
    assert len(rates) == 3
    assert rates[0] < 32 / 2.0  # the slow step's window
    # since the start, step 6 could not pass 6 x 16 images in over 2 s = 48 images/s
    assert rates[-1] > 48 and rates[-1] > 3 * rates[0]


def _record_adamw_steps(monkeypatch):
    """(optimizer, lr, betas, weight decay, gradient norm) at each AdamW step, in order."""
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **kw):
        g = self.param_groups[0]
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads])).item()
        seen.append((self, g["lr"], tuple(g["betas"]), g["weight_decay"], norm))
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def test_training_reads_the_data_in_its_seeds_order(tiny_cfg, tmp_path, monkeypatch):
    from msf.training.data import IndexStream, iterate_batches, load_dataset, prepare_data

    seen = []
    real = MSFPipeline.training_losses

    def losses(self, images, labels, *a, **kw):
        seen.append((images.clone(), labels.clone()))
        return real(self, images, labels, *a, **kw)

    monkeypatch.setattr(MSFPipeline, "training_losses", losses)
    for seed in (3, 4):
        train(_cfg(tiny_cfg, tmp_path / str(seed), "train.steps=2", f"train.seed={seed}"), progress=False,
              save=False)
    size = tiny_cfg.model.image_size
    data = prepare_data(load_dataset("emoji", size), size)
    expected = list(iterate_batches(data, IndexStream(data.labels, tiny_cfg.train.batch_size, seed=3), 1, 2))
    for (x, y), (_, ex, ey, _) in zip(seen[:2], expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)  # seed 3's batches, flips included
    assert not torch.equal(torch.cat([y for _, y in seen[:2]]), torch.cat([y for _, y in seen[2:]]))


def test_adamw_gets_the_configured_betas_and_its_weight_decay_acts(tiny_cfg, tmp_path, monkeypatch):
    seen = _record_adamw_steps(monkeypatch)
    lr, wd = 1e-2, 0.5
    raw = {}
    for decay in (0.0, wd):
        out = tmp_path / f"wd{decay}"
        cfg = _cfg(tiny_cfg, out, "train.steps=1", f"train.lr={lr}", "train.betas=[0.5, 0.8]",
                   f"train.weight_decay={decay}")
        train(cfg, progress=False)
        ((_, path),) = list_checkpoints(out / "checkpoints")
        raw[decay] = torch.load(path, weights_only=True)["models"]
    assert [(betas, d) for _, _, betas, d, _ in seen] == [((0.5, 0.8), 0.0)] * 2 + [((0.5, 0.8), wd)] * 2
    # AdamW decays the weights by lr * wd before its step, which is the same in both runs (same gradients)
    torch.manual_seed(tiny_cfg.train.seed)
    init = MSFPipeline(tiny_cfg.model).networks.state_dict()
    decayed = 0.0
    for k in ("0", "1"):
        for name, w in raw[0.0][k].items():
            diff = w - raw[wd][k][name]
            torch.testing.assert_close(diff, lr * wd * init[f"{k}.{name}"], atol=1e-7, rtol=1e-4)
            decayed = max(decayed, diff.abs().max().item())
    assert decayed > 1e-4


def test_gradient_clipping_is_off_at_zero_and_leaves_a_norm_at_the_limit(tiny_cfg, tmp_path, monkeypatch):
    seen = _record_adamw_steps(monkeypatch)

    def norms(clip):  # each scale's gradient norm as AdamW sees it after one step's clipping
        seen.clear()
        cfg = _cfg(tiny_cfg, tmp_path / str(clip), "train.steps=1", f"train.grad_clip={clip}")
        train(cfg, progress=False, save=False)
        return [n for *_, n in seen]

    free = norms(1e6)  # far above the norms: unclipped
    assert norms(0) == free  # 0 disables clipping: the same gradients, bit for bit
    n0, n1 = free
    at = norms(n0)  # scale 0's norm exactly at the limit: unchanged; each scale is clipped on its own
    assert at[0] == pytest.approx(n0, rel=1e-4) and at[1] == pytest.approx(min(n0, n1), rel=1e-4)
    assert norms(n0 / 2)[0] == pytest.approx(n0 / 2, rel=1e-4)  # above it: scaled down to the limit


def test_each_scales_cosine_schedule_spans_its_own_steps(tiny_cfg, tmp_path, monkeypatch):
    seen = _record_adamw_steps(monkeypatch)
    lr = 1e-2
    cfg = _cfg(tiny_cfg, tmp_path, "train.scale_steps=[4, 2]", "train.lr_schedule=cosine", f"train.lr={lr}",
               "train.min_lr_ratio=0.1", "train.warmup_steps=0")
    train(cfg, progress=False, save=False)
    opts = list(dict.fromkeys(opt for opt, *_ in seen))  # scale 0's optimizer steps first
    by_scale = [[r for o, r, *_ in seen if o is opt] for opt in opts]
    # cosine from lr to 0.1 lr over each scale's own steps: halfway 0.55 lr, the end 0.1 lr
    assert by_scale[1] == pytest.approx([0.55 * lr, 0.1 * lr])
    assert by_scale[0][1::2] == pytest.approx([0.55 * lr, 0.1 * lr]) and len(by_scale[0]) == 4
