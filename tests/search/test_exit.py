"""The `hpo` process skips Python's teardown at exit (search/cli.py ``exit_now``, which closes the storages
first): it must still leave whole stores behind, each one file that can be copied alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.finished_study import QUICKSTART, hpo

pytestmark = pytest.mark.slow


def test_a_finished_run_leaves_each_store_whole_in_its_one_file(tmp_path: Path) -> None:
    done = hpo("run", str(QUICKSTART), "--trials", "1", "--set", "study.max_epochs=1", "--run-dir",
               str(tmp_path / "runs"), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    root = tmp_path / "runs" / "quickstart"
    assert sorted(p.name for p in root.glob("*.db*")) == ["mlflow.db", "optuna.db"]  # no -wal, -shm, -journal
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("optuna.db", "mlflow.db"):
        shutil.copyfile(root / name, copy / name)
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{copy / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]
    assert "test_accuracy" in study.user_attrs["hpo.test_metrics"]
    client = MlflowClient(tracking_uri=f"sqlite:///{copy / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert [v.version for v in client.search_model_versions("name = 'quickstart'")] == [1]
