"""Learning-rate schedules: ``step index -> learning rate``.

Specs (as in the training config)::

    {type: constant}
    {type: step, step_size: 10, gamma: 0.1}        # step_size in epochs
    {type: cosine, min_lr: 0.0}                    # cosine decay over all steps
    ... each optionally with warmup_epochs: k      # linear warm-up

Steps are 0-based global optimiser steps; the epoch of step ``s`` is
``s // steps_per_epoch``.  During warm-up (the first ``k * steps_per_epoch``
steps) the rate is the schedule's rate times ``(s + 1) / warmup_steps``; the
cosine decay starts after the warm-up and reaches ``min_lr`` at ``total_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from galpipe.errors import ConfigError

_KEYS = {
    "constant": {"type", "warmup_epochs"},
    "step": {"type", "warmup_epochs", "step_size", "gamma"},
    "cosine": {"type", "warmup_epochs", "min_lr"},
}


def _number(spec: Mapping[str, Any], key: str, default: float, *, positive: bool = False,
            integer: bool = False) -> float:
    value = spec.get(key, default)
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = math.isfinite(float(value)) and (float(value) > 0 if positive else float(value) >= 0)
    if not ok:
        kind = "integer" if integer else "number"
        raise ConfigError(
            f"lr schedule: {key!r} must be a {'positive' if positive else 'non-negative'} "
            f"{kind}, got {value!r}"
        )
    return float(value)


def schedule_keys(kind: str) -> frozenset[str]:
    """The spec keys a schedule of type ``kind`` accepts (``type`` included)."""
    try:
        return frozenset(_KEYS[str(kind).lower()])
    except KeyError:
        raise ConfigError(f"lr schedule: unknown type {kind!r}; valid: {', '.join(sorted(_KEYS))}") from None


def make_schedule(
    spec: Mapping[str, Any] | None,
    base_lr: float,
    total_steps: int,
    steps_per_epoch: int,
) -> Callable[[int], float]:
    """Build a schedule function ``lr(step)``.

    Parameters
    ----------
    spec : dict or None
        Schedule spec (see the module docstring); ``None`` means constant.
    base_lr : float
        Peak learning rate.
    total_steps : int
        Number of optimiser steps of the whole run (cosine horizon).
    steps_per_epoch : int
        Optimiser steps per epoch (converts epochs to steps).

    Raises
    ------
    ConfigError
        Unknown type (valid types listed) or unknown/invalid keys.
    """
    if spec is None:
        spec = {"type": "constant"}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"lr schedule: expected a mapping with a 'type' key, got {spec!r}")
    kind = str(spec.get("type", "constant")).lower()
    if kind not in _KEYS:
        raise ConfigError(
            f"lr schedule: unknown type {spec.get('type')!r}; valid: {', '.join(sorted(_KEYS))}"
        )
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise ConfigError(
            f"lr schedule {kind!r}: unknown key(s) {unknown}; accepted: {sorted(_KEYS[kind])}"
        )
    if not (isinstance(base_lr, int | float) and math.isfinite(base_lr) and base_lr >= 0):
        raise ConfigError(f"lr schedule: base_lr must be a non-negative number, got {base_lr!r}")
    for what, v in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"lr schedule: {what} must be a positive integer, got {v!r}")
    base = float(base_lr)
    warm = int(_number(spec, "warmup_epochs", 0, integer=True)) * steps_per_epoch

    if kind == "constant":
        def inner(step: int) -> float:
            return base
    elif kind == "step":
        size = _number(spec, "step_size", 1, positive=True, integer=True)
        gamma = _number(spec, "gamma", 0.1)

        def inner(step: int) -> float:
            return base * gamma ** ((step // steps_per_epoch) // int(size))
    else:
        min_lr = _number(spec, "min_lr", 0.0)
        if min_lr > base:
            raise ConfigError(f"lr schedule: min_lr {min_lr} exceeds the base lr {base}")
        horizon = max(total_steps - warm, 1)

        def inner(step: int) -> float:
            progress = min(max((step - warm) / horizon, 0.0), 1.0)
            return min_lr + 0.5 * (base - min_lr) * (1.0 + math.cos(math.pi * progress))

    def schedule(step: int) -> float:
        s = int(step)
        if s < 0:
            raise ConfigError(f"lr schedule: step must be >= 0, got {step!r}")
        lr = inner(s)
        if s < warm:
            lr *= (s + 1) / warm
        return float(lr)

    return schedule
