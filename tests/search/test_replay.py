"""Replaying recorded curves: the same decisions a real trial makes, on recorded values, with ask/tell."""

from __future__ import annotations

import zlib
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from search.config import Settings, settings_from_dict
from search.replay import ReplayError, load_recorded, needed_metrics, replay

pytestmark = pytest.mark.usefixtures("quiet_optuna")

CURVES = [
    [0.50, 0.60, 0.70, 0.80, 0.85, 0.90],  # keeps improving: never stopped early
    [0.40, 0.60, 0.60, 0.60, 0.70, 0.80],  # plateau at epochs 1-3: patience 2 stops it at epoch 3
    [0.30, 0.35, 0.40, 0.45, 0.50, 0.55],  # below the median at every epoch
    [0.90, 0.91, 0.91, 0.91, 0.91, 0.91],  # best early, then flat
]
LRS = [0.01, 0.02, 0.03, 0.04]


def settings(pruner: dict[str, Any], early_stopping: bool, name: str = "replay-test") -> Settings:
    return settings_from_dict({
        "study": {"name": name, "n_trials": 4, "max_epochs": 6, "metric": "val_accuracy"},
        "pruner": pruner,
        "early_stopping": {"enabled": early_stopping, "monitor": "val_accuracy", "patience": 2},
        "space": {"lr": {"type": "float", "low": 1e-3, "high": 0.1, "log": True}},
        "objective": {"name": "cnn"},
    })


def source_study(curves: list[list[float]] = CURVES) -> optuna.Study:
    """A finished study like the 'none' strategy leaves: every trial reported every epoch."""
    study = optuna.create_study(direction="maximize")
    for lr, curve in zip(LRS, curves, strict=True):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr}, distributions={"lr": FloatDistribution(1e-3, 0.1, log=True)}, value=max(curve),
            intermediate_values=dict(enumerate(curve)), user_attrs={"best_epoch": curve.index(max(curve))},
        ))
    return study


def recorded(cfg: Settings, study: optuna.Study | None = None) -> list:
    return load_recorded(study or source_study(), None, needed_metrics(cfg), cfg.study.max_epochs)


def test_replaying_without_pruning_or_early_stopping_reproduces_the_source() -> None:
    cfg = settings({"name": "none"}, early_stopping=False)
    study = replay(recorded(cfg), cfg)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert [t.params["lr"] for t in study.trials] == LRS  # the source's configurations, in its order
    assert [t.user_attrs["epochs_run"] for t in study.trials] == [6] * 4
    assert [t.value for t in study.trials] == [max(c) for c in CURVES]  # restore_best: the best epoch's value
    assert [t.intermediate_values for t in study.trials] == [dict(enumerate(c)) for c in CURVES]


def test_early_stopping_replay_stops_where_patience_runs_out_and_keeps_the_best_epoch() -> None:
    cfg = settings({"name": "none"}, early_stopping=True)
    study = replay(recorded(cfg), cfg)
    runs = [t.user_attrs["epochs_run"] for t in study.trials]
    # trial 1: best 0.60 at epoch 1, no improvement at 2 and 3 -> stops after epoch 3 (4 epochs run);
    # trial 3: best 0.91 at epoch 1 (0.91 is not > 0.91), stops after epoch 3 too.
    assert runs == [6, 4, 6, 4]
    assert [t.user_attrs["early_stopped"] for t in study.trials] == [False, True, False, True]
    assert study.trials[1].value == 0.60 and study.trials[1].user_attrs["best_epoch"] == 1
    assert study.trials[1].user_attrs["reason"] == "early_stopped:patience"
    assert sorted(study.trials[1].intermediate_values) == [0, 1, 2, 3]


