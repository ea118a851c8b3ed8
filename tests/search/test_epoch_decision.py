"""The per-epoch decision on hand-worked sequences, and the agreement it exists for: a live run (TrialSession,
real Optuna and MLflow stores) and a replay of the same recorded curves end every trial the same way, for
every pruner, with early stopping on and off."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from search import session as session_module
from search.config import Settings, settings_from_dict
from search.early_stopping import EarlyStopping
from search.epoch_decision import EpochOutcome, decide_epoch
from search.pruning import build_pruner
from search.replay import RecordedTrial, replay
from search.session import StudyContext
from search.tracking import Tracker

MAX_EPOCHS = 6


class Trial:
    """A stand-in that records reports and prunes when told: the decision's only view of Optuna."""

    def __init__(self, prune_at: int | None = None) -> None:
        self.reports: list[tuple[int, float]] = []
        self.prune_at = prune_at

    def report(self, value: float, step: int) -> None:
        self.reports.append((step, value))

    def should_prune(self) -> bool:
        return self.prune_at is not None and self.reports[-1][0] >= self.prune_at


def stopper(patience: int = 2) -> EarlyStopping:
    return EarlyStopping(monitor="val_accuracy", mode="max", patience=patience)


def m(acc: float, loss: float = 0.5) -> dict[str, float]:
    return {"val_accuracy": acc, "val_loss": loss}


def test_non_finite_loss_prunes_before_anything_is_reported() -> None:
    trial, es = Trial(), stopper()
    assert decide_epoch(0, m(0.5, math.nan), "val_accuracy", es, trial, MAX_EPOCHS) == EpochOutcome("prune",
                                                                                                     "nan_loss")
    assert trial.reports == [] and es.epoch == -1  # the stopper never saw it
    assert decide_epoch(0, m(math.inf), "val_accuracy", es, trial, MAX_EPOCHS).reason == "nan_loss"


def test_sequence_improves_plateaus_and_stops() -> None:
    trial, es = Trial(), stopper(patience=2)
    outcomes = [decide_epoch(e, m(a), "val_accuracy", es, trial, MAX_EPOCHS) for e, a in
                enumerate([0.5, 0.7, 0.7, 0.6])]
    assert [o.action for o in outcomes] == ["continue", "continue", "continue", "stop"]
    assert [o.improved for o in outcomes] == [True, True, False, False]
    assert outcomes[-1].early_stopped and outcomes[-1].reason.startswith("early_stopped:")
    assert trial.reports == [(0, 0.5), (1, 0.7), (2, 0.7), (3, 0.6)]  # every epoch reported, stop included


def test_the_pruner_wins_over_early_stopping_on_the_same_epoch() -> None:
    trial, es = Trial(prune_at=3), stopper(patience=2)
    outcomes = [decide_epoch(e, m(a), "val_accuracy", es, trial, MAX_EPOCHS) for e, a in
                enumerate([0.5, 0.7, 0.7, 0.6])]
    assert outcomes[-1] == EpochOutcome("prune", "pruned", improved=False)


def test_a_stop_on_the_last_epoch_is_not_an_early_stop() -> None:
    trial, es = Trial(), stopper(patience=1)
    outcomes = [decide_epoch(e, m(a), "val_accuracy", es, trial, 3) for e, a in enumerate([0.5, 0.7, 0.6])]
    assert outcomes[-1] == EpochOutcome("stop", "", improved=False, early_stopped=False)


# --- live run vs replay -----------------------------------------------------------------------------------

