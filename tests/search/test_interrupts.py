"""Ctrl-C while a finished trial's result is recorded: the trial stays COMPLETE, then the run stops.

The signal is sent from inside the record (the trial's end work), as a person's Ctrl-C can land there: before,
Optuna recorded such a trial FAIL, nobody re-enqueued it, and its MLflow run stayed RUNNING.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from search import interrupts, publish, session
from search.cli import _ignore, _terminate
from search.config import load_settings
from search.stores import run_paths
from search.study import run_study
from tests.search.failure_helpers import interrupt_on_write
from tests.search.workers_helpers import QUICKSTART, child_runs


@pytest.fixture(autouse=True)
def nothing_held() -> Any:
    """Sessions driven directly by other tests (no caller to tell Optuna and release) may leave a hold behind,
    and a signal sent here must not stop the trainings of later tests in this process."""
    interrupts.reset()
    yield
    interrupts.reset()


@pytest.fixture
def ctrl_c_handler() -> Any:
    """hpo's own SIGINT handler, as `hpo run` installs it; the test's default one is put back after."""
    before = signal.signal(signal.SIGINT, _terminate)
    yield
    signal.signal(signal.SIGINT, before)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_held_raises_a_noted_interrupt_when_it_ends_and_nothing_otherwise() -> None:
    assert not interrupts.noted()  # not holding: the handler raises it itself
    went_on = []
    with pytest.raises(KeyboardInterrupt), interrupts.held():
        assert interrupts.noted()  # held: kept for the end of the block...
        went_on.append(True)  # ...which goes on
    assert went_on == [True]
    interrupts.release()  # nothing pending: nothing raised


@pytest.mark.parametrize("pack", [1, 2])
def test_ctrl_c_while_a_finished_trial_is_recorded_keeps_it_complete(
        pack: int, ctrl_c_handler: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings(QUICKSTART, ["study.max_epochs=2", "objective.widths=[8,16]", "study.name='ctrlc'",
                                          "early_stopping.enabled=false", "pruner={name='none'}",
                                          f"study.pack={pack}"])
    paths = run_paths(tmp_path / "runs", "ctrlc", None)
    real_end = publish.on_trial_end
    sent: list[int] = []

    def end_with_ctrl_c(trial_session: Any, state: str) -> None:
        if not sent:  # the first trial to finish: Ctrl-C in the middle of writing its record
            sent.append(trial_session.trial.number)
            os.kill(os.getpid(), signal.SIGINT)
        real_end(trial_session, state)

    monkeypatch.setattr(session, "on_trial_end", end_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_study(settings, paths, n_trials=4)
    signal.signal(signal.SIGINT, _ignore)
    study = optuna.load_study(study_name="ctrlc", storage=paths.storage_url)
    trials = {t.number: t for t in study.get_trials()}
    finished = trials[sent[0]]
    assert finished.state == TrialState.COMPLETE and finished.value is not None, finished
    runs = {r.info.run_id: r for r in child_runs(MlflowClient(paths.tracking_uri), "ctrlc")}
    assert runs[finished.user_attrs["mlflow_run_id"]].info.status == "FINISHED"
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]  # the run stopped, nothing left open
    assert "finishing the record of a finished trial first" in capsys.readouterr().err
    # a packed partner still training was interrupted as usual: failed and re-enqueued, so nothing is lost
    for t in trials.values():
        if t.state == TrialState.FAIL:
            assert t.user_attrs["reason"] == "interrupted"
            assert any(w.state == TrialState.WAITING and w.system_attrs.get("failed_trial") == t.number
                       for w in trials.values())


def test_ctrl_c_while_a_trial_samples_its_params_names_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before its session starts a trial has no record of its own: Optuna failed it with no reason at all."""
    import objectives.objective

    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(objectives.objective, "suggest", interrupted)
    settings = load_settings(QUICKSTART, ["study.max_epochs=1", "objective.widths=[8,16]", "study.name='early'"])
    paths = run_paths(tmp_path / "runs", "early", None)
    with pytest.raises(KeyboardInterrupt):
        run_study(settings, paths, n_trials=2)
    trials = optuna.load_study(study_name="early", storage=paths.storage_url).get_trials()
    assert [(t.state, t.user_attrs.get("reason")) for t in trials] == [(TrialState.FAIL, "interrupted")]


def test_a_signal_whose_interrupt_was_swallowed_stops_the_next_epoch() -> None:
    """Raised inside a finalizer, the handler's KeyboardInterrupt is only printed ("Exception ignored"): a worker
    trained on and `hpo run --workers` waited for it (one CI run). The next epoch's check raises it."""
    interrupts.check()  # nothing signalled: nothing raised
    interrupts.signalled()
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()


