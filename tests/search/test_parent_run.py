"""The study's MLflow parent run says what happened: RUNNING while trials run, ended by the last worker to stop
(FINISHED, FAILED or KILLED), reopened by a resumed study; experiments open on MLflow 3's model-training view."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from search.config import load_settings
from search.stores import run_paths
from search.study import OpenStudy, end_parent, parent_lifetime
from search.tracking import EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT, Tracker

QUICKSTART = Path(__file__).resolve().parents[2] / "studies" / "quickstart.toml"


@pytest.fixture
def opened(tmp_path: Path) -> OpenStudy:
    settings = load_settings(QUICKSTART, ["study.name='parent'"])
    paths = run_paths(tmp_path / "runs", "parent")
    tracker = Tracker(paths.tracking_uri, "parent", paths.artifacts)
    study = optuna.create_study(study_name="parent", direction="maximize")
    return OpenStudy(settings, paths, study, tracker, tracker.parent_run("parent", {"n_trials": 3}), None)


def status(opened: OpenStudy) -> str:
    return opened.tracker.client.get_run(opened.parent_run_id).info.status


def test_experiment_is_tagged_for_the_model_training_view(opened: OpenStudy, tmp_path: Path) -> None:
    assert opened.tracker.client.get_experiment(opened.tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == \
        "custom_model_development" == MODEL_DEVELOPMENT
    client = MlflowClient(opened.paths.tracking_uri)  # an experiment made before hpo tagged them gets the tag
    old = client.create_experiment("older")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    Tracker(opened.paths.tracking_uri, "older").parent_run("older", {})
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT


def test_parent_stays_running_while_a_trial_runs_and_ends_after_the_last(opened: OpenStudy) -> None:
    assert status(opened) == "RUNNING"
    trial = opened.study.ask()  # another worker is in a trial
    assert end_parent(opened, "FINISHED") is False
    assert status(opened) == "RUNNING"
    opened.study.tell(trial, 0.9)  # that worker finishes and is the last one to stop
    assert end_parent(opened, "FINISHED") is True
    run = opened.tracker.client.get_run(opened.parent_run_id)
    assert run.info.status == "FINISHED" and run.info.end_time >= run.info.start_time


def test_a_resumed_study_reopens_the_same_parent_run(opened: OpenStudy) -> None:
    end_parent(opened, "FINISHED")
    again = opened.tracker.parent_run("parent", {"n_trials": 3}, known_id=opened.parent_run_id)
    assert again == opened.parent_run_id and status(opened) == "RUNNING"
    assert len(opened.tracker.client.search_runs([opened.tracker.experiment_id])) == 1


@pytest.mark.parametrize(("error", "expected"), [(KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED")])
def test_interrupt_kills_and_an_error_fails_the_parent(opened: OpenStudy, error: type, expected: str) -> None:
    with pytest.raises(error), parent_lifetime(opened, own=True):
        raise error()
    assert status(opened) == expected


def test_a_worker_that_does_not_own_the_parent_leaves_it_running(opened: OpenStudy) -> None:
    with parent_lifetime(opened, own=False) as outcome:
        outcome["status"] = "FINISHED"
    assert status(opened) == "RUNNING"  # `hpo run --workers` ends it once all its workers are done
    with parent_lifetime(opened, own=True) as outcome:
        outcome["status"] = "FAILED"  # e.g. stopped after max_failures failed trials in a row
    assert status(opened) == "FAILED"
