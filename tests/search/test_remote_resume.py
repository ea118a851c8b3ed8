"""Resume on another machine without a shared filesystem: the resume checkpoint travels through the MLflow
artifact store. Two --run-dir folders stand for two machines; a real `mlflow server` with proxied artifacts."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.mlflow_server import mlflow_server
from tests.search.test_recovery import UNENDING
from tests.search.workers_helpers import QUICKSTART, child_runs, hpo, hpo_cmd

EPOCHS = 30
LONG = ["--set", f"study.max_epochs={EPOCHS}", "--set", "pruner={name='none'}",
        "--set", "early_stopping.enabled=false",
        "--set", "objective.widths=[8,16]", "--set", "study.checkpoint_every_seconds=0",
        "--set", "study.heartbeat_interval=1", "--set", "study.grace_period=3", "--trials", "2", "--quiet"]


def _pointer(client: MlflowClient, run_id: str, dest: Path) -> dict | None:
    try:
        return json.loads(Path(client.download_artifacts(run_id, "resume/latest.json", str(dest))).read_text())
    except Exception:  # noqa: BLE001 - not uploaded yet
        return None


def _wait_for_upload(proc: subprocess.Popen, storage: str, client: MlflowClient, tmp: Path) -> optuna.Study:
    """Until trial 0's run holds a resume checkpoint of epoch 3 or later in the artifact store. (Not "until it has
    reported 4 epochs": the upload of an epoch's checkpoint lands after its report, so a kill right after the
    4th report can leave the pointer at epoch 2.)"""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            study = optuna.load_study(study_name="remote", storage=storage)
            trials = study.get_trials(deepcopy=False)
        except Exception:  # noqa: BLE001 - study not created yet
            trials = []
        run_id = trials[0].user_attrs.get("mlflow_run_id") if trials else None
        pointer = _pointer(client, run_id, tmp / "peek") if run_id else None
        if pointer is not None and pointer["epoch"] >= 3 and trials[0].state == TrialState.RUNNING:
            return study
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no resume checkpoint uploaded: {proc.stderr.read() if proc.stderr else ''}")


@pytest.mark.slow
def test_a_trial_killed_on_one_machine_resumes_on_another_from_the_artifact_store(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'shared' / 'optuna.db'}"
    (tmp_path / "shared").mkdir()
    with mlflow_server(tmp_path / "mlflow") as uri:
        client = MlflowClient(uri)
        common = ["--storage", storage, "--tracking-uri", uri, *LONG]
        # machine A's trials cannot end before the kill (its 30 epochs once left a few seconds after the wait)
        machine_a = subprocess.Popen(hpo_cmd("worker", str(QUICKSTART), "--set", "study.name='remote'", *common,
                                             "--set", f"study.max_epochs={UNENDING}",
                                             "--run-dir", str(tmp_path / "machine-a")),
                                     cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        study = _wait_for_upload(machine_a, storage, client, tmp_path)
        machine_a.send_signal(signal.SIGKILL)
        machine_a.wait()
        first = study.get_trials()[0]
        run_a = first.user_attrs["mlflow_run_id"]
        # Only the heartbeat may tell the other machine that A is gone (A's pid means nothing there).
        study._storage.set_trial_user_attr(first._trial_id, "host", "machine-a")
        time.sleep(4)
        pointer = _pointer(client, run_a, tmp_path / "after-kill")  # read now: an upload A sent may land late
        assert pointer is not None and pointer["epoch"] >= 3
        # Machine B ends the resumed trial 3 epochs after the one it resumes at, and after the last epoch A reported:
        # A's uploads can lag its reports by several epochs under load, and the retry inherits every reported step.
        epochs = max(pointer["epoch"], max(first.intermediate_values)) + 4
        machine_b = hpo("worker", str(QUICKSTART), "--set", "study.name='remote'", *common,
                        "--set", f"study.max_epochs={epochs}", "--run-dir", str(tmp_path / "machine-b"),
                        cwd=tmp_path)
        assert machine_b.returncode == 0, machine_b.stderr

    assert "resumes trial 0 at epoch" in machine_b.stderr and "artifact store" in machine_b.stderr
    study = optuna.load_study(study_name="remote", storage=storage)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs.get("reason") != "worker_died"  # the heartbeat
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1
    retry = retry[0]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[0].params
    assert retry.user_attrs["resumed_from_trial"] == 0
    assert retry.user_attrs["resumed_at_epoch"] == pointer["epoch"] + 1  # the epoch after the uploaded one
    assert sorted(retry.intermediate_values) == list(range(epochs))  # every epoch reported once
    assert retry.user_attrs["epochs_run"] == epochs
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 2
    assert not (tmp_path / "machine-b" / "remote" / "checkpoints" / "trial-0").exists()  # nothing local to read
    assert not (tmp_path / "machine-b" / "remote" / "checkpoints" / f"trial-{retry.number}" / "last.pt").exists()

    with mlflow_server(tmp_path / "mlflow") as uri:  # the same stores, served again, to read them
        client = MlflowClient(uri)
        runs = {r.info.run_id: r for r in child_runs(client, "remote")}
        resumed = runs[retry.user_attrs["mlflow_run_id"]]
        assert resumed.data.tags["hpo.resumed_from_checkpoint"] == "artifact store"
        assert resumed.data.tags["hpo.resumed_from_run"] == run_a
        steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "val_accuracy")]
        assert sorted(steps) == list(range(epochs))  # the resumed history copied once, then the new epochs
        assert runs[run_a].info.status == "KILLED" and "RUNNING" not in {r.info.status for r in runs.values()}
        # The trial ended COMPLETE: no resume checkpoint is left, neither its own nor the failed attempt's.
        assert client.list_artifacts(run_a, "resume") == []
        assert client.list_artifacts(resumed.info.run_id, "resume") == []
        assert [a.path for a in client.list_artifacts(resumed.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]