def test_median_pruner_replay_prunes_the_trial_below_the_median() -> None:
    cfg = settings({"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1}, early_stopping=False)
    study = replay(recorded(cfg), cfg)
    states = [t.state for t in study.trials]
    # trial 2's best at epoch 1 (0.35) is below the median of trials 0 and 1 there (0.60): pruned at epoch 1.
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert study.trials[2].user_attrs["pruned_epoch"] == 1
    assert study.trials[2].user_attrs["epochs_run"] == 2
    assert sum(t.user_attrs["epochs_run"] for t in study.trials) == 6 + 6 + 2 + 6


def test_carry_forward_differs_from_median_after_early_stops() -> None:
    """Two fast trials peak at epoch 0 and stop after epoch 2 (patience 2); a later, slower trial is judged
    against them at epoch 3 only with carry-forward."""
    curves = [[0.50, 0.60, 0.70, 0.75, 0.80, 0.82], [0.55, 0.65, 0.72, 0.78, 0.82, 0.85],
              [0.97, 0.96, 0.96, 0.96, 0.96, 0.96], [0.96, 0.95, 0.95, 0.95, 0.95, 0.95]]
    new = [0.80, 0.83, 0.85, 0.86, 0.865, 0.87]
    study = source_study(curves)
    study.add_trial(optuna.trial.create_trial(
        params={"lr": 0.05}, distributions={"lr": FloatDistribution(1e-3, 0.1, log=True)}, value=max(new),
        intermediate_values=dict(enumerate(new)),
    ))
    results = {}
    for name in ("median", "median_carry_forward"):
        cfg = settings({"name": name, "n_startup_trials": 3}, early_stopping=True)
        results[name] = replay(load_recorded(study, None, needed_metrics(cfg), 6), cfg).trials[-1]
    assert results["median"].state == TrialState.COMPLETE  # survivors' median at epoch 3 is 0.765
    assert results["median_carry_forward"].state == TrialState.PRUNED  # carried: median(.75,.78,.97,.96) = .87
    assert results["median_carry_forward"].user_attrs["pruned_epoch"] == 3


def test_hyperband_replay_prunes_within_a_bracket_and_is_reproducible() -> None:
    """Hyperband, max_resource 6 (max_epochs), min_resource 1, reduction factor 2: floor(log2(6)) + 1 = 3 brackets
    with trial shares ceil(3 * 2**s / (s + 1)), s = 2 - b: 4, 3, 3 (10 in all). Trial n of study NAME is in bracket 0
    when crc32("NAME_n") % 10 < 4: for "hyperband-replay-37" that is all four trials (checked first, with zlib).

    Bracket 0 is successive halving with rungs ending at epochs 1, 2, 4: a trial goes on only if its value is in
    the top half of those reported at the rung (the top one while fewer than 2 are there), itself included.
    trial 0: rung 0 [0.60], rung 1 [0.70], rung 2 [0.85]: alone each time, goes on -> COMPLETE
    trial 1: rung 0 [0.60, 0.60]: 0.60 is the top one (a tie) -> on; rung 1 [0.70, 0.60]: 0.60 is not -> pruned at 2
    trial 2: rung 0 [0.60, 0.60, 0.35]: top 3 // 2 = 1 value is 0.60 -> pruned at epoch 1
    trial 3: rung 0 [0.60, 0.60, 0.35, 0.91]: top 2 are 0.91, 0.60 -> on; rung 1 [0.70, 0.60, 0.91]: top -> on;
             rung 2 [0.85, 0.91]: top -> on -> COMPLETE"""
    name = "hyperband-replay-37"
    assert [zlib.crc32(f"{name}_{n}".encode()) % 10 < 4 for n in range(4)] == [True] * 4
    cfg = settings({"name": "hyperband", "min_resource": 1, "reduction_factor": 2}, early_stopping=False, name=name)
    first = replay(recorded(cfg), cfg).trials
    assert [t.state for t in first] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED, TrialState.COMPLETE]
    assert [t.user_attrs.get("pruned_epoch") for t in first] == [None, 2, 1, None]
    assert [t.user_attrs["epochs_run"] for t in first] == [6, 3, 2, 6]
    second = replay(recorded(cfg), cfg).trials
    assert [(t.state, t.user_attrs["epochs_run"]) for t in second] == [(t.state, t.user_attrs["epochs_run"])
                                                                       for t in first]


def test_partial_curves_are_refused_with_what_to_run() -> None:
    study = source_study()
    trial = study.ask({"lr": FloatDistribution(1e-3, 0.1, log=True)})
    trial.report(0.1, 0)
    study.tell(trial, state=TrialState.PRUNED)
    cfg = settings({"name": "none"}, early_stopping=False)
    with pytest.raises(ReplayError, match="--strategies none"):
        recorded(cfg, study)


def test_a_monitor_other_than_the_metric_needs_the_mlflow_history() -> None:
    cfg = settings_from_dict({
        "study": {"name": "x", "n_trials": 4, "max_epochs": 6},
        "early_stopping": {"monitor": "val_loss", "patience": 2},
        "space": {"lr": {"type": "float", "low": 1e-3, "high": 0.1, "log": True}},
        "objective": {"name": "cnn"},
    })
    assert needed_metrics(cfg) == ["val_accuracy", "val_loss", "epoch_seconds"]
    with pytest.raises(ReplayError, match="val_loss"):
        recorded(cfg)
