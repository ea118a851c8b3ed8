"""The pruners a study file may name: one table from name to Optuna pruner, its options and defaults.

Settings validation (``search/config.py``) reads the accepted options from here; ``build_pruner`` reads
the builders. Epochs are the pruners' steps. A new pruner is one row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from search.carry_forward import MedianCarryForwardPruner

Pruner = optuna.pruners.BasePruner
MEDIAN_OPTIONS = frozenset({"n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"})


@dataclass(frozen=True)
class PrunerKind:
    """``options``: the ``[pruner]`` keys it accepts besides ``name``; ``make(options, max_epochs)`` builds it
    from the options the file gave (None-valued ones left out), filling its defaults."""

    options: frozenset[str]
    make: Callable[[dict[str, Any], int], Pruner]


def _patient(o: dict[str, Any], max_epochs: int) -> Pruner:
    """PatientPruner around another pruner (median by default), which gets the median-style options."""
    wrapped = o.pop("wrapped", "median")
    patience, min_delta = o.pop("patience", 0), o.pop("min_delta", 0.0)
    inner = PRUNERS[wrapped].make({k: v for k, v in o.items() if k in PRUNERS[wrapped].options}, max_epochs)
    return optuna.pruners.PatientPruner(inner, patience=patience, min_delta=min_delta)


PRUNERS: dict[str, PrunerKind] = {
    "median": PrunerKind(MEDIAN_OPTIONS, lambda o, _: optuna.pruners.MedianPruner(**o)),
    "median_carry_forward": PrunerKind(MEDIAN_OPTIONS, lambda o, _: MedianCarryForwardPruner(**o)),
    "percentile": PrunerKind(MEDIAN_OPTIONS | {"percentile"},
                             lambda o, _: optuna.pruners.PercentilePruner(**{"percentile": 25.0, **o})),
    "successive_halving": PrunerKind(
        frozenset({"min_resource", "reduction_factor", "min_early_stopping_rate", "bootstrap_count"}),
        lambda o, _: optuna.pruners.SuccessiveHalvingPruner(**o)),
    "hyperband": PrunerKind(
        frozenset({"min_resource", "max_resource", "reduction_factor", "bootstrap_count"}),
        lambda o, max_epochs: optuna.pruners.HyperbandPruner(**{"min_resource": 1, "max_resource": max_epochs, **o})),
    "threshold": PrunerKind(frozenset({"lower", "upper", "n_warmup_steps", "interval_steps"}),
                            lambda o, _: optuna.pruners.ThresholdPruner(**o)),
    "patient": PrunerKind(frozenset({"wrapped", "patience", "min_delta", "n_startup_trials", "n_warmup_steps",
                                     "interval_steps"}), _patient),
    "wilcoxon": PrunerKind(frozenset({"p_threshold", "n_startup_steps"}),
                           lambda o, _: optuna.pruners.WilcoxonPruner(**o)),
    "none": PrunerKind(frozenset(), lambda o, _: optuna.pruners.NopPruner()),
}


def build_pruner(cfg: Any, max_epochs: int) -> Pruner:
    """The ``[pruner]`` section's pruner (``cfg``: a validated PrunerSection)."""
    given: Mapping[str, Any] = cfg.model_dump(exclude_none=True, exclude={"name"})
    return PRUNERS[cfg.name].make({k: v for k, v in given.items() if k in PRUNERS[cfg.name].options}, max_epochs)
