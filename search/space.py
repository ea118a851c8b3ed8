"""The search space: the only place that calls ``trial.suggest_*``."""

from __future__ import annotations

from typing import Any

import optuna

from search.config import SpaceSection

REFERENCE_BATCH = 256


def suggest(trial: optuna.Trial, space: SpaceSection) -> dict[str, Any]:
    """Sample every parameter of the space, in file order, and return them by name."""
    params: dict[str, Any] = {}
    for name, spec in space.params.items():
        if spec.type == "categorical":
            params[name] = trial.suggest_categorical(name, list(spec.choices or []))
        elif spec.low is None or spec.high is None:  # unreachable: ParamSpec requires both for ranges
            raise ValueError(f"[space.{name}] needs low and high")
        elif spec.type == "int":
            step = int(spec.step) if spec.step else 1
            params[name] = trial.suggest_int(name, int(spec.low), int(spec.high), step=step, log=spec.log)
        else:
            params[name] = trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return params


def resolve(params: dict[str, Any], lr_scaling: str, default_batch_size: int) -> dict[str, Any]:
    """Turn sampled values into training settings.

    With the linear scaling rule the sampled ``lr`` is per 256 examples, so the effective rate is
    ``lr * batch_size / 256``: batch size and learning rate then stop being confounded.
    """
    resolved = dict(params)
    if lr_scaling == "linear":
        batch = int(params.get("batch_size", default_batch_size))
        resolved["lr"] = params["lr"] * batch / REFERENCE_BATCH
    return resolved


def grid_space(space: SpaceSection) -> dict[str, list[Any]]:
    return {name: spec.grid_values() or [] for name, spec in space.params.items()}
