"""The epoch-metrics queue (search/metric_queue.py): merged per run, in order, within its interval, chunked to
MLflow's per-call limit, flushed on demand; and through ``TrialRun``, every epoch in a real MLflow store, sent
with the trial's final state."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from search import tracking
from search.metric_queue import MetricQueue
from search.stores import sqlite_url
from search.tracking import Tracker, TrialRun, metric_histories


class Recorder:
    """A write function that keeps every call it gets (run id, items), as the store would receive them."""

    def __init__(self, fail_on: object = None) -> None:
        self.calls: list[tuple[str, list[object]]] = []
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, run_id: str, items: list[object]) -> None:
        if self.fail_on in items:
            raise RuntimeError(f"store refused {self.fail_on}")
        with self.lock:
            self.calls.append((run_id, list(items)))


def test_items_within_the_interval_are_written_at_flush_in_one_call_per_run_in_order() -> None:
    q, write = MetricQueue(interval=60.0), Recorder()
    for epoch in range(5):
        q.put("a", [f"a{epoch}x", f"a{epoch}y"], write)
        q.put("b", [f"b{epoch}"], write)
    time.sleep(0.2)
    assert write.calls == []  # held: the interval has not passed
    assert q.flush() == []
    assert write.calls == [("a", [f"a{e}{k}" for e in range(5) for k in "xy"]), ("b", [f"b{e}" for e in range(5)])]
    assert q.flush() == [] and len(write.calls) == 2  # nothing left to write


def test_items_are_written_without_a_flush_once_the_interval_has_passed() -> None:
    q, write = MetricQueue(interval=0.05), Recorder()
    q.put("a", [1, 2], write)
    deadline = time.monotonic() + 5
    while not write.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert write.calls == [("a", [1, 2])]
    q.put("a", [3], write)  # the next item waits its own interval, then goes alone
    assert q.flush() == []
    assert write.calls == [("a", [1, 2]), ("a", [3])]


def test_a_run_s_items_are_split_into_calls_of_at_most_per_call() -> None:
    q, write = MetricQueue(interval=60.0, per_call=2), Recorder()
    q.put("a", [1, 2, 3], write)
    q.put("a", [4, 5], write)
    q.flush()
    assert write.calls == [("a", [1, 2]), ("a", [3, 4]), ("a", [5])]


def test_a_failed_write_is_reported_at_the_next_flush_and_the_writer_goes_on() -> None:
    q, write = MetricQueue(interval=60.0, per_call=1), Recorder(fail_on="bad")
    q.put("a", ["ok", "bad", "after"], write)
    errors = q.flush()
    assert [str(e) for e in errors] == ["store refused bad"]
    assert write.calls == [("a", ["ok"]), ("a", ["after"])]
    q.put("a", ["later"], write)
    assert q.flush() == []  # errors are handed over once
    assert write.calls[-1] == ("a", ["later"])


def test_a_flush_never_waits_on_a_writer_thread_that_died() -> None:
    q, write = MetricQueue(interval=60.0), Recorder()
    q.put("a", [1], write)
    q.flush()
    q._thread = threading.Thread(target=lambda: None)  # what a writer killed by an error outside a write leaves
    q._thread.start()
    q._thread.join()
    q._pending["a"] = (write, [2, 3])  # queued after it died
    assert q.flush() == []
    assert write.calls == [("a", [1]), ("a", [2, 3])]  # written by the flushing thread itself


@pytest.mark.parametrize(("interval", "per_call"), [(-1.0, 10), (1.0, 0)])
def test_impossible_settings_are_refused(interval: float, per_call: int) -> None:
    with pytest.raises(ValueError, match="interval must be >= 0 and per_call >= 1"):
        MetricQueue(interval=interval, per_call=per_call)


def test_take_removes_one_run_s_items_and_leaves_the_others() -> None:
    q, write = MetricQueue(interval=60.0), Recorder()
    q.put("a", [1, 2], write)
    q.put("b", [3], write)
    assert q.take("a") == [1, 2] and q.take("a") == [] and q.take("nobody") == []
    q.flush()
    assert write.calls == [("b", [3])]


def counted_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, TrialRun, list[int]]:
    """A trial's run in a real SQLite store whose client counts the metrics of each log_batch call; the queue
    holds for 10 minutes, so no write happens before the trial's end however slow the machine."""
    monkeypatch.setattr(tracking, "_METRICS", MetricQueue(interval=600.0))
    uri = sqlite_url(tmp_path / "mlflow.db")
    tracker = Tracker(uri, "quickstart", tmp_path / "mlartifacts")
    parent = tracker.parent_run("quickstart", {"n_trials": 1})
    trial = tracker.start_trial(parent, 0, {"lr": 0.01}, {"lr": 0.01})
    calls: list[int] = []
    real = trial.client.log_batch

    def counted(run_id: str, metrics: object = (), params: object = (), tags: object = ()) -> None:
        calls.append(len(list(metrics)))  # type: ignore[call-overload]
        real(run_id, metrics=metrics, params=params, tags=tags)  # type: ignore[arg-type]

    monkeypatch.setattr(trial.client, "log_batch", counted)
    return uri, trial, calls


