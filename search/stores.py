"""Where a study's results live and how its stores are opened: the one module that reads storage URLs.

Run paths (``RUN_DIR/NAME/optuna.db``, ``mlflow.db``, ``mlartifacts/``, ``checkpoints/``), the default
store URLs, ``sqlite:///`` paths, password redaction, and opening an Optuna storage: SQLite in WAL mode with
a long busy timeout, PostgreSQL's table creation under an advisory lock, a lost schema race retried, a
read-only storage for viewers, and one clear error for every way a URL can fail.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from search.errors import HpoError, SettingsError, StorageError, first_line
from search.optuna_adapter import RetryingRDBStorage
from search.storage_retry import POSTGRES_TIMEOUTS, Retrier
from search.workers import advisory_lock

SQLITE = "sqlite:///"
GRPC = "grpc://"
SQLITE_READ_TIMEOUT_S = 60
# A worker's connections to a database server: 1 kept open (its trials are one thread) and up to 2 more at busy
# moments (the heartbeat thread's beat), closed again after use. SQLAlchemy's default (5 kept, 10 more) let 64
# light workers hold over 100 connections, PostgreSQL's default limit (BENCHMARKS.md section 10).
WORKER_POOL = (1, 2)
# A storage session left idle inside a transaction this long is ended by PostgreSQL, releasing its locks: a
# worker cut off mid-write (its trial's row lock held, see RetryingRDBStorage) then delays the worker that takes
# its trial over by this much, not until TCP gives up on the server's side (hours). Storage transactions last
# milliseconds; the budget lock's connection is a separate engine, without this limit.
POSTGRES_IDLE_IN_TRANSACTION_MS = 15000
PROXY_POOL = (4, 8)  # `hpo storage-proxy`: one process serving every worker's calls from its threads
_OPENED: weakref.WeakSet[optuna.storages.RDBStorage] = weakref.WeakSet()  # for close_storages


def sqlite_url(path: Path) -> str:
    return f"{SQLITE}{path}"


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL (four slashes for an absolute path), else None."""
    return Path(url.removeprefix(SQLITE)) if url.startswith(SQLITE) else None


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql", "postgres"))


@dataclass(frozen=True)
class RunPaths:
    """Where one study's results live; every command derives the same paths from the same options."""

    study_name: str
    root: Path
    storage_url: str
    tracking_uri: str

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"


def run_paths(run_dir: str | Path, study_name: str, storage: str | None = None,
              tracking_uri: str | None = None) -> RunPaths:
    root = (Path(run_dir) / study_name).resolve()
    return RunPaths(
        study_name=study_name,
        root=root,
        storage_url=storage or sqlite_url(root / "optuna.db"),
        tracking_uri=tracking_uri or sqlite_url(root / "mlflow.db"),
    )


def open_storage(url: str, heartbeat: tuple[int, int] | None = None,
                 on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
                 retry_seconds: float = 0.0, pool: tuple[int, int] = WORKER_POOL) -> optuna.storages.BaseStorage:
    """Open an Optuna storage URL: sqlite/postgresql/mysql, ``memory``, ``journal:PATH`` (a journal file), or
    ``grpc://HOST:PORT`` (an `hpo storage-proxy`, search/proxy.py; it has no heartbeats).

    RDB storages get heartbeats (``heartbeat`` = (interval, grace period) in seconds) so a trial whose
    worker died on another machine is failed and retried by ``on_stale``. SQLite files are switched to
    WAL with a long busy timeout, so parallel workers and a dashboard reading the file do not fail with
    "database is locked". A database server's calls are retried for ``retry_seconds`` on connection errors
    (search/storage_retry.py), and its connections come from a small pool, ``pool`` = (kept open, extra at
    busy moments): see ``WORKER_POOL``.
    """
    beats: dict[str, Any] = {}
    if heartbeat is not None:
        beats = {"heartbeat_interval": heartbeat[0], "grace_period": heartbeat[1],
                 "heartbeat_stale_trial_callback": on_stale}
    try:
        if url == "memory":
            return optuna.storages.InMemoryStorage()
        if url.startswith(GRPC):
            from search.proxy import open_proxy

            storage: optuna.storages.BaseStorage = open_proxy(url)
            return storage
        if url.startswith("journal:"):
            journal = Path(url.removeprefix("journal:").removeprefix("//"))
            journal.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend

            backend = JournalFileBackend(str(journal))
            return optuna.storages.JournalStorage(backend)
        path = sqlite_path(url)
        if path is not None:
            enable_wal(path)
            return _create_rdb(url, beats, {"connect_args": {"timeout": 120}})
        engine = {"pool_pre_ping": True, "pool_size": pool[0], "max_overflow": pool[1], "pool_timeout": 120,
                  **({"connect_args": postgres_connect_args()} if is_postgres(url) else {})}
        return _create_rdb(url, beats, engine, Retrier(retry_seconds, f"the Optuna storage {redact(url)}"))
    except HpoError:
        raise
    except ModuleNotFoundError as exc:
        raise StorageError(
            f"the storage URL {redact(url)!r} needs the Python driver {exc.name!r}, which is not installed. "
            "For PostgreSQL run `pip install 'psycopg[binary]'`; for MySQL `pip install pymysql` and use "
            "mysql+pymysql://..."
        ) from exc
    except Exception as exc:  # sqlalchemy errors, bad URLs
        first = first_line(exc)
        db = sqlite_path(url)
        if db is not None:
            raise sqlite_unopened(db, exc) from exc
        raise StorageError(
            f"could not open the Optuna storage {redact(url)!r}: {first}. Check that the database server is "
            "running and reachable, and that the user, password and database name in the URL are right; or "
            "leave --storage out to use the SQLite file in the run directory."
        ) from exc


