"""Pruners and samplers built from settings, checked by class, by attribute and by ask/report/tell."""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest
from optuna.pruners import (
    HyperbandPruner,
    MedianPruner,
    NopPruner,
    PatientPruner,
    PercentilePruner,
    SuccessiveHalvingPruner,
    ThresholdPruner,
    WilcoxonPruner,
)
from optuna.samplers import CmaEsSampler, GPSampler, GridSampler, RandomSampler, TPESampler
from pydantic import ValidationError

from search.config import PrunerSection, SamplerSection, SpaceSection
from search.pruning import build_pruner
from search.samplers import build_sampler
from search.space import suggest

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

SPACE = SpaceSection.model_validate({
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "blocks_per_stage": {"type": "int", "low": 1, "high": 4},
})


@pytest.fixture(autouse=True)
def _quiet_optuna() -> Any:
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)


def pruner(max_epochs: int = 20, **options: Any) -> optuna.pruners.BasePruner:
    return build_pruner(PrunerSection(**options), max_epochs)


# --- build_pruner: class and options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "cls"),
    [
        ({"name": "median"}, MedianPruner),
        ({"name": "percentile"}, PercentilePruner),
        ({"name": "successive_halving"}, SuccessiveHalvingPruner),
        ({"name": "hyperband"}, HyperbandPruner),
        ({"name": "threshold", "upper": 10.0}, ThresholdPruner),
        ({"name": "patient", "patience": 2}, PatientPruner),
        ({"name": "wilcoxon"}, WilcoxonPruner),
        ({"name": "none"}, NopPruner),
    ],
    ids=lambda v: v["name"] if isinstance(v, dict) else "",
)
def test_build_pruner_class(options: dict[str, Any], cls: type) -> None:
    built = pruner(**options)
    assert type(built) is cls


def test_default_pruner_is_median_with_optuna_defaults() -> None:
    built = pruner()
    assert type(built) is MedianPruner
    assert (built._n_startup_trials, built._n_warmup_steps, built._interval_steps, built._n_min_trials) == (5, 0, 1, 1)


def test_median_options_passed_through() -> None:
    built = pruner(name="median", n_startup_trials=3, n_warmup_steps=2, interval_steps=4, n_min_trials=2)
    assert built._percentile == 50.0
    assert built._n_startup_trials == 3
    assert built._n_warmup_steps == 2
    assert built._interval_steps == 4
    assert built._n_min_trials == 2


def test_percentile_options_passed_through() -> None:
    built = pruner(name="percentile", percentile=10.0, n_startup_trials=1, n_warmup_steps=3)
    assert type(built) is PercentilePruner
    assert (built._percentile, built._n_startup_trials, built._n_warmup_steps) == (10.0, 1, 3)


def test_percentile_defaults_to_25() -> None:
    assert pruner(name="percentile")._percentile == 25.0


def test_successive_halving_options_passed_through() -> None:
    built = pruner(name="successive_halving", min_resource=2, reduction_factor=3, min_early_stopping_rate=1,
                   bootstrap_count=1)
    assert (built._min_resource, built._reduction_factor, built._min_early_stopping_rate,
            built._bootstrap_count) == (2, 3, 1, 1)


def test_successive_halving_auto_min_resource() -> None:
    built = pruner(name="successive_halving", min_resource="auto")
    assert built._min_resource is None  # Optuna's spelling of "work it out from the first trial"
    assert built._reduction_factor == 4


def test_hyperband_max_resource_defaults_to_max_epochs() -> None:
    built = pruner(max_epochs=17, name="hyperband")
    assert built._max_resource == 17
    assert built._min_resource == 1
    assert built._reduction_factor == 3


def test_hyperband_options_passed_through() -> None:
    built = pruner(max_epochs=17, name="hyperband", min_resource=2, max_resource=9, reduction_factor=2,
                   bootstrap_count=1)
    assert (built._min_resource, built._max_resource, built._reduction_factor, built._bootstrap_count) == (2, 9, 2, 1)


def test_hyperband_auto_max_resource_is_kept() -> None:
    assert pruner(max_epochs=17, name="hyperband", max_resource="auto")._max_resource == "auto"


