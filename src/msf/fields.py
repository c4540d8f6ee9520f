"""Config fields that carry their rules: :func:`setting` declares one (its range or choices, whether it
is one value per scale or a sampler default, whether ``--resume`` may change it, whether it changes the
work of a training step), :func:`check_fields` checks a config object against the declarations, and
:func:`from_dict` builds one from plain data, naming the key and the expected type of a bad value.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config value, file or override is invalid; the message names the field."""


@dataclass(frozen=True)
class Rule:
    """What a field's declaration says beyond its type and default (see :func:`setting`)."""

    within: tuple[float, float, bool, bool] | None  # (lo, hi, lo allowed, hi allowed)
    choices: tuple | None
    per_scale: bool
    sampling: bool
    resume: bool
    cost: bool


def setting(default: Any = dataclasses.MISSING, within: str | tuple[float, float] | None = None, *,
            choices: tuple | None = None, per_scale: bool = False, sampling: bool = False,
            resume: bool = False, cost: bool = True) -> Any:
    """A config field with its :class:`Rule`; no default: a required field.

    ``within``: the range of a number, or of each number of a list, as ``"[1, inf)"`` or ``"(0, 1]"``;
    a pair ``(lo, hi)`` is closed. ``choices``: the values allowed. ``per_scale``: a list with one
    value per scale (or None). ``sampling``: a scale's sampler default, which changes how a model
    samples, not how it trains. ``resume``: a ``--resume`` may change it without changing what the
    run computes. ``cost``: it changes the work of a training step; ``msf compare`` gives presets
    that differ only in fields without cost one measured step rate.
    """
    if isinstance(within, str):
        lo, hi = within[1:-1].split(",")
        bounds = (float(lo), float(hi), within[0] == "[", within[-1] == "]")
    else:
        bounds = None if within is None else (float(within[0]), float(within[1]), True, True)
    meta = {"rule": Rule(bounds, choices, per_scale, sampling, resume, cost)}
    if type(default).__hash__ is None:  # a list, dict or config: a fresh copy for every instance
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_declarations(cls: type) -> None:
    """Every field of config class ``cls`` declared with :func:`setting`; raise naming one that is not."""
    for f in dataclasses.fields(cls):
        if not isinstance(f.metadata.get("rule"), Rule):
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with msf.fields.setting(...), which says "
                            "its range or choices, whether --resume may change it and whether it costs work")


def fields_where(cls: type, flag: str, value: bool = True) -> tuple[str, ...]:
    """The names of ``cls``'s fields whose :class:`Rule` has ``flag`` equal to ``value``, in order."""
    return tuple(f.name for f in dataclasses.fields(cls) if getattr(f.metadata["rule"], flag) == value)


def check_fields(obj: Any, where: str, num_scales: int = 0) -> None:
    """Each field of ``obj`` as its declaration says: true or false, one of its choices, one value per
    scale, within its range (each value of a list)."""
    for f in dataclasses.fields(obj):
        rule, value, name = f.metadata["rule"], getattr(obj, f.name), f"{where}.{f.name}"
        kind, optional, listed = _kinds(type(obj))[f.name]
        if value is None and optional:
            continue
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        if listed and not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        if rule.choices is not None and value not in rule.choices:
            raise ConfigError(f"{name} must be one of {rule.choices}, got {value!r}")
        if rule.per_scale and len(value) != num_scales:
            raise ConfigError(f"{name} needs {num_scales} values (one per scale), got {value}")
        if rule.within is not None:
            items = enumerate(value) if listed else [(None, value)]
            for i, v in items:
                in_range(name if i is None else f"{name}[{i}]", v, rule.within, integer=kind is int)


@functools.cache
def _kinds(cls: type) -> dict[str, tuple[Any, bool, bool]]:
    """Each field's scalar type (a list's items'), whether it may be None, whether it is a list."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        tp = next(a for a in args if a is not type(None))
        listed = typing.get_origin(tp) is list
        out[name] = (typing.get_args(tp)[0] if listed else tp, type(None) in args, listed)
    return out


def in_range(name: str, value: Any, within: tuple[float, float, bool, bool], integer: bool) -> None:
    """Raise naming ``name`` and the interval unless ``value`` is a finite number (an integer if
    ``integer``) within it."""
    lo, hi, lo_ok, hi_ok = within
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value > lo or (lo_ok and value == lo)) \
        and (value < hi or (hi_ok and value == hi))
    if not ok:
        interval = f"{'[' if lo_ok else '('}{lo:g}, {hi:g}{']' if hi_ok else ')'}"
        raise ConfigError(f"{name} must be {'an integer' if integer else 'a number'} in {interval}, "
                          f"got {value!r}")


# --------------------------------------------------------------------------- (de)serialisation


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, checking keys and types."""
    return _coerce(cls, data, where or cls.__name__)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _coerce_object(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(tp, value, where)
    if tp is Any:
        return value
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        return {str(k): _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{where}.{i}") for i, v in enumerate(value)]
    return _coerce_scalar(tp, value, where)


def _coerce_object(tp: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
    hints = typing.get_type_hints(tp)
    fields = {f.name: f for f in dataclasses.fields(tp)}
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise ConfigError(unknown_key(f"{where}.{unknown[0]}", unknown[0], list(fields)))
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _coerce(hints[name], value[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name}: required field is missing")
    return tp(**kwargs)


def _coerce_union(tp: Any, value: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: may not be null")
    errors = []
    for a in args:
        if a is type(None):
            continue
        try:
            return _coerce(a, value, where)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0])


def _coerce_scalar(tp: type, value: Any, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


# Names close in meaning but not the same setting: suggested, with the difference, never accepted
KEY_MEANINGS = {
    "epochs": ("steps", "msf counts optimizer steps, not epochs"),
    "num_epochs": ("steps", "msf counts optimizer steps, not epochs"),
    "batch": ("batch_size", "the global batch, over all processes"),
    "train_batch_size": ("batch_size", "msf's is the global batch, over all processes, not per device"),
    "mixed_precision": ("precision", "auto, bf16 or fp32"),
    "wd": ("weight_decay", ""), "ema": ("ema_decay", ""), "warmup": ("warmup_steps", ""),
    "clip": ("grad_clip", ""), "dropout": ("class_dropout", "the label dropout for guidance"),
}


def unknown_key(where: str, key: str, valid: list[str]) -> str:
    meant = KEY_MEANINGS.get(key, (None, ""))
    near = [meant[0]] if meant[0] in valid else difflib.get_close_matches(key, valid, n=1)
    why = f" ({meant[1]})" if near and near[0] == meant[0] and meant[1] else ""
    hint = f"; did you mean {near[0]!r}{why}?" if near else "."
    return f"unknown config key {where!r}{hint} Valid keys here: {', '.join(valid)}"
