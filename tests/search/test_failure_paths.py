"""Failed trials through `hpo run` on digits: out of memory raised from inside training (each form torch raises,
and the memory given back), max_failures, a diverging loss, and the trial timeout on and off the main thread."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from optuna.trial import TrialState

from search.config import load_settings
from search.stores import run_paths
from search.study import RunResult, run_study
from search.tracking import Tracker
from tests.search.failure_helpers import faulty_study, model_log
from tests.search.workers_helpers import QUICKSTART, child_runs, hpo, load

pytestmark = pytest.mark.slow

SMALL = ["--set", "objective.widths=[8,16]", "--set", "pruner={name='none'}", "--set", "early_stopping.enabled=false"]


def test_out_of_memory_fails_the_trial_frees_its_memory_and_max_failures_in_a_row_stop_the_study(
        tmp_path: Path) -> None:
    # n_trials = 2, max_failures = 3. Trial 1 trains; every other trial runs out of memory in its first batch, in
    # each form torch raises. Failed trials do not count toward the budget, so the study goes on past 2 trials, and a
    # success resets the count: it stops after trial 4, the third failure in a row (the fourth in all).
    plan = ["cuda_oom", "ok", "oom_message", "cpu_oom", "cuda_oom"]
    study_file = faulty_study(tmp_path, "oom", plan, n_trials=2, max_failures=3)
    out = hpo("run", str(study_file), cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "stopped after 3 failed trials in a row; the last one failed with out_of_memory. Fix" in out.stderr
    study, client = load(tmp_path / "runs" / "oom", "oom")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE] + [TrialState.FAIL] * 3
    failed = [t for t in trials if t.state == TrialState.FAIL]
    for t in failed:
        assert t.user_attrs["reason"] == "out_of_memory"
        assert t.user_attrs["oom_batch_size"] == t.params["batch_size"]
        assert t.intermediate_values == {} and t.user_attrs["epochs_run"] == 0
    assert trials[1].user_attrs["reason"] == "completed" and sorted(trials[1].intermediate_values) == [0, 1]
    runs = {r.info.run_id: r for r in child_runs(client, "oom")}
    for t in trials:
        run = runs[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == ("FINISHED" if t.state == TrialState.COMPLETE else "FAILED")
        assert run.data.tags["hpo.reason"] == t.user_attrs["reason"]
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "FAILED"
    # Every model that trained saw the previous failed model's memory already given back.
    assert model_log(tmp_path) == [{"mode": mode, "previous_failure_held": False} for mode in plan]


@pytest.fixture(scope="module")
def diverged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A study whose every trial diverges: plain SGD with a learning rate of 1e15 sends the weights past float32's
    range in the first steps, so the first epoch's loss is inf or NaN whatever the sampled values."""
    tmp = tmp_path_factory.mktemp("nan")
    out = hpo("run", str(QUICKSTART), "--set", "study.name='nan'", "--trials", "2", "--set", "study.max_epochs=3",
              "--set", "objective.optimizer='sgd'", "--set", "space.lr={type='float',low=1e15,high=1e16,log=true}",
              *SMALL, cwd=tmp)
    assert out.returncode == 0, out.stderr  # pruned trials are finished trials: the budget is met
    return tmp


def test_a_diverging_loss_prunes_the_trial_at_its_first_epoch(diverged: Path) -> None:
    study, client = load(diverged / "runs" / "nan", "nan")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    for t in trials:
        assert t.user_attrs["reason"] == "nan_loss"
        assert t.user_attrs["pruned_epoch"] == 0 and t.user_attrs["epochs_run"] == 1
        assert t.user_attrs["max_epochs"] == 3  # the budget it trained under (study.max_epochs of this run)
        assert t.intermediate_values == {}  # a non-finite value is never reported to the pruner
    runs = child_runs(client, "nan")
    assert {(r.info.status, r.data.tags["hpo.reason"]) for r in runs} == {("FINISHED", "nan_loss")}
    assert not list((diverged / "runs" / "nan" / "checkpoints").glob("*/best.pt"))


def test_best_without_a_completed_trial_says_so_and_exits_1(diverged: Path) -> None:
    out = hpo("best", "--study", "nan", cwd=diverged)
    assert out.returncode == 1
    assert "no completed trial" in out.stderr and "2 pruned" in out.stderr and out.stdout == ""


def test_trial_timeout_through_hpo_run_fails_each_trial_with_its_reason(tmp_path: Path) -> None:
    # A timeout of 1 ms is over before the first epoch ends: the alarm (or, failing that, the check at the epoch's
    # end) fails every trial, so max_failures = 2 stops the study.
    out = hpo("run", str(QUICKSTART), "--set", "study.name='to'", "--trials", "3", "--set", "study.max_epochs=2",
              "--set", "study.trial_timeout=0.001", "--set", "study.max_failures=2", *SMALL, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "the last one failed with trial_timeout. Fix" in out.stderr
    study, client = load(tmp_path / "runs" / "to", "to")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert {t.user_attrs["reason"] for t in trials} == {"trial_timeout"}
    assert all(t.intermediate_values == {} for t in trials)
    runs = child_runs(client, "to")
    assert {(r.info.status, r.data.tags["hpo.reason"]) for r in runs} == {("FAILED", "trial_timeout")}


def test_trial_timeout_off_the_main_thread_fails_the_trial_at_the_end_of_an_epoch(tmp_path: Path) -> None:
    # No signal reaches a thread, so there is no alarm; the check at the end of epoch 0 fails the trial.
    settings = load_settings(QUICKSTART, ["study.name='thread'", "study.max_epochs=3", "study.trial_timeout=0.001",
                                          "study.max_failures=1", "objective.widths=[8,16]", "pruner={name='none'}"])
    paths = run_paths(str(tmp_path / "runs"), "thread")
    results: list[RunResult] = []
    worker = threading.Thread(target=lambda: results.append(run_study(settings, paths, n_trials=2)))
    worker.start()
    worker.join()
    assert results, "run_study raised in its thread"
    result = results[0]
    assert result.stopped_by_failures == "trial_timeout"
    [trial] = result.study.get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs["reason"] == "trial_timeout"
    assert trial.user_attrs["epochs_run"] == 1 and trial.intermediate_values == {}
    client = Tracker(paths.tracking_uri, "thread", paths.artifacts).client
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["hpo.reason"] == "trial_timeout"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [0]  # epoch 0 was logged
