"""A new SQLite tracking store is a copy of an empty one kept in the user's cache (search/tracking.py
``empty_store``): it must be the store MLflow would have made, and a store must be made whatever the cache."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from search.stores import sqlite_url
from search.tracking import Tracker, copy_empty_store, empty_store

# Rows a store holds that differ between two stores made at different moments or places, not in kind.
VARYING = {"experiments": {"creation_time", "last_update_time", "artifact_location"},
           "runs": {"run_uuid", "start_time", "end_time", "artifact_uri"},
           "tags": {"run_uuid"}, "params": {"run_uuid"}, "metrics": {"run_uuid", "timestamp"},
           "latest_metrics": {"run_uuid", "timestamp"}}
RUN_ID_TAGS = {"mlflow.parentRunId"}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("HPO_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "hpo"


def contents(db: Path) -> dict[str, object]:
    """The schema (every table, index and trigger; the clauses of a CREATE in any order: MLflow's migrations
    write a table's constraints in an order that varies from one store to the next) and every row, less the
    columns in VARYING and the values of tags that hold a run id."""
    with sqlite3.connect(db) as conn:
        schema = sorted((kind, name, sorted((sql or "").split(", \n")))
                        for kind, name, sql in conn.execute("SELECT type, name, sql FROM sqlite_master"))
        rows = {}
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            cursor = conn.execute(f'SELECT * FROM "{table}"')
            names = [c[0] for c in cursor.description]
            keep = [i for i, n in enumerate(names) if n not in VARYING.get(table, set())]
            rows[table] = sorted(repr([row[i] for i in keep]) for row in cursor.fetchall()
                                 if not (table == "tags" and row[0] in RUN_ID_TAGS))
    return {"schema": schema, "rows": rows}


def used(uri: str, root: Path) -> None:
    """What `hpo run` does to a store: the study's experiment, its parent run with params, a trial's metrics."""
    tracker = Tracker(uri, "quickstart", root / "mlartifacts")
    parent = tracker.parent_run("quickstart", {"n_trials": 3, "metric": "val_accuracy"})
    trial = tracker.start_trial(parent, 0, {"lr": 0.01}, {"lr": 0.01, "epochs": 2})
    trial.log_epoch(1, {"val_accuracy": 0.5})
    trial.finish("COMPLETE", {"hpo.reason": "completed"}, {"val_accuracy": 0.5})


def test_a_copied_store_is_the_store_mlflow_makes(cache: Path, tmp_path: Path) -> None:
    made = tmp_path / "made" / "mlflow.db"
    made.parent.mkdir()
    MlflowClient(tracking_uri=sqlite_url(made)).search_experiments()  # MLflow's own way: its migrations
    used(sqlite_url(made), made.parent)
    copied = tmp_path / "copied" / "mlflow.db"
    used(sqlite_url(copied), copied.parent)
    assert [p.name for p in cache.iterdir()] == [empty_store().name]  # the copy came from the cache
    assert contents(copied) == contents(made)
    client = MlflowClient(tracking_uri=sqlite_url(copied))
    assert client.get_experiment("0").name == "Default"  # MLflow added it on opening the copy, as in its own
    assert client.get_experiment_by_name("quickstart").experiment_id == "1"


def test_every_new_store_is_a_copy_of_the_one_cached_store(cache: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        used(sqlite_url(tmp_path / name / "mlflow.db"), tmp_path / name)
    assert len(list(cache.iterdir())) == 1
    for name in ("a", "b"):  # each store holds its own runs only
        runs = MlflowClient(tracking_uri=sqlite_url(tmp_path / name / "mlflow.db")).search_runs(["1"])
        assert sorted(r.info.run_name for r in runs) == ["quickstart", "trial-0"]
    with sqlite3.connect(empty_store()) as conn:  # the cached store stays empty
        assert conn.execute("SELECT count(*) FROM experiments").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (0,)


def test_an_existing_store_is_never_replaced(cache: Path, tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    used(sqlite_url(db), tmp_path)
    before = contents(db)
    copy_empty_store(db)
    assert contents(db) == before
    assert not list(tmp_path.glob(".mlflow.db.*"))  # no partial copy left behind


def test_a_store_is_made_without_a_usable_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.delenv("HPO_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    db = tmp_path / "run" / "mlflow.db"
    used(sqlite_url(db), db.parent)  # MLflow made it the slow way
    runs = MlflowClient(tracking_uri=sqlite_url(db)).search_runs(["1"])
    assert sorted(r.info.run_name for r in runs) == ["quickstart", "trial-0"]
    assert not list(db.parent.glob(".mlflow.db.*"))


def test_the_default_experiment_is_made_where_the_copy_is_opened(
        cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow places its Default experiment's artifacts relative to the working directory: a copy must not keep
    the place of the process that made the cached store."""
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "first")
    empty_store()
    monkeypatch.chdir(tmp_path / "second")
    made, copied = tmp_path / "made.db", tmp_path / "copied.db"
    MlflowClient(tracking_uri=sqlite_url(made)).search_experiments()
    used(sqlite_url(copied), tmp_path)
    where = [MlflowClient(tracking_uri=sqlite_url(db)).get_experiment("0").artifact_location for db in (made, copied)]
    assert where[0] == where[1] and "second" in where[1]