def test_threshold_options_passed_through() -> None:
    built = pruner(name="threshold", lower=0.1, n_warmup_steps=2, interval_steps=3)
    assert (built._lower, built._upper, built._n_warmup_steps, built._interval_steps) == (0.1, math.inf, 2, 3)
    both = pruner(name="threshold", lower=0.1, upper=2.0)
    assert (both._lower, both._upper) == (0.1, 2.0)


def test_patient_wraps_a_median_pruner_by_default() -> None:
    built = pruner(name="patient", patience=3, min_delta=0.01, n_startup_trials=4, n_warmup_steps=1)
    assert (built._patience, built._min_delta) == (3, 0.01)
    inner = built._wrapped_pruner
    assert type(inner) is MedianPruner
    assert (inner._n_startup_trials, inner._n_warmup_steps) == (4, 1)


@pytest.mark.parametrize(("wrapped", "cls"), [("median", MedianPruner), ("percentile", PercentilePruner),
                                              ("none", NopPruner)])
def test_patient_wrapped_pruner(wrapped: str, cls: type) -> None:
    built = pruner(name="patient", patience=0, wrapped=wrapped)
    assert type(built._wrapped_pruner) is cls
    assert built._patience == 0 and built._min_delta == 0.0


def test_wilcoxon_options_passed_through() -> None:
    built = pruner(name="wilcoxon", p_threshold=0.05, n_startup_steps=3)
    assert (built._p_threshold, built._n_startup_steps) == (0.05, 3)


def test_pruner_section_refuses_options_of_another_pruner() -> None:
    with pytest.raises(ValidationError, match="n_warmup_steps not used by pruner 'hyperband'"):
        PrunerSection(name="hyperband", n_warmup_steps=3)
    with pytest.raises(ValidationError, match="needs min_resource as a whole number"):
        PrunerSection(name="hyperband", min_resource="auto")


# --- behaviour: ask / report / tell, no training -----------------------------------------------------------


def run_trial(study: optuna.Study, values: list[float]) -> tuple[optuna.Trial, list[bool]]:
    """Report one value per step (epoch) and record should_prune after each; the trial is not told."""
    trial = study.ask()
    decisions = []
    for step, value in enumerate(values):
        trial.report(value, step)
        decisions.append(bool(trial.should_prune()))
    return trial, decisions


def test_median_pruner_prunes_below_the_median_and_keeps_above() -> None:
    study = optuna.create_study(direction="maximize",
                                pruner=pruner(name="median", n_startup_trials=2, n_warmup_steps=0))
    for curve in ([0.5, 0.6], [0.7, 0.8]):  # medians: step 0 -> 0.6, step 1 -> 0.7
        trial, decisions = run_trial(study, curve)
        assert decisions == [False, False]  # n_startup_trials: nothing is pruned before two trials finished
        study.tell(trial, curve[-1])

    low, decisions = run_trial(study, [0.3])
    assert decisions == [True]
    study.tell(low, state=optuna.trial.TrialState.PRUNED)

    high, decisions = run_trial(study, [0.9, 0.95])
    assert decisions == [False, False]
    study.tell(high, 0.95)

    # completed now: step 0 -> 0.5, 0.7, 0.9 (median 0.7); step 1 -> 0.6, 0.8, 0.95 (median 0.8)
    between, decisions = run_trial(study, [0.75, 0.75])  # above the step-0 median, below the step-1 one
    assert decisions == [False, True]
    states = [t.state for t in study.trials]
    assert states[:4] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.COMPLETE,
                          optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]


def test_median_pruner_respects_warmup() -> None:
    study = optuna.create_study(direction="maximize",
                                pruner=pruner(name="median", n_startup_trials=1, n_warmup_steps=2))
    trial, _ = run_trial(study, [0.9, 0.9, 0.9])
    study.tell(trial, 0.9)
    _, decisions = run_trial(study, [0.1, 0.1, 0.1])
    assert decisions == [False, False, True]  # steps 0 and 1 are warm-up


def test_median_pruner_minimize_direction() -> None:
    study = optuna.create_study(direction="minimize",
                                pruner=pruner(name="median", n_startup_trials=2, n_warmup_steps=0))
    for loss in (1.0, 2.0):
        trial, _ = run_trial(study, [loss])
        study.tell(trial, loss)
    assert run_trial(study, [3.0])[1] == [True]  # a worse (higher) loss than the median 1.5
    assert run_trial(study, [0.5])[1] == [False]


