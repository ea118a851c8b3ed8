"""The study's MLflow experiment (search/tracking.py ``Tracker``): one study per experiment, so that two studies of
one name sharing a tracking store (a team's server) cannot mix their trial runs; and an experiment or parent run
deleted in the MLflow UI is a one-paragraph error that says how to restore it, not MLflow's traceback."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from search import records
from search.errors import TrackingError
from search.tracking import Tracker
from tests.search.test_run_dir import QUICKSTART, SMALL, hpo, one_paragraph

pytestmark = pytest.mark.usefixtures("quiet_optuna")


def trials(db: Path, name: str = "quickstart") -> list[str]:
    return [t.state.name for t in optuna.load_study(study_name=name, storage=f"sqlite:///{db}").get_trials()]


def test_a_second_study_of_the_same_name_on_a_shared_tracking_store_is_refused_before_it_writes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'shared-mlflow.db'}"  # one tracking store, as a team's server would be
    code, err = hpo(capsys, "run", QUICKSTART, "--run-dir", tmp_path / "alice", "--tracking-uri", uri,
                    "--trials", "1", *SMALL)
    assert code == 0, err
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quickstart")
    alice = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp_path / 'alice/quickstart/optuna.db'}")
    assert experiment.tags[records.STUDY_ID] == alice.user_attrs[records.STUDY_ID]
    runs_before = sorted(r.info.run_id for r in client.search_runs([experiment.experiment_id]))
    assert len(runs_before) == 2  # the study's parent run and its trial's run

    # Bob's study has the same name, its own storage and run directory, the same tracking store.
    code, err = hpo(capsys, "run", QUICKSTART, "--run-dir", tmp_path / "bob", "--tracking-uri", uri,
                    "--trials", "1", *SMALL)
    text = one_paragraph(err)
    assert code == 2
    assert f"the MLflow experiment 'quickstart' in {uri} holds the runs of another study named 'quickstart'" in text
    assert f"study id {alice.user_attrs[records.STUDY_ID]}; this one is new" in text and "--study-name NEW" in text
    assert sorted(r.info.run_id for r in client.search_runs([experiment.experiment_id])) == runs_before
    assert optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'bob/quickstart/optuna.db'}") == []

    # With its own name it runs beside Alice's, in an experiment of its own; Alice's study resumes as before.
    code, err = hpo(capsys, "run", QUICKSTART, "--run-dir", tmp_path / "bob", "--tracking-uri", uri,
                    "--study-name", "quickstart-bob", "--trials", "1", *SMALL)
    assert code == 0, err
    code, err = hpo(capsys, "run", QUICKSTART, "--run-dir", tmp_path / "alice", "--tracking-uri", uri,
                    "--trials", "2", *SMALL)
    assert code == 0, err
    assert trials(tmp_path / "alice/quickstart/optuna.db") == ["COMPLETE", "COMPLETE"]
    assert len(client.search_runs([experiment.experiment_id])) == 3


def test_claiming_an_experiment_adopts_an_untagged_one_and_the_last_of_two_claims_wins(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("s")  # made before experiments were tagged, or by hand
    first, second = Tracker(uri, "s"), Tracker(uri, "s")
    first.check_owner(lambda: "a")  # untagged: anyone may use it
    first.claim("a")
    first.claim("a")  # its own again: fine
    assert MlflowClient(uri).get_experiment_by_name("s").tags[records.STUDY_ID] == "a"
    with pytest.raises(TrackingError, match="holds the runs of another study named 's' \\(study id a; this one is "
                                            "id b"):
        second.claim("b")
    with pytest.raises(TrackingError, match="this one is new"):
        second.check_owner(lambda: None)  # a new study, or one in memory


def one_trial(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> tuple[Path, str]:
    """A quickstart study of one trial in tmp_path/runs: its folder and tracking URI."""
    code, err = hpo(capsys, "run", QUICKSTART, "--run-dir", tmp_path / "runs", "--trials", "1", *SMALL)
    assert code == 0, err
    root = tmp_path / "runs" / "quickstart"
    return root, f"sqlite:///{root / 'mlflow.db'}"


def test_an_experiment_deleted_in_mlflow_is_a_clear_error_and_runs_again_once_restored(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root, uri = one_trial(capsys, tmp_path)
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("quickstart").experiment_id
    client.delete_experiment(experiment_id)  # what the MLflow UI's delete does

    code, err = hpo(capsys, "run", QUICKSTART, "--run-dir", tmp_path / "runs", "--trials", "2", *SMALL)
    text = one_paragraph(err)
    assert code == 2
    assert f"the MLflow experiment 'quickstart' in {uri} was deleted (it is in MLflow's trash, id {experiment_id})" \
        in text
    assert f"MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {experiment_id}" in text
    assert trials(root / "optuna.db") == ["COMPLETE"]  # nothing was started
    code, err = hpo(capsys, "best", "--study", "quickstart", "--run-dir", tmp_path / "runs")  # reading still works
    assert code == 0, err

    client.restore_experiment(experiment_id)
    code, err = hpo(capsys, "run", QUICKSTART, "--run-dir", tmp_path / "runs", "--trials", "2", *SMALL)
    assert code == 0, err
    assert trials(root / "optuna.db") == ["COMPLETE", "COMPLETE"]


def test_a_parent_run_deleted_in_mlflow_is_a_clear_error_and_runs_again_once_restored(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root, uri = one_trial(capsys, tmp_path)
    parent = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{root / 'optuna.db'}").user_attrs[
        records.PARENT_RUN_ID]
    client = MlflowClient(uri)
    client.delete_run(parent)

    code, err = hpo(capsys, "run", QUICKSTART, "--run-dir", tmp_path / "runs", "--trials", "2", *SMALL)
    text = one_paragraph(err)
    assert code == 2
    assert f"the MLflow run of study 'quickstart' (run {parent}, the parent of its trials' runs) was deleted" in text
    assert f"MLFLOW_TRACKING_URI={uri} mlflow runs restore --run-id {parent}" in text
    assert trials(root / "optuna.db") == ["COMPLETE"]

    client.restore_run(parent)
    code, err = hpo(capsys, "run", QUICKSTART, "--run-dir", tmp_path / "runs", "--trials", "2", *SMALL)
    assert code == 0, err
    assert trials(root / "optuna.db") == ["COMPLETE", "COMPLETE"]
    assert client.get_run(parent).info.lifecycle_stage == "active"


def test_workers_starting_together_on_a_new_study_are_not_refused_as_another_study(tmp_path: Path) -> None:
    """Workers started together (`hpo run --workers N`, or several `hpo worker`): one gives the new study its id and
    tags the experiment while another is between opening the storage and checking the experiment. The check
    reads the study's id after the tag (the id is set first), so it finds the same study."""
    from search.run_dir import ensure_id, stored_id
    from search.stores import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    read_early = stored_id(storage, "s")  # what the second worker read when it opened the storage
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first, second = Tracker(uri, "s"), Tracker(uri, "s")
    first.claim(ensure_id(study))  # the first worker, under the budget lock
    assert read_early is None
    second.check_owner(lambda: stored_id(storage, "s"))  # read now: the same study
    with pytest.raises(TrackingError, match="this one is new"):
        second.check_owner(lambda: read_early)  # an id read before the tag would refuse its own study


def test_a_later_run_with_other_settings_says_so_in_tags_on_the_parent_run(tmp_path: Path) -> None:
    """MLflow params cannot change: the parent run keeps the first run's, and ``hpo.latest.KEY`` tags hold what
    the latest run used where it differs; they go again once it matches, and a key new to the run is a param."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "study", tmp_path / "mlartifacts")
    parent = tracker.parent_run("study", {"n_trials": 12, "max_epochs": 20})

    assert tracker.parent_run("study", {"n_trials": 30, "max_epochs": 20, "pruner": "median"}, parent) == parent
    data = MlflowClient(uri).get_run(parent).data
    assert data.params == {"n_trials": "12", "max_epochs": "20", "pruner": "median"}
    assert {k: v for k, v in data.tags.items() if k.startswith("hpo.latest.")} == {"hpo.latest.n_trials": "30"}

    tracker.parent_run("study", {"n_trials": 12, "max_epochs": 5, "pruner": "median"}, parent)
    data = MlflowClient(uri).get_run(parent).data
    assert data.params == {"n_trials": "12", "max_epochs": "20", "pruner": "median"}
    assert {k: v for k, v in data.tags.items() if k.startswith("hpo.latest.")} == {"hpo.latest.max_epochs": "5"}
