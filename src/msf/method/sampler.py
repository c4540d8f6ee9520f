"""Fixed-step ODE solvers and classifier-free guidance for one scale (Algorithm 3's inner step).

The probability-flow ODE ``dx/dt = v(x, t)`` is solved from ``t = 1`` (noise) to
``t = 0`` (data) on a grid of times: uniform (the paper's), or time-shifted (``shift`` s > 1 puts
more of the grid near the noise, SD3's ``t' = s t / (1 + (s - 1) t)``). ``steps`` is always the
number of network evaluations per CFG branch, whatever the solver:

* ``euler``: ``steps`` intervals, one evaluation each.
* ``heun``: ``ceil(steps / 2)`` intervals, two evaluations each (predictor and
  corrector); when ``steps`` is odd the last interval is a plain Euler step, as
  in EDM (Karras et al., 2022).
* ``midpoint``: as Heun, but the second evaluation at the interval's midpoint (explicit midpoint
  rule, second order).
* ``ab2``: ``steps`` intervals, one evaluation each, second order from the previous evaluation
  (Adams-Bashforth with variable steps; the first interval is Euler): a multistep solver in the
  spirit of DPM-Solver++(2M), for the flow's velocity.

Guidance may be limited to an interval of times (Kynkaanniemi et al., 2024): outside it only the
conditional branch runs, which also saves its evaluations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from msf.config import SOLVERS

Velocity = Callable[[Tensor, float], Tensor]


FULL_INTERVAL = (0.0, 1.0)


def guided(t: float, interval: tuple[float, float]) -> bool:
    """Whether guidance applies at time ``t``: inside ``interval``, ends included."""
    return interval[0] <= t <= interval[1]


def guided_velocity(
    net: nn.Module,
    y: Tensor,
    prior: Tensor | None,
    cfg_scale: float,
    null_class: int,
    interval: tuple[float, float] = FULL_INTERVAL,
) -> Velocity:
    """``v = v_u + w (v_c - v_u)`` on every channel, both branches in one batched forward.

    With ``w == 1``, or at a time outside ``interval``, only the conditional branch runs (one
    forward, half the cost).
    """

    def v_cond(x: Tensor, t: float) -> Tensor:
        return net(x, torch.full((x.shape[0],), t, device=x.device), y, prior)

    if cfg_scale == 1.0:
        return v_cond

    y2 = torch.cat([y, torch.full_like(y, null_class)])
    prior2 = None if prior is None else torch.cat([prior, prior])

    def v_cfg(x: Tensor, t: float) -> Tensor:
        if not guided(t, interval):
            return v_cond(x, t)
        x2 = torch.cat([x, x])
        v = net(x2, torch.full((x2.shape[0],), t, device=x.device), y2, prior2)
        v_c, v_u = v.chunk(2)
        return v_u + cfg_scale * (v_c - v_u)

    return v_cfg


def time_grid(intervals: int, shift: float = 1.0) -> list[float]:
    """``intervals + 1`` times from 1 to 0: uniform, or shifted towards the noise (``shift`` > 1)."""
    ts = torch.linspace(1.0, 0.0, intervals + 1).tolist()
    if shift == 1.0:
        return ts  # the paper's grid, bit for bit
    return [shift * t / (1 + (shift - 1) * t) for t in ts]


def evaluation_times(steps: int, solver: str = "euler", shift: float = 1.0) -> list[float]:
    """The times at which ``solve`` evaluates the field (one per network evaluation)."""
    seen: list[float] = []
    solve(lambda x, t: seen.append(t) or x * 0, torch.zeros(1), steps, solver, shift)
    return seen


def solve(velocity: Velocity, x: Tensor, steps: int, solver: str = "euler", shift: float = 1.0) -> Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` from ``t = 1`` to ``t = 0`` with ``steps`` evaluations."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if solver == "euler":
        ts = time_grid(steps, shift)
        for t, t_next in zip(ts[:-1], ts[1:]):
            x = x + (t_next - t) * velocity(x, t).to(x.dtype)
        return x
    if solver in ("heun", "midpoint"):
        intervals = (steps + 1) // 2
        ts = time_grid(intervals, shift)
        for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
            dt = t_next - t
            v = velocity(x, t).to(x.dtype)
            if steps % 2 == 1 and i == intervals - 1:  # an odd count: the last interval is Euler
                x = x + dt * v
            elif solver == "heun":
                x = x + dt * 0.5 * (v + velocity(x + dt * v, t_next).to(x.dtype))
            else:
                x = x + dt * velocity(x + 0.5 * dt * v, t + 0.5 * dt).to(x.dtype)
        return x
    if solver == "ab2":
        ts = time_grid(steps, shift)
        v_prev, dt_prev = None, None
        for t, t_next in zip(ts[:-1], ts[1:]):
            dt = t_next - t
            v = velocity(x, t).to(x.dtype)
            if v_prev is None:
                x = x + dt * v
            else:  # the line through the last two evaluations, integrated over this interval
                r = dt / dt_prev
                x = x + dt * ((1 + 0.5 * r) * v - 0.5 * r * v_prev)
            v_prev, dt_prev = v, dt
        return x
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
