"""MeanFlow (Geng et al., 2025, arXiv 2505.13447): the objective of a scale sampled in 1 to 4 steps.

Rectified flow (:mod:`msf.method.flow`) learns the velocity ``v(z_t, t)`` of the path
``z_t = (1 - t) c + t e`` (``t = 0`` data, ``t = 1`` noise). MeanFlow learns its average over an
interval ``[r, t]``::

    u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_s, s) ds          (u(z_t, t, t) = v(z_t, t))

so that one jump ``z_r = z_t - (t - r) u(z_t, r, t)`` replaces the ODE from t to r
(:func:`msf.method.sampler.solve_meanflow`). Differentiating ``(t - r) u = integral`` in t gives the
MeanFlow identity, whose right side is the training target::

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),     d/dt u = v . grad_z u + d/dt_partial u

The total derivative is one Jacobian-vector product of the network along the tangent
``(dz/dt, dr/dt, dt/dt) = (v, 0, 1)``; the target is held fixed (stop-gradient). The paper's recipe:

* (r, t): two draws of the training-time sampler, sorted so that ``t >= r``; a share of the pairs
  (75%) set ``r = t``, where the target is flow matching's ``e - c``;
* the network conditions on ``t`` and ``t - r`` (:class:`msf.method.models.DiT`);
* the loss is the squared error summed over a sample's elements, ``|D|^2``, weighted by
  ``sg(1 / (|D|^2 + c)^p)``, ``c = 1e-3``, ``p = 1`` (adaptive weighting);
* guidance is trained in (the paper's section 4.2): the velocity of the target and of the tangent is
  the guided field ``w v + (1 - w) u(z_t, t, t | null)`` (``v`` where the label was dropped to the null
  class), so sampling takes one evaluation per step and no guidance of its own (``cfg_scale`` 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from msf.method.flow import LossSettings, Noise, interpolate, sample_time, shift_time

WEIGHT_EPS = 1e-3  # c of the adaptive weight, the paper's


def sample_interval(n: int, settings: LossSettings, k: int, noise: Noise,
                    device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Scale k's training pairs ``(r, t)``, ``t >= r``: two draws of the time sampler (shifted as
    scale k's flow times are), sorted; ``r = t`` with probability ``settings.meanflow_flow_share``."""
    def draw(key: str) -> Tensor:
        s = sample_time(n, settings.time_sampler, mean=settings.logit_mean, std=settings.logit_std,
                        device=device, noise=noise, key=key)
        return shift_time(s, 1.0 if settings.time_shift is None else settings.time_shift[k])

    a, b = draw(f"t{k}"), draw(f"r{k}")
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    same = noise.uniform(f"same{k}", n, device) < settings.meanflow_flow_share
    return torch.where(same, t, r), t


def guided_field(field: nn.Module, z: Tensor, t: Tensor, y: Tensor, prior: Tensor | None, v: Tensor,
                 guidance: float, null_class: int) -> Tensor:
    """``w v + (1 - w) u(z_t, t, t | null)``, the velocity of the guided field (the unconditional
    branch at ``r = t`` is the network's own velocity), and ``v`` where the label is the null class."""
    with torch.no_grad():
        uncond = field(z, t, torch.full_like(y, null_class), prior, r=t).to(v.dtype)
    kept = (y != null_class).view(-1, *([1] * (v.dim() - 1)))
    return torch.where(kept, guidance * v + (1 - guidance) * uncond, v)


def time_derivative(field: nn.Module, z: Tensor, r: Tensor, t: Tensor, v: Tensor, y: Tensor,
                    prior: Tensor | None) -> Tensor:
    """``d/dt u(z_t, r, t) = v . grad_z u + d/dt_partial u``: one forward-mode JVP along ``(v, 0, 1)``,
    under the caller's autocast: bf16 tangents are within 2% of fp32's, about twice the bf16 forward's own
    rounding, far below the noise of the target's ``v`` (``tests/test_meanflow.py``).

    No gradient flows through it (the target is fixed), so it runs without building a graph, on the bare
    network: DDP's and torch.compile's wrappers stay out of it, and each step's one backward is theirs."""

    def u(z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        return field(z, t, y, prior, r=r)

    # SDPA's fused kernels have no forward-mode rule; the math kernel computes the same attention
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, dudt = torch.func.jvp(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    return dudt


def meanflow_loss(
    net: nn.Module,
    c: Tensor,
    y: Tensor,
    t: Tensor,
    r: Tensor,
    prior: Tensor | None = None,
    noise: Tensor | None = None,
    *,
    field: nn.Module | None = None,
    guidance: float = 1.0,
    null_class: int = 0,
    weight_power: float = 1.0,
    align: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """MeanFlow's loss for one scale, averaged over the batch (the paper's Algorithm 1). Its gradient is
    the adaptive-weighted loss's; its value the plain mean squared error per element, which says more.

    ``net(z, t, y, prior, r=r)`` is the trained call (under DDP, compiled, with REPA's projector);
    ``field`` the bare network it wraps, which the target differentiates (default: ``net``).
    ``guidance`` is ``w``, trained in; ``null_class`` the label of the unconditional branch.
    ``align``: ``net`` returns ``(u, z)`` and ``align(z)`` is added (REPA's term)."""
    field = net if field is None else field
    e = torch.randn_like(c) if noise is None else noise
    z = interpolate(c, e, t)
    v = e - c  # the conditional velocity dz/dt
    if guidance != 1.0:
        v = guided_field(field, z, t, y, prior, v, guidance, null_class)
    dudt = time_derivative(field, z, r, t, v, y, prior)
    u_tgt = v - (t - r).view(-1, *([1] * (v.dim() - 1))) * dudt.to(v.dtype)  # no graph: a fixed target
    u = net(z, t, y, prior, r=r)
    if align is not None:
        u, tokens = u
    error = (u.float() - u_tgt.float()).square().flatten(1).sum(1)  # |D|^2 per sample
    weight = (error.detach() + WEIGHT_EPS) ** -weight_power  # adaptive weighting, held fixed
    loss = (weight * error).mean()
    # its value as the log shows it: the mean squared error per element, as rectified flow's (the weighted
    # loss is about 1 whatever the error when p = 1); its gradient stays the weighted loss's
    loss = loss - loss.detach() + error.detach().mean() / u[0].numel()
    return loss if align is None else loss + align(tokens)
