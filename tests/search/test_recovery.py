"""Crash recovery: kill -9, SIGTERM, stale trials on other machines, journal recovery."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from search.checkpoint import load_checkpoint
from tests.search.failure_helpers import wait_for
from tests.search.workers_helpers import QUICKSTART, child_runs, hpo, hpo_cmd, load

# Long enough trials to be interrupted mid-way: 30 epochs, no pruning, no early stopping. 12 epochs of this tiny
# CNN take 0.8-1.6 s now, so the polls that wait for epoch 4 had well under a second before the trial ended.
EPOCHS = 30
LONG = ["--set", f"study.max_epochs={EPOCHS}", "--set", "pruner={name='none'}",
        "--set", "early_stopping.enabled=false",
        "--set", "objective.widths=[8,16]", "--set", "study.checkpoint_every_seconds=0", "--trials", "2"]


# A first run that the test stops cannot end before the signal (a CI run found a first run of 300 epochs
# finished before its Ctrl-C); the rerun then stops a few epochs past the stopped trial (``rerun``). max_epochs
# is not part of a study's identity, so the rerun is the same study.
UNENDING = 100_000


def rerun_epochs(stopped: list[FrozenTrial]) -> int:
    """The rerun's max_epochs: 3 past the furthest of the ``stopped`` trials."""
    return max(len(t.intermediate_values) for t in stopped) + 3


