"""The readers of stored trial records, on trials built by hand (no training)."""

from __future__ import annotations

import math

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from search import records


def trial(state: TrialState, value: float | None = None, **attrs: object) -> optuna.trial.FrozenTrial:
    return create_trial(state=state, value=value, params={"lr": 0.01},
                        distributions={"lr": FloatDistribution(1e-3, 0.1)}, user_attrs=attrs)


def test_how_a_trial_ended() -> None:
    pruned = trial(TrialState.PRUNED, **{records.PRUNED_EPOCH: 3, records.EPOCHS_RUN: 4})
    stopped = trial(TrialState.COMPLETE, 0.9, **{records.EARLY_STOPPED: True, records.STOPPED_EPOCH: 7})
    full = trial(TrialState.COMPLETE, 0.8, **{records.EARLY_STOPPED: False, records.EPOCHS_RUN: 20})
    failed = trial(TrialState.FAIL)
    assert [records.outcome(t) for t in (pruned, stopped, full, failed)] == [
        "pruned", "early stopped", "completed", "failed"]
    assert [records.ended_at(t) for t in (pruned, stopped, full)] == ["pruned at 3", "stopped at 7", ""]
    assert [records.epochs_run(t) for t in (pruned, full, failed)] == [4, 20, 0]


def test_a_running_trial_shows_the_epochs_its_reports_reach_and_a_waiting_one_none() -> None:
    running = create_trial(state=TrialState.RUNNING, params={"lr": 0.01},
                           distributions={"lr": FloatDistribution(1e-3, 0.1)}, intermediate_values={0: 0.5, 1: 0.6})
    waiting = create_trial(state=TrialState.WAITING, params={"lr": 0.01},  # a retry: steps inherited, not its own
                           distributions={"lr": FloatDistribution(1e-3, 0.1)}, intermediate_values={0: 0.5})
    started = trial(TrialState.RUNNING)
    done = trial(TrialState.PRUNED, **{records.EPOCHS_RUN: 4})
    assert [records.epochs_shown(t) for t in (running, waiting, started, done)] == [2, None, None, 4]


def test_test_metrics_belong_to_the_trial_that_is_best_now() -> None:
    study = optuna.create_study(direction="maximize")
    study.add_trial(trial(TrialState.COMPLETE, 0.8))
    assert records.test_metrics(study) == {}
    study.set_user_attr(records.TEST_SCORED_TRIAL, 0)
    study.set_user_attr(records.TEST_METRICS, {"test_accuracy": 0.79})
    assert records.test_metrics(study) == {"test_accuracy": 0.79}
    study.add_trial(trial(TrialState.COMPLETE, 0.9))  # a better trial: the stored score is not its score
    assert records.best_trial(study).number == 1 and records.test_metrics(study) == {}
    assert records.best_trial(optuna.create_study()) is None


def test_values_are_shown_the_same_way_everywhere() -> None:
    assert [records.fmt(v) for v in (0.123456, 3, None, "x", math.inf)] == ["0.1235", "3", "", "x", "inf"]
