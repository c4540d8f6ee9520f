"""Training (Algorithms 1-2) and sampling (Algorithm 3) agree on what each scale's network sees.

Oracle networks stand in for the trained DiTs: scale k's oracle drives the flow exactly to
a fixed target (the normalised component ``c_k / std_k`` of one real image), and records the
prior it is given. Then, with three scales and distinct per-scale normalisation factors:

* sampling rebuilds the image from its components, so every scale contributes and each is
  un-normalised with its own factor;
* the prior the sampler hands to scale k is the one training hands it for the same image:
  the accumulated coarser components, resized to ``n_k`` and normalised as in training;
* conditioning noise on the prior (``model.prior_noise``) is added in both, at the configured std.
"""

import pytest
import torch
from torch import nn

from msf.config import ScaleConfig, apply_overrides
from msf.method.factorize import down, up
from msf.method.flow import LossSettings
from msf.method.pipeline import MSFPipeline
from msf.training.data import load_builtin, prepare_data, to_model_range

STD = [0.5, 0.2, 0.1]  # distinct per-scale factors, so a factor used at the wrong scale shows


class Oracle(nn.Module):
    """``v = (x - target) / t``: the velocity of the straight path to ``target``.

    Euler's last step (from t to 0) lands on ``target`` exactly, whatever the state.
    """

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target
        self.priors: list[torch.Tensor | None] = []
        self.labels: list[torch.Tensor] = []

    def forward(self, x, t, y, prior=None):
        self.priors.append(None if prior is None else prior.clone())
        self.labels.append(y.clone())
        target = self.target.repeat(x.shape[0] // self.target.shape[0], 1, 1, 1)  # CFG doubles the batch
        return (x - target) / t.view(-1, 1, 1, 1)


def _pipeline(tiny_cfg, prior_noise=0.0):
    cfg = apply_overrides(tiny_cfg, ["model.normalize=std", f"model.prior_noise={prior_noise}"])
    cfg.model.scales = [ScaleConfig(image_size=s, depth=1, width=32, heads=2, steps=3)
                        for s in (4, 8, 16)]
    cfg.model.component_std = list(STD)
    return MSFPipeline(cfg.model)


def _images(n):
    data = prepare_data(load_builtin(), 16)
    idx = torch.arange(n) * (len(data) // n)
    return to_model_range(data.images[idx]), data.labels[idx]


def _expected_priors(comps):
    """Algorithm 2 written out: prior_k = down(sum_{j<k} up(c_j, N), n_k), in the base's units."""
    N = comps[-1].shape[-1]
    out = [None]
    for k in range(1, len(comps)):
        acc = sum(up(c, N) for c in comps[:k])
        out.append(down(acc, comps[k].shape[-1]) / STD[0])
    return out


def _sample_with_oracles(pipe, comps, labels, **kw):
    oracles = {k: Oracle(c / STD[k]) for k, c in enumerate(comps)}
    images, sampled = pipe.sample(labels, nets=oracles, solver="euler", return_components=True, **kw)
    return images, sampled, oracles


def _train_with_oracles(pipe, x, labels, comps):
    oracles = {k: Oracle(c / STD[k]) for k, c in enumerate(comps)}
    losses = pipe.training_losses(x, labels, nets=oracles, settings=LossSettings(class_dropout=0.0))
    # training regresses onto the normalised components the sampler un-normalises: the oracle is exact
    assert all(v.item() < 1e-8 for v in losses.values()), losses
    return oracles


def test_three_scale_sampling_rebuilds_the_image_from_every_component(tiny_cfg):
    pipe = _pipeline(tiny_cfg)
    x, y = _images(4)
    comps = pipe.components(x)
    assert [c.shape[-1] for c in comps] == [4, 8, 16]
    assert all(c.abs().mean() > 1e-3 for c in comps)  # each scale carries part of the image
    images, sampled, _ = _sample_with_oracles(pipe, comps, y, cfg_scale=[2.0, 1.5, 1.0])
    for k in range(3):  # each component comes back in its own units (times its own std)
        torch.testing.assert_close(sampled[k], comps[k], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(images, x, atol=1e-5, rtol=0)


def test_sampler_priors_equal_training_priors(tiny_cfg):
    pipe = _pipeline(tiny_cfg)
    x, y = _images(4)
    comps = pipe.components(x)
    trained = _train_with_oracles(pipe, x, y, comps)
    _, _, sampled = _sample_with_oracles(pipe, comps, y, cfg_scale=[2.0, 1.5, 1.0])
    expected = _expected_priors(comps)
    assert trained[0].priors == [None] and set(sampled[0].priors) == {None}
    for k in (1, 2):
        train_prior = trained[k].priors[0]
        torch.testing.assert_close(train_prior, expected[k], atol=1e-6, rtol=1e-6)
        for p in sampled[k].priors:  # every step of scale k, both CFG branches
            torch.testing.assert_close(p[:4], train_prior, atol=1e-5, rtol=1e-5)
    # scale 1 guides (CFG 1.5): both branches see the same prior; scale 2 does not (one branch)
    assert all(p.shape[0] == 8 and torch.equal(p[:4], p[4:]) for p in sampled[1].priors)
    assert all(p.shape[0] == 4 for p in sampled[2].priors)
    assert len(sampled[1].priors) == 3 and len(sampled[2].priors) == 3


@pytest.mark.parametrize("prior_noise", [0.0, 0.3])
def test_conditioning_noise_is_applied_in_training_and_sampling_alike(tiny_cfg, prior_noise):
    pipe = _pipeline(tiny_cfg, prior_noise)
    x, y = _images(64)
    comps = pipe.components(x)
    clean = _expected_priors(comps)
    trained = _train_with_oracles(pipe, x, y, comps)
    _, _, sampled = _sample_with_oracles(pipe, comps, y, cfg_scale=1.0)
    for k in (1, 2):
        seen = {"training": trained[k].priors[0], "sampling": sampled[k].priors[0]}
        for where, p in seen.items():
            noise = p - clean[k]
            assert abs(noise.mean()) < 0.02, where
            assert noise.std().item() == pytest.approx(prior_noise, abs=0.02), (where, k)
        # within one sample, the noise is drawn once and used at every step
        assert all(torch.equal(p, sampled[k].priors[0]) for p in sampled[k].priors)
