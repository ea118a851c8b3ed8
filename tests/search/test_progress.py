"""What a person watching a study sees: plain lines in logs, live bars on a terminal, `hpo status --watch`."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from search.cli import main
from search.progress import Progress
from search.watch import is_done, watch
from search.workers import retry

LR = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr does in an interactive shell."""

    def isatty(self) -> bool:
        return True


def add(study: optuna.Study, state: TrialState, value: float | None = None, **attrs: object) -> None:
    values = {0: 0.5, 1: 0.6}
    study.add_trial(create_trial(state=state, value=value, params={"lr": 0.01}, distributions=LR,
                                 user_attrs={"epochs_run": 2, **attrs}, intermediate_values=values))


def small_study(storage: str | None = None, name: str = "watched", budget: int | None = 3) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    study.set_user_attr("hpo.n_trials", budget)
    add(study, TrialState.COMPLETE, 0.9, reason="early_stopped:patience", early_stopped=True)
    add(study, TrialState.PRUNED, reason="pruned", pruned_epoch=1)
    return study


def test_not_a_terminal_gets_one_plain_line_per_trial_and_no_epoch_lines() -> None:
    study = small_study()
    stream = io.StringIO()
    progress = Progress(3, "val_accuracy", stream=stream, max_epochs=4)
    progress.start(study)
    progress.on_epoch(2, 0, {"val_accuracy": 0.7, "train_loss": 0.3})
    for trial in study.trials:
        progress(study, trial)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert lines[0].startswith("trial   0 COMPLETE val_accuracy 0.9000  epochs 2 (early_stopped:patience)")
    assert "| finished 2/3 pruned 1 failed 0  best 0.9000 (#0)" in lines[1]
    assert lines[1].startswith("trial   1 PRUNED")


def test_a_failed_trial_that_was_retried_says_so_in_the_line() -> None:
    study = small_study()
    add(study, TrialState.FAIL, reason="interrupted")
    stream = io.StringIO()
    progress = Progress(3, "val_accuracy", stream=stream, max_epochs=4)
    failed = study.trials[-1]
    progress(study, failed)
    assert "pruned 1 failed 1  best" in stream.getvalue()  # nobody retries it: a result lost
    retry(study, failed)  # as Ctrl-C does: re-enqueued, to resume
    progress(study, failed)
    last = stream.getvalue().splitlines()[-1]
    assert last.split("| ")[1].startswith("finished 2/3 pruned 1 failed 1 (1 retried)  best")


def test_a_line_written_late_counts_the_study_as_it_stood_when_its_trial_ended() -> None:
    """`hpo run --workers` reads finished trials from the storage once a second, so trial 0's line may be written
    after trial 1 finished too: the line must not say 'finished 2' or name trial 1 as the best."""
    study = optuna.create_study(direction="maximize")
    add(study, TrialState.COMPLETE, 0.9, reason="completed")
    time.sleep(0.01)
    add(study, TrialState.COMPLETE, 0.95, reason="completed")
    progress = Progress(3, "val_accuracy", stream=io.StringIO(), max_epochs=4)
    first, second = study.trials
    assert "| finished 1/3 pruned 0 failed 0  best 0.9000 (#0)" in progress.line(study, first)
    assert "| finished 2/3 pruned 0 failed 0  best 0.9500 (#1)" in progress.line(study, second)


def test_terminal_shows_study_and_epoch_bars_with_counts_best_and_eta() -> None:
    study = small_study(budget=5)
    stream = Terminal()
    progress = Progress(5, "val_accuracy", stream=stream, max_epochs=4)
    progress.start(study)  # a resumed study: the bar starts at its 2 finished trials
    progress.on_epoch(2, 0, {"val_accuracy": 0.71, "train_loss": 0.35})
    progress.on_epoch(2, 1, {"val_accuracy": 0.82, "train_loss": 0.25})
    add(study, TrialState.COMPLETE, 0.95, reason="completed", early_stopped=False)
    progress(study, study.trials[-1])
    progress.close()
    text = stream.getvalue()
    assert "trials finished 2/5" in text and "trials finished 3/5" in text
    assert "pruned 1, early-stopped 1, failed 0, best 0.9500 (#2)" in text
    assert "elapsed, ETA" in text
    assert "trial 2 epochs" in text and "2/4, val_accuracy 0.8200, loss 0.2500" in text
    assert "trial   2 COMPLETE val_accuracy 0.9500" in text  # the finished trial's line scrolls above the bars


