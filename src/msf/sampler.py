"""Fixed-step ODE solvers and classifier-free guidance for one scale (Algorithm 3's inner step).

The probability-flow ODE ``dx/dt = v(x, t)`` is solved from ``t = 1`` (noise) to
``t = 0`` (data) on a uniform grid. ``steps`` is always the number of network
evaluations per CFG branch, whatever the solver:

* ``euler``: ``steps`` intervals, one evaluation each.
* ``heun``: ``ceil(steps / 2)`` intervals, two evaluations each (predictor and
  corrector); when ``steps`` is odd the last interval is a plain Euler step, as
  in EDM (Karras et al., 2022).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

Velocity = Callable[[Tensor, float], Tensor]


def guided_velocity(
    net: nn.Module,
    y: Tensor,
    prior: Tensor | None,
    cfg_scale: float,
    null_class: int,
) -> Velocity:
    """``v = v_u + w (v_c - v_u)`` on every channel, both branches in one batched forward.

    With ``w == 1`` only the conditional branch runs (one forward, half the cost).
    """
    if cfg_scale == 1.0:

        def v_cond(x: Tensor, t: float) -> Tensor:
            return net(x, torch.full((x.shape[0],), t, device=x.device), y, prior)

        return v_cond

    y2 = torch.cat([y, torch.full_like(y, null_class)])
    prior2 = None if prior is None else torch.cat([prior, prior])

    def v_cfg(x: Tensor, t: float) -> Tensor:
        x2 = torch.cat([x, x])
        v = net(x2, torch.full((x2.shape[0],), t, device=x.device), y2, prior2)
        v_c, v_u = v.chunk(2)
        return v_u + cfg_scale * (v_c - v_u)

    return v_cfg


def solve(velocity: Velocity, x: Tensor, steps: int, solver: str = "euler") -> Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` from ``t = 1`` to ``t = 0`` with ``steps`` evaluations."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if solver == "euler":
        ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
        for t, t_next in zip(ts[:-1], ts[1:]):
            x = x + (t_next - t) * velocity(x, t).to(x.dtype)
        return x
    if solver == "heun":
        intervals = (steps + 1) // 2
        ts = torch.linspace(1.0, 0.0, intervals + 1).tolist()
        for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
            dt = t_next - t
            v = velocity(x, t).to(x.dtype)
            x_euler = x + dt * v
            last_is_euler = steps % 2 == 1 and i == intervals - 1
            if last_is_euler:
                x = x_euler
            else:
                x = x + dt * 0.5 * (v + velocity(x_euler, t_next).to(x.dtype))
        return x
    raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
