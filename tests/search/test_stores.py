"""Storage URLs and run paths: the one module that reads them."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import optuna
import pytest

from search.errors import SettingsError
from search.stores import (
    close_storages,
    enable_wal,
    is_postgres,
    open_for_reading,
    open_storage,
    redact,
    run_paths,
    sqlite_path,
    sqlite_url,
)
from tests.search.workers_helpers import InThread, postgres_database


def test_sqlite_urls_round_trip_and_other_schemes_have_no_path(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    assert sqlite_url(db) == f"sqlite:///{db}" and sqlite_path(sqlite_url(db)) == db  # four slashes: absolute
    assert sqlite_path("sqlite:///rel/o.db") == Path("rel/o.db")
    assert sqlite_path("postgresql://u@h/db") is None and sqlite_path("sqlite://o.db") is None
    assert is_postgres("postgresql+psycopg://u@h/db") and not is_postgres("mysql+pymysql://u@h/db")


def test_redact_hides_passwords_only() -> None:
    assert redact("postgresql://me:secret@db:5432/hpo") == "postgresql://me:***@db:5432/hpo"
    assert redact("postgresql://me@db/hpo") == "postgresql://me@db/hpo"
    assert redact("sqlite:///runs/q/optuna.db") == "sqlite:///runs/q/optuna.db"


def test_run_paths_default_to_files_in_the_run_directory(tmp_path: Path) -> None:
    paths = run_paths(tmp_path, "quick")
    root = (tmp_path / "quick").resolve()
    assert (paths.root, paths.artifacts, paths.checkpoints) == (root, root / "mlartifacts", root / "checkpoints")
    assert sqlite_path(paths.storage_url) == root / "optuna.db"
    assert sqlite_path(paths.tracking_uri) == root / "mlflow.db"
    given = run_paths(tmp_path, "quick", "postgresql://u@h/db", "http://mlflow:5000")
    assert (given.storage_url, given.tracking_uri) == ("postgresql://u@h/db", "http://mlflow:5000")


def test_sqlite_storage_is_opened_in_wal_mode_and_read_without_creating(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "o.db")
    with pytest.raises(SettingsError, match="no results here yet"):
        open_for_reading(url)
    assert not (tmp_path / "o.db").exists()  # a viewer never creates a database
    optuna.create_study(study_name="s", storage=open_storage(url))
    assert (tmp_path / "o.db-wal").exists() or (tmp_path / "o.db").read_bytes()[18:20] == b"\x02\x02"  # WAL
    assert [s.study_name for s in optuna.get_all_study_summaries(open_for_reading(url))] == ["s"]


def test_switching_to_wal_waits_for_a_writer_that_holds_the_new_file(tmp_path: Path) -> None:
    """Another process mid-write on a file not yet in WAL (`hpo run --workers 2` opening a new file together) made
    SQLite refuse the switch at once with "database is locked", past its busy timeout: one CI run."""
    db = tmp_path / "o.db"
    writer = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN IMMEDIATE")  # the write lock held, as by a worker creating Optuna's tables
    writer.execute("INSERT INTO t VALUES (1)")
    released = threading.Timer(0.5, lambda: writer.execute("COMMIT"))
    released.start()
    enable_wal(db)
    released.join()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]  # the writer's row kept
    writer.close()


def test_close_storages_leaves_each_sqlite_storage_whole_in_its_file(tmp_path: Path) -> None:
    """What `hpo` does before it exits without a last garbage collection: SQLite folds the WAL back in."""
    writer = open_storage(sqlite_url(tmp_path / "optuna.db"))
    study = optuna.create_study(study_name="s", storage=writer)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    reader = open_for_reading(sqlite_url(tmp_path / "optuna.db"))
    assert len(optuna.load_study(study_name="s", storage=reader).trials) == 2
    assert (tmp_path / "optuna.db-wal").exists()  # both still open: the trials may be in the WAL only
    close_storages()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optuna.db"]
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "optuna.db").write_bytes((tmp_path / "optuna.db").read_bytes())
    assert len(optuna.load_study(study_name="s", storage=sqlite_url(copy / "optuna.db")).trials) == 2


def test_a_new_postgresql_storage_opens_after_losing_the_table_race_to_a_program_without_the_lock() -> None:
    """hpo's processes take an advisory lock to create Optuna's tables in a new database; optuna-dashboard or a
    script opening it at the same moment does not. Here that other program has created the tables and not yet
    committed: hpo's CREATE waits for it, then fails on a duplicate key in ``pg_type`` once it commits. The lost
    race is retried, and the second try finds the tables there."""
    import sqlalchemy
    from optuna.storages._rdb import models  # the tables Optuna's RDBStorage creates

    with postgres_database() as url:
        other = sqlalchemy.create_engine(url)
        try:
            with other.connect() as conn:
                transaction = conn.begin()
                models.BaseModel.metadata.create_all(conn)  # created in the other program's open transaction
                opening = InThread(lambda: open_storage(url))
                time.sleep(2)
                assert opening.thread.is_alive(), opening.outcome  # hpo's CREATE waits on the other program's
                transaction.commit()
            opening.thread.join(60)
            assert not isinstance(opening.outcome, BaseException), opening.outcome
            study = optuna.create_study(study_name="raced", storage=opening.outcome)
            study.tell(study.ask(), 1.0)
            assert [t.value for t in optuna.load_study(study_name="raced", storage=url).trials] == [1.0]
        finally:
            close_storages()
            other.dispose()