def postgres_connect_args() -> dict[str, Any]:
    """libpq settings of a storage's PostgreSQL connections: ``POSTGRES_TIMEOUTS`` and the idle limit above."""
    return {**POSTGRES_TIMEOUTS, "options": f"{POSTGRES_TIMEOUTS['options']} "
                                           f"-c idle_in_transaction_session_timeout={POSTGRES_IDLE_IN_TRANSACTION_MS}"}


def _create_rdb(url: str, beats: dict[str, Any], engine: dict[str, Any],
                retrier: Retrier | None = None) -> optuna.storages.RDBStorage:
    """Open an RDB storage. Processes opening a new database together (workers, or `hpo status` while
    `hpo run` starts) would all try to create Optuna's tables (and PostgreSQL's enum types) at once and all
    but one fail; on PostgreSQL an advisory lock serialises hpo's own, and a race lost to a process that does
    not take it (or, elsewhere, to any other) is retried."""
    import sqlalchemy.exc

    def create() -> optuna.storages.RDBStorage:
        storage: optuna.storages.RDBStorage
        if retrier is not None:
            storage = RetryingRDBStorage(url, retrier, engine_kwargs=engine, **beats)
        else:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine, **beats)
        _OPENED.add(storage)
        return storage

    def create_retried() -> optuna.storages.RDBStorage:
        for attempt in range(3):
            try:
                return create()
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                pass  # PostgreSQL: a duplicate key in pg_type; lost to another creator, whose tables are there now
            except sqlalchemy.exc.OperationalError as exc:  # SQLite: "table studies already exists"
                if "already exists" not in str(exc):
                    raise
            time.sleep(0.5 * (attempt + 1))
        return create()

    if is_postgres(url):  # the lock orders hpo's processes; a lost race is retried for whatever does not take it
        with advisory_lock(url, "schema"):  # (optuna-dashboard or a script opening the new database just then)
            return create_retried()
    return create_retried()


def enable_wal(path: Path, seconds: float = 120) -> None:
    """WAL lets readers (the dashboard, `hpo status`) and one writer work at once; it persists in the file.

    Switching the journal mode does not wait on SQLite's busy timeout: processes opening a new file together
    (`hpo run --workers N`, or a viewer while it starts) got an immediate "database is locked" (4 processes on a
    fresh file: 7 of 60 failed). A file already in WAL is left alone, and a lost race is retried until ``seconds``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + seconds
    while True:
        try:
            with contextlib.closing(sqlite3.connect(path, timeout=seconds)) as conn:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def redact(url: str) -> str:
    """The URL with its password replaced by ***, for messages and logs."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


def open_for_reading(url: str) -> optuna.storages.BaseStorage:
    """A storage for viewers (dashboard, status): no table creation or migration check; SQLite reads wait for
    the writer; a missing SQLite file is "no results yet", not an empty new database."""
    path = sqlite_path(url)
    if path is None:
        return open_storage(url)
    if not path.is_file():
        raise SettingsError(f"no results here yet: {path} does not exist. Run `hpo run FILE` first, or pass "
                            "the --run-dir/--storage it used.")
    storage = optuna.storages.RDBStorage(url, skip_compatibility_check=True, skip_table_creation=True,
                                         engine_kwargs={"connect_args": {"timeout": SQLITE_READ_TIMEOUT_S}})
    _OPENED.add(storage)
    try:
        storage.get_all_studies()  # connects now: a file that cannot be opened is said here, not mid-request
    except Exception as exc:
        raise sqlite_unopened(path, exc) from exc
    return storage


def sqlite_unopened(db: Path, exc: BaseException) -> StorageError:
    """An SQLite file that exists but cannot be opened, most often a read-only folder: WAL mode needs its side
    files even to read."""
    first = first_line(exc)
    return StorageError(
        f"could not open the SQLite file {db}: {first}. SQLite (in WAL mode, as hpo uses it) writes {db.name}-wal "
        f"and {db.name}-shm beside the file even to read it, so its folder must be writable (not a read-only disk "
        "or mount); copy the run directory somewhere writable, or check the path."
    )


def close_storages() -> None:
    """Close the connections of every RDB storage this process opened; SQLite folds its WAL file back into the
    database file on the last close. For the end of the `hpo` process, which leaves its objects to the exit
    without a last garbage collection (search/cli.py ``exit_now``), so nothing else would close them. Never raises:
    the command's own outcome stands."""
    for storage in list(_OPENED):
        with contextlib.suppress(Exception):  # e.g. a database server already gone: nothing left to close
            storage.remove_session()
            storage.engine.dispose()