def test_a_trial_s_epochs_reach_the_store_with_its_final_state_in_one_call(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    uri, trial, calls = counted_trial(tmp_path, monkeypatch)
    for epoch in range(12):
        trial.log_epoch(epoch, {"val_accuracy": epoch / 100, "train_loss": 1 - epoch / 100})
    trial.finish("COMPLETE", {"hpo.reason": "completed"}, {"epochs_run": 12.0})
    assert calls == [24 + 1]  # the 12 epochs x 2 metrics and the final metric, with the tags
    history = MlflowClient(tracking_uri=uri).get_metric_history(trial.run_id, "val_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(e, e / 100) for e in range(12)]
    run = MlflowClient(tracking_uri=uri).get_run(trial.run_id)
    assert run.data.metrics["train_loss"] == pytest.approx(0.89)  # the latest step's value
    assert run.data.metrics["epochs_run"] == 12.0 and run.data.tags["optuna.state"] == "COMPLETE"
    assert run.info.status == "FINISHED"


def test_a_trial_run_s_curves_are_what_the_store_holds_resumed_and_retrained_epochs_included(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trial's end draws its curves and diagnoses its fit from ``TrialRun.curves``, not from the store."""
    uri, trial, _ = counted_trial(tmp_path, monkeypatch)
    for epoch in range(3):  # a retry copies the resumed history into its run ...
        trial.log_epoch(epoch, {"val_accuracy": epoch / 10, "train_loss": 1.0 - epoch / 10})
    time.sleep(0.005)  # the store tells a step's values apart by their millisecond timestamps
    trial.log_epoch(2, {"val_accuracy": 0.25, "train_loss": 0.75})  # ... and may train its last epoch again
    trial.log_epoch(3, {"val_accuracy": 0.3})  # an epoch without one of the keys
    trial.finish("COMPLETE", {"hpo.reason": "completed"}, {"epochs_run": 4.0})
    keys = ["val_accuracy", "train_loss", "val_loss"]
    curves = trial.curves(keys)
    assert curves == {"val_accuracy": [0.0, 0.1, 0.25, 0.3], "train_loss": [1.0, 0.9, 0.75], "val_loss": []}
    assert curves == metric_histories(Tracker(uri, "quickstart", tmp_path / "mlartifacts"), trial.run_id, keys)


def test_more_queued_epochs_than_one_call_takes_go_in_calls_of_mlflow_s_limit(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    uri, trial, calls = counted_trial(tmp_path, monkeypatch)
    for epoch in range(600):
        trial.log_epoch(epoch, {"val_accuracy": epoch / 1000, "train_loss": 1.0})
    trial.finish("PRUNED", {"hpo.reason": "pruned"})
    assert calls == [1000, 200, 0]  # the 1,200 epoch metrics in calls of at most 1,000, then the tags alone
    history = MlflowClient(tracking_uri=uri).get_metric_history(trial.run_id, "val_accuracy")
    assert len(history) == 600 and max(m.step for m in history) == 599
