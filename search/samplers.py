"""The samplers a study file may name: one table from name to Optuna sampler, its options and defaults.

Settings validation (``search/config.py``) reads the accepted options from here; ``build_sampler`` reads
the builders. A new sampler is one row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna


@dataclass(frozen=True)
class SamplerKind:
    """``options``: the ``[sampler]`` keys it accepts besides ``name``; ``make(options, grid)`` builds it from
    the options the file gave (None-valued ones left out) and, for grid, the values of every parameter."""

    options: frozenset[str]
    make: Callable[[dict[str, Any], dict[str, list[Any]]], optuna.samplers.BaseSampler]


SAMPLERS: dict[str, SamplerKind] = {
    "tpe": SamplerKind(frozenset({"seed", "n_startup_trials", "multivariate"}),
                       lambda o, _: optuna.samplers.TPESampler(**o)),
    "random": SamplerKind(frozenset({"seed"}), lambda o, _: optuna.samplers.RandomSampler(**o)),
    "cmaes": SamplerKind(frozenset({"seed", "n_startup_trials"}), lambda o, _: optuna.samplers.CmaEsSampler(**o)),
    "gp": SamplerKind(frozenset({"seed", "n_startup_trials"}), lambda o, _: optuna.samplers.GPSampler(**o)),
    "grid": SamplerKind(frozenset({"seed"}), lambda o, grid: optuna.samplers.GridSampler(grid, **o)),
}


def build_sampler(cfg: Any, space: Any, pack: int = 1) -> optuna.samplers.BaseSampler:
    """The ``[sampler]`` section's sampler (``cfg``: a validated SamplerSection; ``space``: the SpaceSection,
    whose values the grid sampler walks). With ``pack`` > 1, TPE lies that the trials still running scored
    worst (``constant_liar``, Optuna 5's default, set explicitly so packing never depends on a default), so K
    trials asked together do not all land on one point."""
    from search.space import grid_space  # space.py reads config.py, which reads this table

    given: Mapping[str, Any] = cfg.model_dump(exclude_none=True, exclude={"name"})
    if "seed" in cfg.model_fields and cfg.seed is None:
        given = {**given, "seed": None}  # an explicit "no seed" is a choice, not a missing option
    if cfg.name == "tpe" and pack > 1:
        given = {**given, "constant_liar": True}
    return SAMPLERS[cfg.name].make(dict(given), grid_space(space) if cfg.name == "grid" else {})
