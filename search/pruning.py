"""Small registries from settings to Optuna pruners and samplers."""

from __future__ import annotations

from typing import Any

import optuna

from search.carry_forward import MedianCarryForwardPruner
from search.config import PrunerSection, SamplerSection, SpaceSection
from search.space import grid_space


def _given(section: Any, *names: str) -> dict[str, Any]:
    return {n: getattr(section, n) for n in names if getattr(section, n) is not None}


def _median_like(cfg: PrunerSection, name: str) -> optuna.pruners.BasePruner:
    common = _given(cfg, "n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials")
    if name == "percentile":
        return optuna.pruners.PercentilePruner(cfg.percentile if cfg.percentile is not None else 25.0, **common)
    if name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(**common)


def build_pruner(cfg: PrunerSection, max_epochs: int) -> optuna.pruners.BasePruner:
    """One Optuna pruner for the ``[pruner]`` section; epochs are the pruners' steps."""
    name = cfg.name
    if name in ("median", "percentile", "none"):
        return _median_like(cfg, name)
    if name == "median_carry_forward":
        return MedianCarryForwardPruner(**_given(cfg, "n_startup_trials", "n_warmup_steps", "interval_steps",
                                                 "n_min_trials"))
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            **_given(cfg, "min_resource", "reduction_factor", "min_early_stopping_rate", "bootstrap_count")
        )
    if name == "hyperband":
        kwargs = _given(cfg, "min_resource", "reduction_factor", "bootstrap_count")
        kwargs.setdefault("min_resource", 1)
        kwargs["max_resource"] = cfg.max_resource if cfg.max_resource is not None else max_epochs
        return optuna.pruners.HyperbandPruner(**kwargs)
    if name == "threshold":
        return optuna.pruners.ThresholdPruner(**_given(cfg, "lower", "upper", "n_warmup_steps", "interval_steps"))
    if name == "patient":
        inner = _median_like(cfg, cfg.wrapped or "median")
        return optuna.pruners.PatientPruner(inner, patience=cfg.patience or 0, min_delta=cfg.min_delta or 0.0)
    if name == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(**_given(cfg, "p_threshold", "n_startup_steps"))
    raise ValueError(f"unknown pruner {name!r}")  # unreachable: settings validation lists the names


def build_sampler(cfg: SamplerSection, space: SpaceSection) -> optuna.samplers.BaseSampler:
    """One Optuna sampler for the ``[sampler]`` section, seeded when a seed is given."""
    seed = cfg.seed
    if cfg.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.name == "grid":
        return optuna.samplers.GridSampler(grid_space(space), seed=seed)
    if cfg.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **_given(cfg, "n_startup_trials"))
    if cfg.name == "gp":
        return optuna.samplers.GPSampler(seed=seed, **_given(cfg, "n_startup_trials"))
    return optuna.samplers.TPESampler(seed=seed, **_given(cfg, "n_startup_trials", "multivariate"))
