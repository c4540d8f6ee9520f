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

A MeanFlow scale (``objective="meanflow"``, :mod:`msf.method.meanflow`) predicts the average velocity
``u(x, r, t)`` over ``[r, t]`` instead, and takes its own solver, ``meanflow``: 1 to 4 jumps
``x_r = x_t - (t - r) u(x_t, r, t)`` on the same grid, one evaluation each, guidance trained in
(``cfg_scale`` 1). Each kind of network takes only its own kind of solver.

A residual scale trained with conditioning augmentation (``model.prior_aug_max``) also takes the level
``prior_level`` of the noise put on its generated prior (the pipeline adds it), at most the largest level
it was trained with.

:class:`SamplerSettings` holds these choices for every scale of a model, checked when made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from msf.fields import ConfigError

Velocity = Callable[[Tensor, float], Tensor]
MeanVelocity = Callable[[Tensor, float, float], Tensor]  # u(x, r, t)

FLOW_SOLVERS = ("euler", "heun", "midpoint", "ab2")  # for a velocity network (objective "flow")
SOLVERS = (*FLOW_SOLVERS, "meanflow")  # "meanflow": for a mean-velocity network only
MEANFLOW_STEPS = (1, 4)  # the jumps a meanflow scale takes: past 4 a flow scale is the better buy
CFG_RANGE = (0.0, 100.0)  # guidance scales accepted (0: unconditional, 1: no guidance)
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


def mean_velocity(net: nn.Module, y: Tensor, prior: Tensor | None) -> MeanVelocity:
    """A MeanFlow network's average velocity ``u(x, r, t)``, conditional (its guidance is trained in)."""

    def u(x: Tensor, r: float, t: float) -> Tensor:
        n = x.shape[0]
        return net(x, torch.full((n,), t, device=x.device), y, prior, r=torch.full((n,), r, device=x.device))

    return u


def solvers_for(objective: str) -> tuple[str, ...]:
    """The solvers a scale's network of this objective (``flow`` or ``meanflow``) can be sampled with."""
    return ("meanflow",) if objective == "meanflow" else FLOW_SOLVERS


def time_grid(intervals: int, shift: float = 1.0) -> list[float]:
    """``intervals + 1`` times from 1 to 0: uniform, or shifted towards the noise (``shift`` > 1)."""
    ts = torch.linspace(1.0, 0.0, intervals + 1).tolist()
    if shift == 1.0:
        return ts  # the paper's grid, bit for bit
    return [shift * t / (1 + (shift - 1) * t) for t in ts]


def evaluation_times(steps: int, solver: str = "euler", shift: float = 1.0) -> list[float]:
    """The times at which ``solve`` (or ``solve_meanflow``) evaluates the field, one per evaluation."""
    if solver == "meanflow":
        return time_grid(steps, shift)[:-1]
    seen: list[float] = []
    solve(lambda x, t: seen.append(t) or x * 0, torch.zeros(1), steps, solver, shift)
    return seen


