"""The samplers a study file may name: one table from name to Optuna sampler, its options and defaults.

Settings validation (``search/config.py``) reads the accepted options from here; ``build_sampler`` reads
the builders. A new sampler is one row.

A seeded study seeds each trial's draws from (seed, trial number) rather than once per process: a process that
resumes a study, or one of several workers, would otherwise replay the first trials' draws (Optuna's samplers
start their random state from the seed in every process), and train configurations already trained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
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


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number``'s draws in a study seeded with ``seed``: distinct across trials and across
    study seeds (``hpo compare`` repeats with seeds S, S+1, ...: S+1's trial 0 must not be S's trial 1)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def seed_next_trial(study: optuna.Study, cfg: Any, space: Any, pack: int, number: int) -> None:
    """Give ``study`` a sampler seeded for trial ``number``, the one it asks next (the count of trials so far,
    ``search.study.claim_slot`` passes it under the budget lock, so it is this worker's alone). No-op unseeded."""
    if getattr(cfg, "seed", None) is None:
        return
    study.sampler = build_sampler(cfg, space, pack, number=number)


def build_sampler(cfg: Any, space: Any, pack: int = 1, number: int | None = None) -> optuna.samplers.BaseSampler:
    """The ``[sampler]`` section's sampler (``cfg``: a validated SamplerSection; ``space``: the SpaceSection,
    whose values the grid sampler walks). With ``pack`` > 1, TPE lies that the trials still running scored
    worst (``constant_liar``, Optuna 5's default, set explicitly so packing never depends on a default), so K
    trials asked together do not all land on one point. ``number``: seed the sampler for that trial (see
    ``trial_seed``) instead of with the file's seed itself."""
    from search.space import grid_space  # space.py reads config.py, which reads this table

    given: Mapping[str, Any] = cfg.model_dump(exclude_none=True, exclude={"name"})
    if "seed" in cfg.model_fields and cfg.seed is None:
        given = {**given, "seed": None}  # an explicit "no seed" is a choice, not a missing option
    if number is not None and given.get("seed") is not None:
        given = {**given, "seed": trial_seed(int(given["seed"]), number)}
    if cfg.name == "tpe" and pack > 1:
        given = {**given, "constant_liar": True}
    return SAMPLERS[cfg.name].make(dict(given), grid_space(space) if cfg.name == "grid" else {})
