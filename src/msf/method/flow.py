"""Rectified flow, the training objective of every scale (MSF eq. 5).

``x_t = (1 - t) * c + t * e`` with ``e ~ N(0, I)``; the network learns the
velocity ``dx_t/dt = e - c``. ``t = 0`` is data, ``t = 1`` is noise.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msf.config import ModelConfig, TrainConfig, time_shifts


class Noise:
    """Where the training randomness (times, noise, label dropout) comes from.

    This default draws from the global torch RNG. :class:`StepNoise` makes every
    draw a pure function of (seed, step, what), which is what makes resumed and
    multi-process runs equal a single uninterrupted one.
    """

    def uniform(self, key: str, n: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.rand(n, device=device)

    def normal(self, key: str, shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
        return torch.randn(shape, device=device)


class StepNoise(Noise):
    """Randomness of one training step, drawn for the global batch, sliced to this process.

    Each draw is seeded by (seed, step, key), so it does not depend on what was drawn
    before or on how many processes share the batch. It is drawn where it is used: on a
    GPU by the GPU's own generator (no host work, no copy), so a CUDA run's noise differs
    from a CPU run's, but not between 1 and N GPUs or across a resume.
    """

    def __init__(self, seed: int, step: int, rank: int = 0, world: int = 1):
        self.seed, self.step, self.rank, self.world = seed, step, rank, world

    def _generator(self, key: str, device: torch.device | str) -> torch.Generator:
        h = zlib.crc32(f"{self.seed}/{self.step}/{key}".encode())
        return torch.Generator(device=device).manual_seed(h * 1_000_003 + self.step)

    def _slice(self, full: Tensor, n: int) -> Tensor:
        return full[self.rank * n:(self.rank + 1) * n]

    def uniform(self, key: str, n: int, device: torch.device | str = "cpu") -> Tensor:
        gen = self._generator(key, device)
        return self._slice(torch.rand(n * self.world, generator=gen, device=device), n)

    def normal(self, key: str, shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
        gen = self._generator(key, device)
        full = torch.randn((shape[0] * self.world, *shape[1:]), generator=gen, device=device)
        return self._slice(full, shape[0])


@dataclass(frozen=True)
class LossSettings:
    """How eq. 5 is trained, at every scale: the labels dropped to the null class (which trains the
    CFG branch), the distribution of training times and the extra loss terms."""

    class_dropout: float = 0.1
    time_sampler: str = "uniform"  # or "logit-normal" (:func:`sample_time`)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    time_shift: Sequence[float] | None = None  # one per scale (:func:`shift_time`); None: unshifted
    cosine_weight: float = 0.0  # weight of the velocity-direction term of :func:`rectified_flow_loss`
    # the scales trained with MeanFlow (msf.method.meanflow): share of pairs with r = t, the adaptive
    # weight's power, and each scale's trained-in guidance (None: 1 everywhere)
    meanflow_flow_share: float = 0.75
    meanflow_weight_power: float = 1.0
    meanflow_guidance: Sequence[float] | None = None

    @classmethod
    def of(cls, train: TrainConfig, model: ModelConfig) -> LossSettings:
        """The settings a training config asks for (``time_shift`` as :func:`msf.config.time_shifts`)."""
        return cls(class_dropout=train.class_dropout, time_sampler=train.time_sampler,
                   logit_mean=train.logit_mean, logit_std=train.logit_std,
                   time_shift=time_shifts(train, model), cosine_weight=train.cosine_loss_weight,
                   meanflow_flow_share=train.meanflow_flow_share,
                   meanflow_weight_power=train.meanflow_weight_power,
                   meanflow_guidance=train.meanflow_guidance)


def sample_time(
    n: int,
    kind: str = "uniform",
    *,
    mean: float = 0.0,
    std: float = 1.0,
    device: torch.device | str = "cpu",
    noise: Noise | None = None,
    key: str = "t",
) -> Tensor:
    """Training times in (0, 1): ``uniform``, or ``logit-normal`` (sigmoid of N(mean, std))."""
    noise = noise or Noise()
    if kind == "uniform":
        return noise.uniform(key, n, device)
    if kind == "logit-normal":
        return torch.sigmoid(mean + std * noise.normal(key, (n,), device))
    raise ValueError(f"time sampler must be 'uniform' or 'logit-normal', got {kind!r}")


def shift_time(t: Tensor, shift: float) -> Tensor:
    """``s t / (1 + (s - 1) t)``: times moved towards the noise (s > 1; SD3's shift), 1 = unchanged."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def drop_labels(y: Tensor, p: float, null_class: int, noise: Noise | None = None) -> Tensor:
    """Replace each label by the null class with probability ``p`` (trains the CFG branch)."""
    if p <= 0:
        return y
    drop = (noise or Noise()).uniform("drop", y.shape[0], y.device) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


def interpolate(c: Tensor, e: Tensor, t: Tensor) -> Tensor:
    t = t.view(-1, *([1] * (c.dim() - 1)))
    return (1 - t) * c + t * e


def rectified_flow_loss(
    net: nn.Module,
    c: Tensor,
    y: Tensor,
    t: Tensor,
    prior: Tensor | None = None,
    noise: Tensor | None = None,
    cosine_weight: float = 0.0,
    align: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Eq. 5: ``|| v(x_t, t, y, prior) - (e - c) ||^2``, averaged over batch and elements; plus
    ``cosine_weight`` times the mean of ``1 - cos(v, e - c)`` per sample (a velocity-direction term).

    ``align``: ``net`` returns ``(v, z)`` and ``align(z)`` is added (REPA's term)."""
    e = torch.randn_like(c) if noise is None else noise
    v = net(interpolate(c, e, t), t, y, prior)
    if align is not None:
        v, z = v
    target = (e - c).float()
    loss = F.mse_loss(v.float(), target)
    if cosine_weight:
        cos = F.cosine_similarity(v.float().flatten(1), target.flatten(1), dim=1)
        loss = loss + cosine_weight * (1 - cos).mean()
    if align is not None:
        loss = loss + align(z)
    return loss