def _start_and_wait(tmp_path: Path, name: str, epochs: int, extra: list[str] = ()) -> tuple[subprocess.Popen, int]:
    """Start `hpo run` with unending trials, wait until trial 0 runs and has reported ``epochs`` epochs, return
    (process, trial 0's pid)."""
    proc = subprocess.Popen(hpo_cmd("run", str(QUICKSTART), "--set", f"study.name='{name}'", *LONG,
                                    "--set", f"study.max_epochs={UNENDING}", *extra, "--quiet"),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def trial_0_running(trials: list[FrozenTrial]) -> bool:
        return bool(trials) and trials[0].state == TrialState.RUNNING and len(trials[0].intermediate_values) >= epochs

    trials = wait_for(proc, tmp_path / "runs" / name / "optuna.db", name, trial_0_running, seconds=180)
    return proc, trials[0].user_attrs["pid"]


def rerun(tmp_path: Path, name: str, extra: list[str] = ()) -> int:
    """The stopped study's command again, ending its trials 3 epochs past where trial 0 stopped; returns that
    max_epochs."""
    study, _ = load(tmp_path / "runs" / name, name)
    epochs = rerun_epochs(study.trials[:1])
    again = hpo("run", str(QUICKSTART), "--set", f"study.name='{name}'", *LONG, "--set", f"study.max_epochs={epochs}",
                *extra, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    return epochs


def _assert_resumed(study: optuna.Study, client, interrupted: str, epochs: int) -> None:  # noqa: ANN001
    trials = study.get_trials()
    first = trials[0]
    assert first.state == TrialState.FAIL and first.user_attrs["reason"] == interrupted
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == first.params
    done = len(first.intermediate_values)
    assert retry.user_attrs["resumed_from_trial"] == 0
    assert retry.user_attrs["resumed_at_epoch"] in (done, done - 1) and retry.user_attrs["resumed_at_epoch"] >= 3
    assert sorted(retry.intermediate_values) == list(range(epochs))  # continued, every epoch once
    assert retry.user_attrs["epochs_run"] == epochs
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 2 and not [t for t in trials if t.state == TrialState.RUNNING]
    runs = {r.info.run_id: r for r in child_runs(client, study.study_name)}
    assert "RUNNING" not in {r.info.status for r in runs.values()}
    killed = runs[first.user_attrs["mlflow_run_id"]]
    assert killed.info.status == "KILLED" and killed.data.tags["hpo.reason"] == interrupted  # MLflow says as Optuna
    resumed_run = runs[retry.user_attrs["mlflow_run_id"]]
    assert resumed_run.data.tags["hpo.resumed_from_run"] == first.user_attrs["mlflow_run_id"]
    assert resumed_run.data.tags["hpo.resumed_at_epoch"] == str(retry.user_attrs["resumed_at_epoch"])
    steps = [m.step for m in client.get_metric_history(resumed_run.info.run_id, "val_accuracy")]
    assert sorted(steps) == list(range(epochs))


@pytest.mark.slow
def test_kill_9_mid_trial_then_run_again_resumes_from_last_checkpoint(tmp_path: Path) -> None:
    proc, _ = _start_and_wait(tmp_path, "k9", epochs=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    root = tmp_path / "runs" / "k9"
    assert (root / "checkpoints" / "trial-0" / "last.pt").exists()
    epochs = rerun(tmp_path, "k9")
    study, client = load(root, "k9")
    _assert_resumed(study, client, "worker_died", epochs)
    retry = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == 0][0]
    # the FAIL trial's last.pt is kept (only COMPLETE and PRUNED remove theirs), and it is what the retry resumed from
    kept = load_checkpoint(root / "checkpoints" / "trial-0" / "last.pt", key="training")
    assert kept["trial"] == 0 and len(kept["training"]["history"]) == retry.user_attrs["resumed_at_epoch"]
    assert not (root / "checkpoints" / f"trial-{retry.number}" / "last.pt").exists()  # removed on COMPLETE


@pytest.mark.slow
def test_sigterm_fails_the_trial_kills_its_run_and_the_next_run_resumes(tmp_path: Path) -> None:
    proc, _ = _start_and_wait(tmp_path, "term", epochs=4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert b"run the same command again to resume" in err and b"Traceback" not in err
    study, client = load(tmp_path / "runs" / "term", "term")
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["reason"] == "interrupted"
    assert [t.state for t in trials[1:]] == [TrialState.WAITING]  # re-enqueued with the same params
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert client.get_run(parent).info.status == "KILLED"  # the study's run says it was interrupted
    epochs = rerun(tmp_path, "term")
    study, client = load(tmp_path / "runs" / "term", "term")
    _assert_resumed(study, client, "interrupted", epochs)
    assert study.user_attrs["mlflow_parent_run_id"] == parent  # reopened, then ended when the budget was met
    assert client.get_run(parent).info.status == "FINISHED"


@pytest.mark.slow
def test_heartbeat_fails_a_trial_whose_worker_died_on_another_machine(tmp_path: Path) -> None:
    beats = ["--set", "study.heartbeat_interval=1", "--set", "study.grace_period=3"]
    proc, _ = _start_and_wait(tmp_path, "hb", epochs=4, extra=beats)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    root = tmp_path / "runs" / "hb"
    study, _ = load(root, "hb")
    # Pretend the dead worker ran elsewhere: only the heartbeat can tell it is gone.
    study._storage.set_trial_user_attr(study.trials[0]._trial_id, "host", "another-machine")
    time.sleep(4)
    epochs = rerun(tmp_path, "hb", beats)
    study, client = load(root, "hb")
    # failed by the heartbeat check (reason stale_heartbeat, not the local-orphan path's worker_died), retried
    # from its last.pt: every epoch reported once, as after a local kill -9
    _assert_resumed(study, client, "stale_heartbeat", epochs)


def test_recover_fails_and_reenqueues_stale_trials_on_a_journal_storage(tmp_path: Path) -> None:
    journal = tmp_path / "journal.log"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.create_study(study_name="jr", storage=storage, direction="maximize")
    stale = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    stale.set_user_attr("host", "some-machine")
    stale.set_user_attr("pid", 1)
    out = hpo("recover", "--study", "jr", "--storage", f"journal:{journal}", "--older-than", "0",
              "--run-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "re-enqueued trials [0]" in out.stdout
    study = optuna.load_study(study_name="jr", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert study.trials[1].params == study.trials[0].params
    assert study.trials[0].user_attrs["reason"] == "stale_recovered"

