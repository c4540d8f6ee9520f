"""Rectified flow, the training objective of every scale (MSF eq. 5).

``x_t = (1 - t) * c + t * e`` with ``e ~ N(0, I)``; the network learns the
velocity ``dx_t/dt = e - c``. ``t = 0`` is data, ``t = 1`` is noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sample_time(
    n: int,
    kind: str = "uniform",
    *,
    mean: float = 0.0,
    std: float = 1.0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Training times in (0, 1): ``uniform``, or ``logit-normal`` (sigmoid of N(mean, std))."""
    if kind == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if kind == "logit-normal":
        return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))
    raise ValueError(f"time sampler must be 'uniform' or 'logit-normal', got {kind!r}")


def drop_labels(y: Tensor, p: float, null_class: int, generator: torch.Generator | None = None):
    """Replace each label by the null class with probability ``p`` (trains the CFG branch)."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p
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
) -> Tensor:
    """Eq. 5: ``|| v(x_t, t, y, prior) - (e - c) ||^2``, averaged over batch and elements."""
    e = torch.randn_like(c) if noise is None else noise
    v = net(interpolate(c, e, t), t, y, prior)
    return F.mse_loss(v.float(), (e - c).float())
