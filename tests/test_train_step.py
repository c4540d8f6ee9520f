"""One training step's details, through ``msf.train.train``: the EMA's value and the label dropout."""

import pytest
import torch

import msf.pipeline
from msf.checkpoint import list_checkpoints
from msf.config import apply_overrides
from msf.pipeline import MSFPipeline
from msf.train import train


def _cfg(tiny_cfg, out, *extra):
    return apply_overrides(tiny_cfg, ["train.tensorboard=false", f"train.out_dir={out}", *extra])


def test_ema_after_each_step_is_the_decayed_average(tiny_cfg, tmp_path):
    decay = 0.7
    cfg = _cfg(tiny_cfg, tmp_path, "train.steps=2", "train.ckpt_every=1", "train.keep_last=5",
               f"train.ema_decay={decay}", "train.lr=1e-2")
    torch.manual_seed(cfg.train.seed)
    init = MSFPipeline(cfg.model).scales.state_dict()
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
    final = result.pipeline.scales.state_dict()
    for key, w in expected.items():
        torch.testing.assert_close(final[key], w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_labels_drop_to_the_null_class_at_the_configured_rate(tiny_cfg, tmp_path, monkeypatch, rate):
    seen = []  # (labels given to the step, labels the network got, scale)
    real_losses, real_flow = MSFPipeline.training_losses, msf.pipeline.rectified_flow_loss

    def losses(self, images, labels, *a, **kw):
        seen.append(("batch", labels.clone()))
        return real_losses(self, images, labels, *a, **kw)

    def flow(net, c, y, t, prior=None, noise=None):
        seen.append(("net", y.clone()))
        return real_flow(net, c, y, t, prior, noise)

    monkeypatch.setattr(MSFPipeline, "training_losses", losses)
    monkeypatch.setattr(msf.pipeline, "rectified_flow_loss", flow)
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