def test_the_interrupt_behind_a_writers_own_error_is_found() -> None:
    plain = RuntimeError("disk full")
    assert interrupts.cause(plain) is plain
    ctrl_c = KeyboardInterrupt()
    try:
        try:
            raise ctrl_c
        except KeyboardInterrupt:
            raise RuntimeError("unexpected pos 40448 vs 40344") from None  # context kept, only not shown
    except RuntimeError as hiding:
        assert interrupts.cause(hiding) is ctrl_c
    looped = ValueError("a")
    looped.__context__ = ValueError("b")
    looped.__context__.__context__ = looped
    assert interrupts.cause(looped) is looped


@pytest.mark.parametrize("pack", [1, 2])
def test_ctrl_c_while_last_pt_is_written_interrupts_the_trial_and_retries_it(
        pack: int, ctrl_c_handler: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A Ctrl-C landing inside torch.save of a last.pt: the zip writer's error on closing hid it, so a packed trial
    was recorded failed with a traceback instead of interrupted and re-enqueued (one CI run)."""
    settings = load_settings(QUICKSTART, ["study.max_epochs=50", "objective.widths=[8,16]", "study.name='mid'",
                                          "early_stopping.enabled=false", "pruner={name='none'}",
                                          "study.checkpoint_every_seconds=0", f"study.pack={pack}"])
    paths = run_paths(tmp_path / "runs", "mid", None)
    real_epoch = session.TrialSession.on_epoch
    epochs: list[int] = []

    def count(self: Any, epoch: int, metrics: Any, state: Any) -> bool:
        epochs.append(epoch)
        return real_epoch(self, epoch, metrics, state)

    def ctrl_c() -> None:
        if len(epochs) >= 2 * pack:  # epoch 1's last.pt: a checkpoint of epoch 0 is on disk to resume from
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(session.TrialSession, "on_epoch", count)
    interrupt_on_write(monkeypatch, 3, ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_study(settings, paths, n_trials=4)
    signal.signal(signal.SIGINT, _ignore)
    trials = optuna.load_study(study_name="mid", storage=paths.storage_url).get_trials()
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == pack and not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.COMPLETE)]
    assert all(t.user_attrs["reason"] == "interrupted" and "error" not in t.user_attrs for t in stopped)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == sorted(t.number for t in stopped)
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("pack", [1, 2])
def test_a_second_ctrl_c_while_an_interrupted_trial_is_recorded_still_retries_it(
        pack: int, ctrl_c_handler: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """People press Ctrl-C twice. The second one lands while the first one's interrupted trial is recorded (its
    dashboard note, its MLflow run) and must not cut that short before the trial is re-enqueued: hpo's handler
    ignores every signal after the first (search/cli.py ``_terminate``)."""
    settings = load_settings(QUICKSTART, ["study.max_epochs=50", "objective.widths=[8,16]", "study.name='twice'",
                                          "early_stopping.enabled=false", "pruner={name='none'}",
                                          f"study.pack={pack}"])
    paths = run_paths(tmp_path / "runs", "twice", None)
    real_epoch, real_end = session.TrialSession.on_epoch, publish.on_trial_end
    sent: list[str] = []

    def epoch_then_ctrl_c(self: Any, epoch: int, metrics: Any, state: Any) -> bool:
        stop = real_epoch(self, epoch, metrics, state)
        if epoch == 1 and not sent:
            sent.append("first")
            os.kill(os.getpid(), signal.SIGINT)
        return stop

    def end_with_another_ctrl_c(trial_session: Any, state: str) -> None:
        if trial_session.reason == "interrupted" and sent == ["first"]:
            sent.append("second")
            os.kill(os.getpid(), signal.SIGINT)
        real_end(trial_session, state)

    monkeypatch.setattr(session.TrialSession, "on_epoch", epoch_then_ctrl_c)
    monkeypatch.setattr(session, "on_trial_end", end_with_another_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_study(settings, paths, n_trials=4)
    signal.signal(signal.SIGINT, _ignore)
    assert sent == ["first", "second"]
    trials = optuna.load_study(study_name="twice", storage=paths.storage_url).get_trials()
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == pack and not [t for t in trials if t.state == TrialState.RUNNING]
    runs = {r.info.run_id: r for r in child_runs(MlflowClient(paths.tracking_uri), "twice")}
    for t in stopped:  # every interrupted trial recorded and re-enqueued, the one recorded under the second Ctrl-C too
        assert t.user_attrs["reason"] == "interrupted" and runs[t.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == sorted(t.number for t in stopped)