CURVES = [
    [0.85, 0.88, math.nan, 0.90, 0.91, 0.92],  # a NaN at epoch 2 (first, so that no pruner ends it sooner)
    [0.50, 0.60, 0.70, 0.80, 0.85, 0.90],  # keeps improving
    [0.40, 0.60, 0.60, 0.60, 0.70, 0.80],  # plateau: patience 2 stops it at epoch 3
    [0.30, 0.35, 0.40, 0.45, 0.50, 0.55],  # below the others throughout
    [0.90, 0.91, 0.91, 0.91, 0.91, 0.91],  # best early, then flat
    [0.20, 0.25, 0.30, 0.32, 0.33, 0.34],  # worst
    [0.60, 0.75, 0.80, 0.82, 0.84, 0.86],
    [0.55, 0.56, 0.57, 0.56, 0.55, 0.54],  # peaks at epoch 2
]
PRUNERS: list[dict[str, Any]] = [
    {"name": "none"},
    {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
    {"name": "percentile", "percentile": 40.0, "n_startup_trials": 2},
    {"name": "successive_halving", "min_resource": 1, "reduction_factor": 2},
    {"name": "hyperband", "min_resource": 1, "reduction_factor": 2},
    {"name": "threshold", "lower": 0.42, "n_warmup_steps": 1},
    {"name": "patient", "patience": 1, "n_startup_trials": 2},
    {"name": "wilcoxon", "p_threshold": 0.2},
    {"name": "median_carry_forward", "n_startup_trials": 2},
]


def settings_for(pruner: dict[str, Any], early_stopping: bool) -> Settings:
    return settings_from_dict({
        "study": {"name": f"agree-{pruner['name']}-{early_stopping}", "n_trials": len(CURVES),
                  "max_epochs": MAX_EPOCHS, "metric": "val_accuracy"},
        "pruner": pruner,
        "early_stopping": {"enabled": early_stopping, "monitor": "val_accuracy", "patience": 2},
        "space": {"lr": {"type": "float", "low": 1e-3, "high": 0.1, "log": True}},
        "objective": {"name": "cnn"},
    })


def recorded() -> list[RecordedTrial]:
    distributions = {"lr": FloatDistribution(1e-3, 0.1, log=True)}
    return [RecordedTrial(i, {"lr": 0.001 * (i + 1)}, distributions,
                          [{"val_accuracy": a, "val_loss": 1 - a, "epoch_seconds": 0.1} for a in curve], None, None)
            for i, curve in enumerate(CURVES)]


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Tracker:
    root = tmp_path_factory.mktemp("mlflow")
    return Tracker(f"sqlite:///{root / 'mlflow.db'}", "agree", root / "artifacts")


def live(settings: Settings, trials: list[RecordedTrial], tracker: Tracker, checkpoints: Path) -> optuna.Study:
    """The recorded curves fed through TrialSession.on_epoch, as a training loop would feed them."""
    study = optuna.create_study(study_name=settings.study.name, direction="maximize",
                                pruner=build_pruner(settings.pruner, MAX_EPOCHS))
    ctx = StudyContext(settings, tracker, tracker.parent_run(settings.study.name, {}), checkpoints)
    model = torch.nn.Linear(1, 1)
    for rec in trials:
        study.enqueue_trial(rec.params)
        trial = study.ask(rec.distributions)
        try:
            with ctx.trial(trial, rec.params, rec.params) as session:
                for epoch, metrics in enumerate(rec.epochs):
                    if session.on_epoch(epoch, dict(metrics), SimpleNamespace(model=model)):
                        break
                value = session.complete({"model_spec": {}, "settings": {}})
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, value)
    return study


def outcome(t: optuna.trial.FrozenTrial) -> tuple[Any, ...]:
    return (t.number, t.state, t.user_attrs["epochs_run"], t.user_attrs["reason"], t.user_attrs["early_stopped"],
            t.value)


@pytest.mark.usefixtures("quiet_optuna")
@pytest.mark.parametrize("early_stopping", [True, False], ids=["es", "no-es"])
@pytest.mark.parametrize("pruner", PRUNERS, ids=[p["name"] for p in PRUNERS])
def test_live_run_and_replay_end_every_trial_the_same_way(
    pruner: dict[str, Any], early_stopping: bool, tracker: Tracker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "on_trial_end", lambda session, state: None)  # plots: not a decision
    settings = settings_for(pruner, early_stopping)
    trials = recorded()
    live_study = live(settings, trials, tracker, tmp_path / "checkpoints")
    replayed = replay(trials, settings)
    assert [outcome(t) for t in live_study.trials] == [outcome(t) for t in replayed.trials]
    states = {t.state for t in live_study.trials}
    if pruner["name"] != "none":
        assert TrialState.PRUNED in states  # the comparison covers pruned trials, not only complete ones
    reasons = {t.user_attrs["reason"] for t in live_study.trials}
    assert live_study.trials[0].user_attrs["reason"] == "nan_loss"
    if early_stopping and pruner["name"] == "none":
        assert any(r.startswith("early_stopped") for r in reasons)