def solve(velocity: Velocity, x: Tensor, steps: int, solver: str = "euler", shift: float = 1.0) -> Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` from ``t = 1`` to ``t = 0`` with ``steps`` evaluations."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if solver == "meanflow":
        raise ValueError("solver 'meanflow' takes a mean velocity u(x, r, t): use solve_meanflow")
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


def solve_meanflow(u: MeanVelocity, x: Tensor, steps: int, shift: float = 1.0) -> Tensor:
    """MeanFlow's sampler: from ``t = 1`` to ``t = 0`` in ``steps`` jumps ``x_r = x_t - (t - r) u(x_t, r, t)``
    over the grid of :func:`time_grid`, one evaluation each; one step is ``x_0 = x_1 - u(x_1, 0, 1)``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = time_grid(steps, shift)
    for t, r in zip(ts[:-1], ts[1:]):
        x = x - (t - r) * u(x, r, t).to(x.dtype)
    return x


def evaluations(steps: int, cfg_scale: float, solver: str = "euler", shift: float = 1.0,
                interval: tuple[float, float] | list[float] = FULL_INTERVAL) -> int:
    """Network evaluations per image of one scale's sampler: ``steps`` per CFG branch, and two
    branches unless ``cfg_scale`` is 1 (the conditional pass alone), or at times outside the
    guidance ``interval``. A ``meanflow`` step is one evaluation: its guidance is trained in."""
    if cfg_scale == 1.0 or solver == "meanflow":
        return steps
    if tuple(interval) == FULL_INTERVAL:
        return 2 * steps
    lo, hi = interval
    return steps + sum(guided(t, (lo, hi)) for t in evaluation_times(steps, solver, shift))


class SampledModel(Protocol):
    """What :class:`SamplerSettings` reads of a model's config (an ``msf.config.ModelConfig``)."""

    scales: list[Any]  # each with steps, cfg_scale, solver, shift, guidance_interval, prior_level, objective
    samplers: dict[str, dict[str, Any]]  # named settings besides the scales' own
    prior: str  # "concat" or "none"
    prior_aug_max: float  # the largest prior level the residual networks were trained with


def objectives(model: SampledModel) -> tuple[str, ...]:
    """What each scale's network predicts: ``flow`` (the velocity) or ``meanflow`` (the average velocity)."""
    return tuple(getattr(s, "objective", "flow") for s in model.scales)


def prior_levels_max(model: SampledModel) -> tuple[float, ...]:
    """The largest prior level each scale's network was trained with: 0 where it takes none (the base
    scale, no prior, no conditioning augmentation), else ``model.prior_aug_max``."""
    top = 0.0 if getattr(model, "prior", "concat") == "none" else float(getattr(model, "prior_aug_max", 0.0))
    return tuple(0.0 if k == 0 else top for k in range(len(model.scales)))


def _for_its_scales(given: dict[str, Any], defaults: SamplerSettings) -> dict[str, Any]:
    """A named sampler's values, with a meanflow scale it names a flow solver for left at its own settings:
    written for a flow scale (the presets' ``paper``, Euler at 50 steps, on a base since made meanflow),
    they do not say how to sample it, as ``--solver euler`` does not."""
    k, solver = len(defaults.steps), given.get("solver")
    named = list(solver) if isinstance(solver, (list, tuple)) else [solver] * k
    own = [kind == "meanflow" and s in FLOW_SOLVERS for kind, s in zip(defaults.objective, named)]
    if not any(own) or len(named) != k:
        return given
    out = {}
    for key, value in given.items():
        one = not isinstance(value, (list, tuple)) or (key == "guidance_interval" and len(value) == 2 and all(
            isinstance(v, (int, float)) for v in value))  # one value (one pair) for every scale
        values = [value] * k if one else value
        mine = getattr(defaults, key, None)  # an unknown key or a wrong length: SamplerSettings.of says so
        out[key] = value if mine is None or len(values) != k else [
            d if keep else v for v, d, keep in zip(values, mine, own)]
    return out


@dataclass(frozen=True)
class SamplerSettings:
    """How each scale of Algorithm 3 is sampled, one value per scale: ``steps`` (network
    evaluations per CFG branch), ``cfg_scale`` (guidance; 1 is none), ``solver``, ``shift`` (of the
    time grid), ``guidance_interval`` and ``prior_level`` (the std of the noise on the generated prior);
    ``objective`` and ``prior_max``, the model's (what each network predicts; the largest prior level it was
    trained with, :func:`prior_levels_max`), say which solvers and levels fit.

    The pipeline, ``msf sample``, sample sets and sweeps share it; it is checked when made, so
    that a bad value fails before any sampling work, with the allowed range in the message.
    """

    steps: tuple[int, ...]
    cfg_scale: tuple[float, ...]
    solver: tuple[str, ...]
    shift: tuple[float, ...] | None = None  # None: 1 (uniform) at every scale
    guidance_interval: tuple[tuple[float, float], ...] | None = None  # None: (0, 1) at every scale
    objective: tuple[str, ...] | None = None  # None: "flow" at every scale
    prior_level: tuple[float, ...] | None = None  # None: 0 (the clean prior) at every scale
    prior_max: tuple[float, ...] | None = None  # None: 0 at every scale (no network takes a level)

    def __post_init__(self) -> None:
        k = len(self.steps)
        for name in ("prior_level", "prior_max"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, (0.0,) * k)
        if self.shift is None:
            object.__setattr__(self, "shift", (1.0,) * k)
        if self.objective is None:
            object.__setattr__(self, "objective", ("flow",) * k)
        if self.guidance_interval is None:
            object.__setattr__(self, "guidance_interval", (FULL_INTERVAL,) * k)
        object.__setattr__(self, "guidance_interval", tuple(tuple(float(v) for v in g)
                                                            for g in self.guidance_interval))
        if len(self.cfg_scale) != k or len(self.solver) != k or len(self.shift) != k \
                or len(self.guidance_interval) != k or len(self.objective) != k:
            raise ConfigError(f"sampler settings: one value per scale for steps, cfg_scale, solver, shift "
                              f"and guidance_interval, got {list(self.steps)}, {list(self.cfg_scale)}, "
                              f"{list(self.solver)}, {list(self.shift)}, {list(self.guidance_interval)}")
        for i in range(k):
            shift, (lo, hi) = self.shift[i], self.guidance_interval[i]
            if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not 0 < shift <= 100:
                raise ConfigError(f"shift: {shift!r} for scale {i} must be a number in (0, 100] "
                                  "(1 = uniform)")
            if not 0.0 <= lo <= hi <= 1.0:
                raise ConfigError(f"guidance_interval: [{lo:g}, {hi:g}] for scale {i} must satisfy "
                                  "0 <= a <= b <= 1 (times: 0 data, 1 noise)")
        for i in range(k):
            steps, w, solver = self.steps[i], self.cfg_scale[i], self.solver[i]
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ConfigError(f"steps: {steps!r} for scale {i} must be an integer >= 1")
            number = isinstance(w, (int, float)) and not isinstance(w, bool)
            if not number or not CFG_RANGE[0] <= w <= CFG_RANGE[1]:  # also NaN
                raise ConfigError(f"cfg_scale: {w!r} for scale {i} must be a number in "
                                  f"[{CFG_RANGE[0]:g}, {CFG_RANGE[1]:g}] (1 = no guidance)")
            if solver not in SOLVERS:
                raise ConfigError(f"solver: {solver!r} for scale {i} must be one of "
                                  f"{solvers_for(self.objective[i])}")
            self._check_objective(i)
        self._check_prior_levels()

    def _check_prior_levels(self) -> None:
        """Each scale's prior level within the levels its network was trained with."""
        if len(self.prior_level) != len(self.steps) or len(self.prior_max) != len(self.steps):
            raise ConfigError(f"prior_level: one value per scale, got {list(self.prior_level)}")
        for i, (level, top) in enumerate(zip(self.prior_level, self.prior_max)):
            number = isinstance(level, (int, float)) and not isinstance(level, bool)
            if number and top == 0 and level != 0:
                raise ConfigError(f"prior_level: {level!r} for scale {i}, whose network was trained without "
                                  "conditioning augmentation (model.prior_aug_max=0, or the base scale): "
                                  "it takes the clean prior, level 0")
            if not number or not 0 <= level <= top:  # also NaN
                raise ConfigError(f"prior_level: {level!r} for scale {i} must be a number in [0, {top:g}], "
                                  "the levels its network was trained with (model.prior_aug_max)")

    def _check_objective(self, i: int) -> None:
        """Scale i's solver, steps and guidance against what its network predicts."""
        kind, solver, steps, w = self.objective[i], self.solver[i], self.steps[i], self.cfg_scale[i]
        if solver not in solvers_for(kind):
            what = "the average velocity u(x, r, t)" if kind == "meanflow" else "the velocity v(x, t)"
            raise ConfigError(f"solver: {solver!r} for scale {i}, whose network ({kind}) predicts {what}: "
                              f"sample it with one of {solvers_for(kind)}")
        lo, hi = MEANFLOW_STEPS
        if kind == "meanflow" and not lo <= steps <= hi:
            raise ConfigError(f"steps: {steps} for scale {i} (meanflow) must be {lo} to {hi}; more steps are "
                              "a flow scale's work")
        if kind == "meanflow" and w != 1.0:
            raise ConfigError(f"cfg_scale: {w:g} for scale {i} (meanflow) must be 1: its guidance is trained "
                              "in (train.meanflow_guidance), one evaluation per step")

    @classmethod
    def named(cls, model: SampledModel, name: str = "default") -> SamplerSettings:
        """The model's per-scale defaults (``"default"``), or one of its named settings
        (``model.samplers``). ``"paper"``, the paper's sampler (Euler on a uniform grid, guidance
        throughout), also names the defaults of a model that has no named settings and samples so."""
        defaults = cls(tuple(s.steps for s in model.scales), tuple(float(s.cfg_scale) for s in model.scales),
                       tuple(s.solver for s in model.scales), tuple(float(s.shift) for s in model.scales),
                       tuple(tuple(s.guidance_interval) for s in model.scales), objectives(model),
                       tuple(float(getattr(s, "prior_level", 0.0)) for s in model.scales),
                       prior_levels_max(model))
        if name == "default":
            return defaults
        if name in model.samplers:
            return cls.of(model, base=defaults, **_for_its_scales(model.samplers[name], defaults))
        plain = all(s == "euler" for s in defaults.solver) and all(v == 1.0 for v in defaults.shift) \
            and all(g == FULL_INTERVAL for g in defaults.guidance_interval) and not any(defaults.prior_level)
        if name == "paper" and not model.samplers and plain:
            return defaults
        raise ConfigError(f"sampler {name!r}: this model names {['default', *model.samplers]}")

    @classmethod
    def of(cls, model: SampledModel, steps: Any = None, cfg_scale: Any = None, solver: Any = None,
           base: SamplerSettings | None = None, shift: Any = None, guidance_interval: Any = None,
           name: str | None = None, prior_level: Any = None) -> SamplerSettings:
        """``base`` (by default the model's named settings ``name``, else its per-scale defaults) with
        the given values replacing its own: each one value for every scale, or a list with one per scale
        (``guidance_interval``: one ``(a, b)`` pair, or a list of pairs). One ``solver``, ``cfg_scale`` or
        ``prior_level`` for every scale sets the scales it fits (a flow solver or a guidance scale: the flow
        scales; ``meanflow``: the meanflow scales; a prior level: the scales trained with one), so that
        ``--solver heun`` leaves a meanflow base as it is and ``--prior-level 0.2`` the base scale."""
        base = base or cls.named(model, name or "default")
        k, kinds, tops = len(model.scales), objectives(model), prior_levels_max(model)

        def per_scale(name: str, value: Any, default: tuple) -> tuple:
            if value is None:
                return default
            if isinstance(value, (list, tuple)):
                if len(value) != k:
                    raise ConfigError(f"{name}: need one value per scale ({k}), got {list(value)}")
                return tuple(value)
            if name not in ("solver", "cfg_scale", "prior_level") or (name == "solver"
                                                                      and value not in SOLVERS):
                return (value,) * k
            if name == "prior_level":
                fits = [top > 0 for top in tops]
                if not any(fits) and value != 0:
                    raise ConfigError(f"prior_level: {value!r} fits none of this model's scales: they were "
                                      "trained without conditioning augmentation (model.prior_aug_max=0)")
                return tuple(value if fit else d for fit, d in zip(fits, default))
            fits = [value in solvers_for(kind) if name == "solver" else kind == "flow" for kind in kinds]
            if not any(fits) and value != default[0]:
                raise ConfigError(f"{name}: {value!r} fits none of this model's scales ({', '.join(kinds)}); "
                                  "a meanflow scale samples with solver 'meanflow' at cfg_scale 1")
            return tuple(value if fit else d for fit, d in zip(fits, default))

        if guidance_interval is not None and len(guidance_interval) == 2 \
                and all(isinstance(v, (int, float)) for v in guidance_interval):
            guidance_interval = [tuple(guidance_interval)] * k  # one pair for every scale
        return cls(per_scale("steps", steps, base.steps),
                   per_scale("cfg_scale", cfg_scale, base.cfg_scale),
                   per_scale("solver", solver, base.solver),
                   per_scale("shift", shift, base.shift),
                   per_scale("guidance_interval", guidance_interval, base.guidance_interval), kinds,
                   per_scale("prior_level", prior_level, base.prior_level), tops)

    def make_defaults(self, model: SampledModel) -> None:
        """Write these settings into ``model``'s scales as their defaults."""
        for k, s in enumerate(model.scales):
            s.steps, s.cfg_scale, s.solver = self.steps[k], self.cfg_scale[k], self.solver[k]
            s.shift, s.guidance_interval = self.shift[k], list(self.guidance_interval[k])
            s.prior_level = self.prior_level[k]

    def scale_evaluations(self, k: int) -> int:
        """Network evaluations per image of scale k, CFG branches counted."""
        return evaluations(self.steps[k], self.cfg_scale[k], self.solver[k], self.shift[k],
                           self.guidance_interval[k])

    @property
    def evaluations(self) -> int:
        """Network evaluations per image, every scale and CFG branch counted."""
        return sum(self.scale_evaluations(k) for k in range(len(self.steps)))

    def to_dict(self) -> dict[str, list]:
        """The settings; the shift, the guidance interval and the prior level only where one differs from
        the paper's (uniform grid, guidance everywhere, the clean prior), so that records written without them
        still match."""
        out = {"steps": list(self.steps), "cfg_scale": list(self.cfg_scale), "solver": list(self.solver)}
        if any(v != 1.0 for v in self.shift):
            out["shift"] = list(self.shift)
        if any(g != FULL_INTERVAL for g in self.guidance_interval):
            out["guidance_interval"] = [list(g) for g in self.guidance_interval]
        if any(v != 0 for v in self.prior_level):
            out["prior_level"] = list(self.prior_level)
        return out

    def describe(self) -> str:
        """One line for captions: ``steps 100,50  cfg 1.4,1  euler  (300 evaluations/image)``."""
        solvers = self.solver[0] if len(set(self.solver)) == 1 else ",".join(self.solver)
        extra = ""
        if any(v != 1.0 for v in self.shift):
            extra += f"  shift {','.join(f'{v:g}' for v in self.shift)}"
        if any(g != FULL_INTERVAL for g in self.guidance_interval):
            extra += "  guided t in " + ",".join(f"[{a:g},{b:g}]" for a, b in self.guidance_interval)
        if any(v != 0 for v in self.prior_level):
            extra += f"  prior level {','.join(f'{v:g}' for v in self.prior_level)}"
        return (f"steps {','.join(map(str, self.steps))}  cfg {','.join(f'{w:g}' for w in self.cfg_scale)}  "
                f"{solvers}{extra}  ({self.evaluations} evaluations/image)")