def test_watch_on_a_finished_study_prints_once_and_ends(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path / "runs" / "watched"
    root.mkdir(parents=True)
    study = small_study(f"sqlite:///{root / 'optuna.db'}", budget=2)
    assert is_done(study)
    code = main(["status", "--study", "watched", "--run-dir", str(tmp_path / "runs"), "--watch", "--interval", "30"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("number  state") == 1  # printed once: a second table would mean it waited for a refresh
    assert "study 'watched': 2/2 finished at" in out and "; done" in out
    assert "1 complete, 1 pruned, 0 failed, 0 running" in out


def test_watch_refreshes_until_the_budget_is_met(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path / "runs" / "watched"
    root.mkdir(parents=True)
    storage = f"sqlite:///{root / 'optuna.db'}"
    small_study(storage, budget=3)
    result: dict[str, int] = {}
    args = ["status", "--study", "watched", "--run-dir", str(tmp_path / "runs"), "--watch", "--interval", "0.05"]
    watcher = threading.Thread(target=lambda: result.setdefault("code", main(args)))
    watcher.start()
    time.sleep(1.0)
    assert watcher.is_alive(), "stopped before the budget was met"
    running = optuna.load_study(study_name="watched", storage=storage)
    trial = running.ask(LR)  # a worker elsewhere starts the last trial
    time.sleep(0.5)
    assert watcher.is_alive(), "stopped while a trial was running"
    running.tell(trial, 0.97)
    watcher.join(timeout=30)
    assert not watcher.is_alive() and result["code"] == 0
    out = capsys.readouterr().out
    assert out.count("refreshing every 0.05 s") >= 5  # refreshed while waiting
    assert "0 failed, 1 running" in out
    assert out.rstrip().splitlines()[0].startswith("study 'watched': 2/3 finished")
    tail = out[out.rindex("study 'watched'"):]
    assert tail.startswith("study 'watched': 3/3 finished") and "; done" in tail
    assert "best trial #2: value 0.9700" in tail


def test_watch_stops_quietly_on_ctrl_c() -> None:
    study = small_study(budget=10)

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    stream = io.StringIO()
    assert watch(study, 1.0, stream=stream, sleep=interrupt) == 130
    assert stream.getvalue().count("number  state") == 1 and "Traceback" not in stream.getvalue()


class Clock:
    """search.progress's ``time``, moved by hand: what a log shows depends on the time between lines."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_in_logs_a_long_trial_gets_an_epoch_line_once_a_minute_without_any_other_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr("search.progress.time", clock)
    study = small_study()
    stream = io.StringIO()
    progress = Progress(3, "val_accuracy", stream=stream, max_epochs=30)
    metrics = {"val_accuracy": 0.7, "train_loss": 0.3}
    clock.now += 59
    progress.on_epoch(2, 0, metrics)  # under a minute since the start: nothing
    clock.now += 2
    progress.on_epoch(2, 1, metrics)  # 61 s: a line
    clock.now += 30
    progress.on_epoch(2, 2, metrics)  # 30 s after that line: nothing
    clock.now += 40
    progress(study, study.trials[0])  # a trial line counts as a line too
    clock.now += 50
    progress.on_epoch(2, 3, metrics)  # 50 s after the trial line: nothing
    clock.now += 10
    progress.on_epoch(2, 4, {"val_accuracy": 0.8125, "train_loss": 0.25})
    lines = stream.getvalue().splitlines()
    assert lines[0] == "trial   2 running  epoch 2/30  val_accuracy 0.7000  loss 0.3000  [61s]"
    assert lines[1].startswith("trial   0 COMPLETE")
    assert lines[2] == "trial   2 running  epoch 5/30  val_accuracy 0.8125  loss 0.2500  [191s]"
    assert len(lines) == 3 and "\r" not in stream.getvalue()


def test_in_logs_hpo_run_workers_shows_the_running_trials_from_the_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's workers train quietly; its line names each running trial's last reported epoch and value."""
    clock = Clock()
    monkeypatch.setattr("search.progress.time", clock)
    study = small_study()
    stream = io.StringIO()
    progress = Progress(3, "val_accuracy", stream=stream, max_epochs=20)
    waiting = study.ask()  # running, nothing reported yet: left out
    later = study.ask()
    for step, value in enumerate([0.5, 0.625]):
        later.report(value, step)
    progress.workers_running(study)
    clock.now += 61
    progress.workers_running(study)
    clock.now += 1
    progress.workers_running(study)  # a second after the last line: nothing
    assert stream.getvalue().splitlines() == [
        f"running: trial {later.number} epoch 2/20 val_accuracy 0.6250  [61s]"]
    assert waiting.number != later.number
    live = Progress(3, "val_accuracy", stream=Terminal(), max_epochs=20)
    clock.now += 120
    live.workers_running(study)  # a terminal has the bars instead
    assert live.stream.getvalue() == ""
