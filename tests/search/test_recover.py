"""`hpo recover` on a journal storage (no heartbeats) with a real `hpo run` on digits: a trial whose worker is alive
is left alone whatever its age, a dead worker's trial only once it is older than --older-than; then it is failed,
re-enqueued with its params and its MLflow run ended KILLED."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from search.cli import main
from search.stores import open_storage
from tests.search.failure_helpers import faulty_study, wait_for
from tests.search.workers_helpers import hpo_cmd

pytestmark = pytest.mark.slow


def test_recover_leaves_a_live_workers_trial_alone_and_respects_older_than(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    journal = f"journal:{tmp_path / 'journal.log'}"
    study_file = faulty_study(tmp_path, "jr", ["hold"], n_trials=1, max_epochs=3, at_epoch=1)  # holds at epoch 1
    proc = subprocess.Popen(hpo_cmd("run", str(study_file), "--storage", journal, "--quiet"), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(proc, tmp_path / "journal.log", "jr", storage=journal,
             ready=lambda trials: bool(trials) and len(trials[0].intermediate_values) == 1)
    recover = ["recover", "--study", "jr", "--storage", journal, "--run-dir", str(tmp_path / "runs")]

    def states() -> list[TrialState]:
        return [t.state for t in optuna.load_study(study_name="jr", storage=open_storage(journal)).get_trials()]

    assert main([*recover, "--older-than", "0"]) == 0  # old enough, but its worker is alive
    assert "no RUNNING trial older than 0 s whose worker is gone" in capsys.readouterr().out
    assert states() == [TrialState.RUNNING]

    proc.send_signal(signal.SIGKILL)
    proc.wait()  # reaped: its pid is gone
    assert main([*recover, "--older-than", "3600"]) == 0  # its worker is gone, but the trial started just now
    assert "no RUNNING trial older than 3600 s" in capsys.readouterr().out
    assert states() == [TrialState.RUNNING]

    assert main([*recover, "--older-than", "0"]) == 0
    assert "failed and re-enqueued trials [0]" in capsys.readouterr().out
    study = optuna.load_study(study_name="jr", storage=open_storage(journal))
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL and first.user_attrs["reason"] == "stale_recovered"
    assert retry.state == TrialState.WAITING and retry.params == first.params
    assert retry.intermediate_values == first.intermediate_values == {0: first.intermediate_values[0]}
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'jr' / 'mlflow.db'}")
    assert client.get_run(first.user_attrs["mlflow_run_id"]).info.status == "KILLED"
