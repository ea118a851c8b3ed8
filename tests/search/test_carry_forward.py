"""MedianCarryForwardPruner against Optuna's MedianPruner on the same histories, through ask/report/tell."""

from __future__ import annotations

import random

import optuna
import pytest
from optuna.pruners import BasePruner, MedianPruner
from optuna.study import StudyDirection

from search.carry_forward import MedianCarryForwardPruner, value_at_step
from search.config import PrunerSection
from search.pruning import build_pruner

pytestmark = pytest.mark.usefixtures("quiet_optuna")

# Two slow learners ran all six epochs; two fast learners were stopped early at epoch 2 after peaking at 1.
FULL_RUNS = [[0.50, 0.60, 0.70, 0.75, 0.80, 0.82], [0.55, 0.65, 0.72, 0.78, 0.82, 0.85]]
EARLY_STOPPED = [[0.90, 0.97, 0.96], [0.88, 0.96, 0.95]]
NEW_TRIAL = [0.80, 0.83, 0.85, 0.86]


def study_with(pruner: BasePruner, curves: list[list[float]], direction: str = "maximize") -> optuna.Study:
    """A study whose completed trials reported these curves (epoch = index), told one by one."""
    study = optuna.create_study(direction=direction, pruner=pruner)
    for curve in curves:
        trial = study.ask()
        for step, value in enumerate(curve):
            trial.report(value, step)
        best = max(curve) if direction == "maximize" else min(curve)
        study.tell(trial, best)
    return study


def decisions(study: optuna.Study, curve: list[float]) -> list[bool]:
    """should_prune() after each report of a new trial (reporting goes on, so every step is judged)."""
    trial = study.ask()
    out = []
    for step, value in enumerate(curve):
        trial.report(value, step)
        out.append(bool(trial.should_prune()))
    study.tell(trial, state=optuna.trial.TrialState.PRUNED if any(out) else optuna.trial.TrialState.COMPLETE,
               values=None if any(out) else max(curve))
    return out


def test_early_stopped_trials_hold_their_best_value_in_later_medians() -> None:
    history = FULL_RUNS + EARLY_STOPPED
    optuna_says = decisions(study_with(MedianPruner(n_startup_trials=3), history), NEW_TRIAL)
    carry_says = decisions(study_with(MedianCarryForwardPruner(n_startup_trials=3), history), NEW_TRIAL)
    # Epochs 0-2: everyone reported them; the two pruners agree and keep the trial.
    assert optuna_says[:3] == carry_says[:3] == [False, False, False]
    # Epoch 3: Optuna's median is over the two survivors only, median(0.75, 0.78) = 0.765, so 0.86 passes;
    # carried forward it is median(0.75, 0.78, 0.97, 0.96) = 0.87, so the trial is pruned.
    assert optuna_says[3] is False
    assert carry_says[3] is True


def test_median_at_uses_reported_values_and_carries_best_forward() -> None:
    pruner = MedianCarryForwardPruner(n_startup_trials=0)
    study = study_with(pruner, FULL_RUNS + EARLY_STOPPED)
    completed = study.trials
    direction = StudyDirection.MAXIMIZE
    assert [value_at_step(t, 4, direction) for t in completed] == [0.80, 0.82, 0.97, 0.96]
    assert pruner.median_at(completed, 1, direction) == pytest.approx((0.65 + 0.96) / 2)
    assert pruner.median_at(completed, 5, direction) == pytest.approx((0.85 + 0.96) / 2)
    minimize = study_with(MedianCarryForwardPruner(), [[3.0, 1.0, 2.0]], direction="minimize")
    assert value_at_step(minimize.trials[0], 7, StudyDirection.MINIMIZE) == 1.0


def test_a_trial_that_skipped_a_step_without_stopping_is_left_out_like_optuna_does() -> None:
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.report(0.5, 0)
    trial.report(0.7, 2)
    study.tell(trial, 0.7)
    assert value_at_step(study.trials[0], 1, StudyDirection.MAXIMIZE) is None
    assert value_at_step(study.trials[0], 3, StudyDirection.MAXIMIZE) == 0.7


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("warmup", "interval", "direction"), [(0, 1, "maximize"), (2, 3, "minimize")])
def test_same_decisions_as_median_pruner_when_no_trial_stopped_early(
    seed: int, warmup: int, interval: int, direction: str
) -> None:
    """Without early stopping there is nothing to carry: both pruners must agree at every step."""
    rng = random.Random(seed)
    history = [[rng.random() for _ in range(8)] for _ in range(6)]
    kwargs = {"n_startup_trials": 2, "n_warmup_steps": warmup, "interval_steps": interval}
    ours = study_with(MedianCarryForwardPruner(**kwargs), history, direction)
    theirs = study_with(MedianPruner(**kwargs), history, direction)
    for _ in range(4):
        curve = [rng.random() for _ in range(8)]
        assert decisions(ours, curve) == decisions(theirs, curve)


def test_startup_trials_and_all_nan_trials() -> None:
    study = study_with(MedianCarryForwardPruner(n_startup_trials=5), FULL_RUNS)
    assert decisions(study, [0.0, 0.0]) == [False, False]  # 2 < 5 completed trials: no pruning yet
    study = study_with(MedianCarryForwardPruner(n_startup_trials=1), FULL_RUNS)
    assert decisions(study, [float("nan")]) == [True]


def test_built_from_settings_and_validated() -> None:
    pruner = build_pruner(PrunerSection(name="median_carry_forward", n_startup_trials=3, n_warmup_steps=2), 20)
    assert isinstance(pruner, MedianCarryForwardPruner)
    assert (pruner._n_startup_trials, pruner._n_warmup_steps, pruner._interval_steps) == (3, 2, 1)
    with pytest.raises(ValueError, match="percentile not used by pruner 'median_carry_forward'"):
        PrunerSection(name="median_carry_forward", percentile=30.0)
    for bad in ({"n_startup_trials": -1}, {"n_warmup_steps": -1}, {"interval_steps": 0}, {"n_min_trials": 0}):
        with pytest.raises(ValueError):
            MedianCarryForwardPruner(**bad)
