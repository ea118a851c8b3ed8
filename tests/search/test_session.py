"""TrialSession driven with ask/tell and hand-made epoch metrics: no training, real Optuna and MLflow stores."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from search.config import settings_from_dict
from search.session import StudyContext, TrialFailed
from search.tracking import Tracker

BASE = {
    "study": {"name": "unit", "direction": "maximize", "metric": "val_accuracy", "n_trials": 3, "max_epochs": 6},
    "pruner": {"name": "none"},
    "early_stopping": {"monitor": "val_loss", "mode": "min", "patience": 2},
    "space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}},
    "objective": {"name": "cnn"},
}


def metrics(val_loss: float, val_accuracy: float, train_loss: float = 0.5) -> dict[str, float]:
    return {"train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy, "lr": 0.01,
            "epoch_seconds": 0.1, "images_per_second": 1000.0}


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Tracker:
    root = tmp_path_factory.mktemp("mlflow")
    return Tracker(f"sqlite:///{root / 'mlflow.db'}", "unit", root / "artifacts")


@pytest.fixture
def ctx(tracker: Tracker, tmp_path: Path) -> StudyContext:
    settings = settings_from_dict(BASE)
    parent = tracker.parent_run("unit", {"n_trials": 3})
    return StudyContext(settings, tracker, parent, tmp_path / "checkpoints")


def run_of(tracker: Tracker, trial: optuna.Trial):  # noqa: ANN201
    return tracker.client.get_run(trial.user_attrs["mlflow_run_id"])


def state_for(model: torch.nn.Module) -> SimpleNamespace:
    return SimpleNamespace(model=model)


def test_early_stop_restores_best_weights_and_records_everything(ctx: StudyContext, tracker: Tracker) -> None:
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    model = torch.nn.Linear(2, 2)
    # val_loss: 1.0, 0.5 (best, epoch 1), 0.6, 0.7 -> patience 2 stops at epoch 3
    sequence = [(1.0, 0.5), (0.5, 0.9), (0.6, 0.8), (0.7, 0.95)]
    with ctx.trial(trial, {"lr": 0.01}, {"lr": 0.01, "dataset": "digits"}) as session:
        for epoch, (loss, acc) in enumerate(sequence):
            with torch.no_grad():
                model.weight.fill_(float(epoch))
            if session.on_epoch(epoch, metrics(loss, acc), state_for(model)):
                break
        value = session.complete({"model_spec": {"kind": "linear"}, "settings": {}})
    study.tell(trial, value)
    assert epoch == 3
    assert value == 0.9  # the study metric at the restored best epoch, not the last epoch's 0.95
    frozen = study.trials[0]
    assert frozen.user_attrs["early_stopped"] is True
    assert frozen.user_attrs["stopped_epoch"] == 3 and frozen.user_attrs["best_epoch"] == 1
    assert frozen.intermediate_values == {0: 0.5, 1: 0.9, 2: 0.8, 3: 0.95}
    checkpoint = torch.load(frozen.user_attrs["checkpoint"], weights_only=True)
    assert torch.all(checkpoint["state_dict"]["weight"] == 1.0)  # the weights of epoch 1
    run = run_of(tracker, frozen)
    assert run.info.status == "FINISHED"
    assert run.data.tags["optuna.state"] == "COMPLETE"
    assert run.data.tags["early_stopped"] == "true" and run.data.tags["stopped_epoch"] == "3"
    assert run.data.metrics["best_val_accuracy"] == 0.9 and run.data.metrics["best_epoch"] == 1
    history = MlflowClient(tracker.tracking_uri).get_metric_history(run.info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.9), (2, 0.8), (3, 0.95)]


def test_non_finite_loss_prunes_with_reason(ctx: StudyContext, tracker: Tracker) -> None:
    def objective(trial: optuna.Trial) -> float:
        with ctx.trial(trial, {"lr": 0.1}, {"lr": 0.1}) as session:
            session.on_epoch(0, metrics(1.0, 0.3), state_for(torch.nn.Linear(1, 1)))
            session.on_epoch(1, metrics(math.nan, 0.1, train_loss=math.nan), state_for(torch.nn.Linear(1, 1)))
            session.on_epoch(2, metrics(0.5, 0.9), state_for(torch.nn.Linear(1, 1)))  # not reached
            return session.complete({"model_spec": {}, "settings": {}})

    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=1)  # the state is Optuna's reading of what the session raised
    frozen = study.trials[0]
    assert frozen.state == optuna.trial.TrialState.PRUNED
    assert frozen.user_attrs["reason"] == "nan_loss" and frozen.user_attrs["pruned_epoch"] == 1
    assert frozen.user_attrs["epochs_run"] == 2  # epoch 2 never ran
    run = run_of(tracker, frozen)
    assert run.data.tags["optuna.state"] == "PRUNED" and run.data.tags["hpo.reason"] == "nan_loss"
    assert run.info.status == "FINISHED"


def test_pruner_decision_marks_trial_pruned(tracker: Tracker, tmp_path: Path) -> None:
    settings = settings_from_dict({**BASE, "pruner": {"name": "threshold", "lower": 0.5}})
    ctx = StudyContext(settings, tracker, tracker.parent_run("unit", {}), tmp_path)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned), ctx.trial(trial, {"lr": 0.1}, {"lr": 0.1}) as session:
        session.on_epoch(0, metrics(1.0, 0.7), state_for(torch.nn.Linear(1, 1)))
        session.on_epoch(1, metrics(0.9, 0.4), state_for(torch.nn.Linear(1, 1)))
    assert trial.user_attrs["reason"] == "pruned" and trial.user_attrs["pruned_epoch"] == 1
    assert trial.user_attrs["epochs_run"] == 2
    tags = run_of(tracker, trial).data.tags  # stopped_epoch means early stopping: not on a pruned run
    assert tags["optuna.state"] == "PRUNED" and tags["early_stopped"] == "false" and "stopped_epoch" not in tags


def test_reported_steps_are_held_during_the_trial_and_stored_before_it_is_told(
        tracker: Tracker, tmp_path: Path) -> None:
    """On SQLite: epochs shorter than the hold leave their steps unwritten while the trial runs (the pruner
    decides on the session's own copy); the session's end writes them all, so Optuna's tell of a pruned trial
    takes its last step as the value, and a retry would inherit every step."""
    from search.optuna_adapter import stored_trial
    from search.stores import open_storage

    settings = settings_from_dict({**BASE, "pruner": {"name": "threshold", "lower": 0.5}})
    ctx = StudyContext(settings, tracker, tracker.parent_run("unit", {}), tmp_path)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5),
                                storage=open_storage(f"sqlite:///{tmp_path / 'optuna.db'}"))
    trial = study.ask()
    seen: list[dict[int, float]] = []
    with pytest.raises(optuna.TrialPruned) as pruned, ctx.trial(trial, {"lr": 0.1}, {"lr": 0.1}) as session:
        for epoch, acc in enumerate([0.7, 0.8, 0.4]):
            session.on_epoch(epoch, metrics(1.0, acc), state_for(torch.nn.Linear(1, 1)))
            seen.append(dict(stored_trial(trial).intermediate_values))
    assert seen == [{}, {}]  # the third epoch pruned: on_epoch raised before a third look
    assert stored_trial(trial).intermediate_values == {0: 0.7, 1: 0.8, 2: 0.4}
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert study.trials[0].value == 0.4 and "epoch 2" in str(pruned.value)


@pytest.mark.parametrize("trial_raises", [None, "ValueError", "KeyboardInterrupt"])
def test_a_failed_write_of_the_held_steps_ends_the_trial_and_never_hides_its_own_end(
        ctx: StudyContext, tracker: Tracker, monkeypatch: pytest.MonkeyPatch, trial_raises: str | None,
        tmp_path: Path) -> None:
    """The held steps' write fails with an ordinary error as the trial ends: a trial that ended well fails with
    that error (as a failed report in on_epoch would fail it); a trial ending with its own error or a Ctrl-C
    ends with that, recorded as usual."""
    from search import optuna_adapter

    def report_values(trial: optuna.Trial, values: object) -> None:
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(optuna_adapter, "report_values", report_values)
    from search.stores import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")  # an SQLite file: steps are held
    trial = optuna.create_study(direction="maximize", storage=storage).ask()
    expected = KeyboardInterrupt if trial_raises == "KeyboardInterrupt" else TrialFailed
    with pytest.raises(expected), ctx.trial(trial, {"lr": 0.1}, {"lr": 0.1}) as session:
        session.on_epoch(0, metrics(1.0, 0.7), state_for(torch.nn.Linear(1, 1)))
        if trial_raises == "ValueError":
            raise ValueError("its own error")
        if trial_raises == "KeyboardInterrupt":
            raise KeyboardInterrupt
        session.complete({"model_spec": {}, "settings": {}})
    reason = trial.user_attrs["reason"]
    if trial_raises is None:
        assert reason == "error: RuntimeError: the disk is full"
    elif trial_raises == "ValueError":
        assert reason == "error: ValueError: its own error"
    else:
        assert reason == "interrupted"
    assert run_of(tracker, trial).info.status in ("FAILED", "KILLED")


def test_a_run_that_used_every_epoch_has_no_stopped_epoch_tag(tracker: Tracker, tmp_path: Path) -> None:
    settings = settings_from_dict({**BASE, "study": {**BASE["study"], "max_epochs": 2}})
    ctx = StudyContext(settings, tracker, tracker.parent_run("unit", {}), tmp_path)
    full = optuna.create_study(direction="maximize").ask()
    with ctx.trial(full, {"lr": 0.1}, {"lr": 0.1}) as session:
        for epoch in range(2):
            session.on_epoch(epoch, metrics(1.0 - epoch / 10, 0.7), state_for(torch.nn.Linear(1, 1)))
        session.complete({"model_spec": {}, "settings": {}})
    tags = run_of(tracker, full).data.tags
    assert tags["optuna.state"] == "COMPLETE" and tags["early_stopped"] == "false" and "stopped_epoch" not in tags


def test_out_of_memory_fails_trial_with_batch_size(ctx: StudyContext, tracker: Tracker) -> None:
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    with pytest.raises(TrialFailed, match="out_of_memory"), ctx.trial(trial, {}, {"batch_size": 4096}):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert trial.user_attrs["reason"] == "out_of_memory"
    assert trial.user_attrs["oom_batch_size"] == 4096
    run = run_of(tracker, trial)
    assert run.info.status == "FAILED" and run.data.tags["optuna.state"] == "FAIL"


def test_interrupt_marks_mlflow_run_killed(ctx: StudyContext, tracker: Tracker) -> None:
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    with pytest.raises(KeyboardInterrupt), ctx.trial(trial, {}, {}):
        raise KeyboardInterrupt
    run = run_of(tracker, trial)
    assert run.info.status == "KILLED" and run.data.tags["hpo.reason"] == "interrupted"


def test_study_continues_after_failed_trial(ctx: StudyContext, tracker: Tracker) -> None:
    """optimize(catch=TrialFailed) records the failure and runs the next trial."""
    calls = []

    def objective(trial: optuna.Trial) -> float:
        calls.append(trial.number)
        with ctx.trial(trial, {}, {}) as session:
            if trial.number == 0:
                raise ValueError("boom")
            session.on_epoch(0, metrics(0.5, 0.7), state_for(torch.nn.Linear(1, 1)))
            return session.complete({"model_spec": {}, "settings": {}})

    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=2, catch=(TrialFailed,))
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[0].user_attrs["reason"] == "error: ValueError: boom"
    assert study.trials[1].value == 0.7


class _Resumable:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "history": []}


@pytest.mark.parametrize(("seconds", "written"), [(0.0, True), (3600.0, False)])
def test_last_checkpoint_waits_for_checkpoint_every_seconds(
    tracker: Tracker, tmp_path: Path, seconds: float, written: bool
) -> None:
    base = {**BASE, "study": {**BASE["study"], "checkpoint_every_seconds": seconds}}
    ctx = StudyContext(settings_from_dict(base), tracker, tracker.parent_run("unit", {"n_trials": 3}),
                       tmp_path / "checkpoints")
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    with ctx.trial(trial, {"lr": 0.01}, {"lr": 0.01}) as session:
        session.on_epoch(0, metrics(1.0, 0.5), _Resumable(torch.nn.Linear(2, 2)))
        assert session.last_path.exists() is written  # an epoch of milliseconds: no write within the hour
        session.on_epoch(1, metrics(0.9, 0.6), _Resumable(torch.nn.Linear(2, 2)))
        value = session.complete({"model_spec": {}, "settings": {}})
    study.tell(trial, value)