def test_threshold_pruner_prunes_outside_bounds() -> None:
    study = optuna.create_study(pruner=pruner(name="threshold", lower=0.2, upper=2.0))
    assert run_trial(study, [1.0, 0.1])[1] == [False, True]
    assert run_trial(study, [1.0, 3.0])[1] == [False, True]
    assert run_trial(study, [1.0, math.nan])[1] == [False, True]


def test_none_pruner_never_prunes() -> None:
    study = optuna.create_study(direction="maximize", pruner=pruner(name="none"))
    for value in (0.9, 0.8):
        trial, _ = run_trial(study, [value])
        study.tell(trial, value)
    assert run_trial(study, [0.0, -1.0, math.nan])[1] == [False, False, False]


def test_hyperband_built_from_settings_runs_a_pruning_check() -> None:
    study = optuna.create_study(direction="maximize", pruner=pruner(max_epochs=9, name="hyperband"))
    for i in range(4):
        trial, decisions = run_trial(study, [0.1 * i, 0.2 * i])
        assert all(isinstance(d, bool) for d in decisions)
        study.tell(trial, 0.2 * i)


# --- build_sampler ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [("tpe", TPESampler), ("random", RandomSampler), ("cmaes", CmaEsSampler), ("gp", GPSampler),
     ("grid", GridSampler)],
)
def test_build_sampler_class(name: str, cls: type) -> None:
    space = SpaceSection.model_validate({"blocks_per_stage": {"type": "int", "low": 1, "high": 3}})
    assert type(build_sampler(SamplerSection(name=name), space)) is cls


def test_default_sampler_is_tpe() -> None:
    assert type(build_sampler(SamplerSection(), SPACE)) is TPESampler


def test_tpe_options_passed_through() -> None:
    built = build_sampler(SamplerSection(name="tpe", n_startup_trials=7, multivariate=True), SPACE)
    assert built._n_startup_trials == 7
    assert built._multivariate is True


@pytest.mark.parametrize("name", ["cmaes", "gp"])
def test_startup_trials_passed_through(name: str) -> None:
    assert build_sampler(SamplerSection(name=name, n_startup_trials=6), SPACE)._n_startup_trials == 6


def test_grid_sampler_gets_the_grid_of_the_space() -> None:
    space = SpaceSection.model_validate({
        "warmup_epochs": {"type": "int", "low": 0, "high": 4, "step": 2},
        "optimizer": {"type": "categorical", "choices": ["adamw", "sgd"]},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True, "grid": [1e-3, 1e-2]},
    })
    built = build_sampler(SamplerSection(name="grid"), space)
    assert built._search_space == {"lr": [1e-3, 1e-2], "optimizer": ["adamw", "sgd"], "warmup_epochs": [0, 2, 4]}


def first_suggestions(cfg: SamplerSection, n: int = 4) -> list[dict[str, Any]]:
    study = optuna.create_study(direction="maximize", sampler=build_sampler(cfg, SPACE))
    out = []
    for _ in range(n):
        trial = study.ask()
        params = suggest(trial, SPACE)
        out.append(params)
        study.tell(trial, params["dropout"] - math.log10(params["lr"]) / 10)
    return out


@pytest.mark.parametrize(
    "cfg",
    [SamplerSection(name="tpe", seed=5, n_startup_trials=2), SamplerSection(name="random", seed=5),
     SamplerSection(name="cmaes", seed=5, n_startup_trials=1), SamplerSection(name="gp", seed=5)],
    ids=lambda c: c.name,
)
def test_seeded_sampler_repeats_its_suggestions(cfg: SamplerSection) -> None:
    first = first_suggestions(cfg)
    assert first_suggestions(cfg) == first
    assert first_suggestions(cfg.model_copy(update={"seed": 6})) != first


def test_seeded_grid_sampler_repeats_its_order() -> None:
    space = SpaceSection.model_validate({"blocks_per_stage": {"type": "int", "low": 1, "high": 4},
                                         "optimizer": {"type": "categorical", "choices": ["adamw", "sgd"]}})

    def order(seed: int) -> list[tuple[int, str]]:
        study = optuna.create_study(sampler=build_sampler(SamplerSection(name="grid", seed=seed), space))
        seen: list[tuple[int, str]] = []
        study.optimize(lambda t: seen.append(tuple(suggest(t, space).values())) or 0.0)
        return seen

    first = order(3)
    assert len(first) == 8 and len(set(first)) == 8
    assert order(3) == first
