"""Pruners and samplers built from settings, checked by class, by attribute and by ask/report/tell."""

from __future__ import annotations

import math
import zlib
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
from optuna.trial import TrialState
from pydantic import ValidationError

from search.config import PrunerSection, SamplerSection, SpaceSection
from search.pruning import PRUNERS, build_pruner
from search.samplers import build_sampler
from search.space import suggest

pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.usefixtures("quiet_optuna")]

SPACE = SpaceSection.model_validate({
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "blocks_per_stage": {"type": "int", "low": 1, "high": 4},
})


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


# --- every pruner on hand-made curves: the step a clearly bad trial is pruned at, worked out in the comments -------
# Each pruner is built from settings (build_pruner, as `hpo run` builds it) and driven with ask/report/tell, with
# trials told PRUNED at the first True as a real trial would be. Values are halves, quarters and eighths (exact in
# binary floating point), so each comparison is the one worked out in the comment. Hand-made curves, not numbers
# computed with the pruner's own formula.

DECIDED = {"median", "median_carry_forward", "percentile", "successive_halving", "hyperband", "threshold", "patient",
           "wilcoxon", "none"}  # the pruners with a decision test in this file


def test_every_pruner_the_project_offers_has_a_decision_test() -> None:
    assert set(PRUNERS) == DECIDED


def completed(study: optuna.Study, curves: list[list[float]]) -> None:
    """Trials that reported these curves (epoch = index) and completed with their best value."""
    for curve in curves:
        trial = study.ask()
        for step, value in enumerate(curve):
            trial.report(value, step)
        study.tell(trial, max(curve) if study.direction == optuna.study.StudyDirection.MAXIMIZE else min(curve))


def pruned_at(study: optuna.Study, curve: list[float]) -> int | None:
    """Run one trial on ``curve`` as training would: the step at which it was pruned (then told PRUNED), or None
    (told COMPLETE with its best value)."""
    trial = study.ask()
    for step, value in enumerate(curve):
        trial.report(value, step)
        if trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return step
    study.tell(trial, max(curve))
    return None


def test_percentile_pruner_keeps_only_the_top_quarter() -> None:
    study = optuna.create_study(direction="maximize", pruner=pruner(name="percentile", n_startup_trials=4))
    completed(study, [[0.25, 0.25], [0.5, 0.5], [0.75, 0.75], [1.0, 1.0]])
    # The project's default percentile is 25: a trial goes on only if its best value so far is in the top quarter
    # of the completed trials' values at that epoch. Epoch 0: 0.25, 0.5, 0.75, 1.0; the top-quarter boundary (75th
    # percentile, linear interpolation) is at position 0.75 * 3 = 2.25: 0.75 + 0.25 * (1.0 - 0.75) = 0.8125.
    assert pruned_at(study, [0.75, 0.75]) == 0  # above the median (0.625) but below 0.8125: pruned at once
    assert pruned_at(study, [0.875, 0.875]) is None  # 0.875 >= 0.8125 at both epochs
    # with that trial completed too, epoch 0 holds 0.25, 0.5, 0.75, 0.875, 1.0: the boundary is at position
    # 0.75 * 4 = 3, 0.875. A late bloomer is not waited for (no warm-up asked): 0.5 < 0.875 at epoch 0.
    assert pruned_at(study, [0.5, 1.0]) == 0


def test_successive_halving_keeps_the_top_half_at_each_rung() -> None:
    study = optuna.create_study(direction="maximize",
                                pruner=pruner(name="successive_halving", min_resource=1, reduction_factor=2))
    # min_resource 1, reduction factor 2: rungs end at epochs 1, 2, 4, ... (1 * 2**rung). At a rung's epoch a trial
    # goes on only if its value is among the top 1/2 of the values every trial reported at that rung (the top one
    # while there are fewer than 2), itself included.
    # Trial 0: epoch 1, rung 0 holds [0.625] -> best, goes on; epoch 2, rung 1 holds [0.75] -> goes on; epoch 3 is
    # before rung 2 (epoch 4).
    assert pruned_at(study, [0.5, 0.625, 0.75, 0.875]) is None
    # Trial 1: epoch 0 is before the first rung; epoch 1, rung 0 holds [0.625, 0.375]: the top half (1 value) is
    # 0.625, so 0.375 stops here.
    assert pruned_at(study, [0.25, 0.375, 0.5, 0.5]) == 1
    # Trial 2: epoch 1, rung 0 holds [0.625, 0.375, 0.75]: top 3 // 2 = 1 value, 0.75 is it; epoch 2, rung 1 holds
    # [0.75, 0.875]: 0.875 is the top one. Never pruned.
    assert pruned_at(study, [0.5, 0.75, 0.875, 0.9375]) is None
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]


def test_hyperband_prunes_within_its_bracket_only() -> None:
    """Hyperband from settings: max_resource is the study's max_epochs (9), min_resource 1, reduction factor 3.

    Brackets: floor(log3(9 / 1)) + 1 = 3. Bracket b runs successive halving whose first rung ends at epoch 3**b and
    gets a share ceil(3 * 3**s / (s + 1)) of trials, s = 2 - b: 9, 5 and 3, 17 in all. Optuna puts trial n of
    study NAME in bracket 0 if crc32("NAME_n") % 17 < 9, bracket 1 if < 14, else bracket 2; for study "hb27" that
    is trials 0, 1, 2 in bracket 0 and trial 3 in bracket 2 (checked first, with zlib, below)."""
    slots = [zlib.crc32(f"hb27_{n}".encode()) % 17 for n in range(4)]
    assert [0 if s < 9 else 1 if s < 14 else 2 for s in slots] == [0, 0, 0, 2]
    study = optuna.create_study(study_name="hb27", direction="maximize",
                                pruner=pruner(max_epochs=9, name="hyperband"))
    # Bracket 0 (rungs at epochs 1, 3, 9; a trial goes on if in the top 1/3 of its rung, the top one while fewer
    # than 3 reported there):
    # trial 0: epoch 1, rung 0 = [0.625] -> goes on; epoch 3, rung 1 = [0.875] -> goes on.
    assert pruned_at(study, [0.5, 0.625, 0.75, 0.875]) is None
    # trial 1: epoch 1, rung 0 = [0.625, 0.75]: 0.75 is the top one; epoch 3, rung 1 = [0.875, 0.9375]: top again.
    assert pruned_at(study, [0.5, 0.75, 0.875, 0.9375]) is None
    # trial 2: epoch 1, rung 0 = [0.625, 0.75, 0.375]: top 3 // 3 = 1 value is 0.75, so 0.375 is pruned.
    bad = [0.25, 0.375, 0.5, 0.5]
    assert pruned_at(study, bad) == 1
    # trial 3, the same curve in bracket 2: its first rung ends at epoch 3**2 = 9, after these 4 epochs: not judged.
    assert pruned_at(study, bad) is None
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED,
                                               TrialState.COMPLETE]


def test_patient_pruner_waits_for_a_decline_before_asking_the_median() -> None:
    study = optuna.create_study(direction="maximize",
                                pruner=pruner(name="patient", patience=1, n_startup_trials=1))
    completed(study, [[0.5, 0.75, 0.75, 0.75]])  # the medians: this one trial's values
    # patience 1: the wrapped median pruner is asked only once the best of the last 2 epochs is below the best
    # before them. Declining trial: epochs 0 and 1 are too few (2 <= patience + 1); epoch 2: best before = 0.5 (epoch
    # 0), best of epochs 1-2 = 0.375 < 0.5, so the median decides: best so far 0.5 < median 0.75 at epoch 2: pruned.
    # (The median pruner alone prunes it at epoch 1: 0.5 < 0.75.)
    assert pruned_at(study, [0.5, 0.375, 0.25, 0.125]) == 2
    # Improving trial, below the median at every epoch (0.25 < 0.5 at epoch 0: the median pruner alone prunes it
    # at once): the last two epochs always beat the ones before, so the median is never asked.
    assert pruned_at(study, [0.25, 0.375, 0.5, 0.625]) is None


def test_wilcoxon_pruner_prunes_a_trial_consistently_below_the_best_one() -> None:
    study = optuna.create_study(direction="maximize", pruner=pruner(name="wilcoxon"))
    completed(study, [[0.5, 0.625, 0.75, 0.875, 0.875, 0.875]])  # the best trial
    # Defaults: p_threshold 0.1, at least 2 epochs. Each epoch of the new trial is paired with the best trial's same
    # epoch; the one-sided Wilcoxon signed-rank test asks whether the new trial is lower. Differences -0.0625,
    # -0.125, -0.25, -0.375: all negative, distinct sizes, so the exact p-value after n epochs is 1 / 2**n (only
    # that one sign pattern of 2**n is as extreme): 0.25, 0.125 (not < 0.1), then 0.0625 < 0.1 at epoch 3.
    assert pruned_at(study, [0.4375, 0.5, 0.5, 0.5]) == 3
    # Above the best trial at every epoch: every difference positive, p = 1.
    assert pruned_at(study, [0.625, 0.75, 0.875, 0.9375, 0.9375, 0.9375]) is None


def test_median_carry_forward_keeps_an_early_stopped_trials_best_value_in_the_median() -> None:
    study = optuna.create_study(direction="maximize", pruner=pruner(name="median_carry_forward", n_startup_trials=2))
    completed(study, [[0.5, 0.625, 0.75, 0.8125], [0.875, 0.9375]])  # a full run, and one stopped after epoch 1
    # Epoch 0 median: (0.5 + 0.875) / 2 = 0.6875. A trial at 0.25 is pruned at once.
    assert pruned_at(study, [0.25, 0.375, 0.5, 0.5]) == 0
    # Epoch 1 median (0.625 + 0.9375) / 2 = 0.78125; epoch 2: the early-stopped trial holds its best, 0.9375, so the
    # median is (0.75 + 0.9375) / 2 = 0.84375 (Optuna's median pruner would take the full run's 0.75 alone). This
    # trial: 0.75 >= 0.6875, best 0.78125 >= 0.78125, then best 0.8125 < 0.84375: pruned at epoch 2.
    assert pruned_at(study, [0.75, 0.78125, 0.8125, 0.8125]) == 2
    # Above the median at every epoch (epoch 3: (0.8125 + 0.9375) / 2 = 0.875).
    assert pruned_at(study, [0.875, 0.9375, 0.9375, 0.96875]) is None


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
