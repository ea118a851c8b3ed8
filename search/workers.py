"""Several workers on one study: who a worker is, when its trials are orphans, and the budget lock.

Three mechanisms keep the budget exact and nothing lost when workers run in parallel or die:

* **Worker identity.** Each trial records ``host``, ``pid`` and the process start time. A RUNNING trial
  whose worker on this machine no longer exists is an orphan: it is failed and retried at once, with its
  parameters and intermediate values, by whichever worker notices first. Orphans on other machines are
  found by Optuna's heartbeat (RDB storages) after the grace period.
* **Budget lock.** A worker starts a trial only while holding a lock, after checking that
  ``finished + running < n_trials``; the lock is released once the new trial is RUNNING (and therefore
  counted). So N workers never overshoot the budget. On one machine the lock is a file next to the
  results; on PostgreSQL it is an advisory lock in the database, shared by every machine; behind an
  `hpo storage-proxy` (grpc://) it is held in the proxy (search/proxy.py).
* **Retry.** Failed-because-interrupted trials are re-enqueued with Optuna's
  ``RetryHeartbeatStaleTrialCallback`` (same params, inherited intermediate values), and the retry
  resumes from the predecessor's ``last.pt``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import socket
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock
from optuna.trial import FrozenTrial, TrialState

from search import records
from search.optuna_adapter import fail_running
from search.storage_retry import POSTGRES_TIMEOUTS, Retrier, is_connection_error

HOST = socket.gethostname()
log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _stat(pid: int) -> tuple[str, str]:
    """(state, start time in clock ticks) of a process (Linux; empty strings elsewhere or when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return "", ""


def _start_ticks(pid: int) -> str:
    """The process start time in clock ticks (Linux), so a reused pid is not taken for the old worker."""
    return _stat(pid)[1]


IDENTITY_KEYS = ("host", "pid", "pid_start")  # what identity() records; a retry leaves them out


def identity() -> dict[str, Any]:
    pid = os.getpid()
    return dict(zip(IDENTITY_KEYS, (HOST, pid, _start_ticks(pid)), strict=True))


def is_alive(pid: int, start: str = "") -> bool:
    """Whether the process runs. A zombie (killed, not yet reaped by its parent, e.g. a worker of `hpo run
    --workers` between two polls) is dead: its trial is an orphan now, not when the parent gets round to it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state, ticks = _stat(pid)
    return state != "Z" and (not start or ticks in ("", start))


def _worker_alive_here(trial: FrozenTrial) -> bool:
    """True when the trial's worker is a live process on this machine (False for other machines)."""
    attrs = trial.user_attrs
    if attrs.get("host") != HOST or "pid" not in attrs:
        return False
    return is_alive(int(attrs["pid"]), str(attrs.get("pid_start", "")))


def is_local_orphan(trial: FrozenTrial) -> bool:
    """A RUNNING trial whose worker ran on this machine and no longer exists."""
    attrs = trial.user_attrs
    on_this_host = attrs.get("host") == HOST and "pid" in attrs
    return trial.state == TrialState.RUNNING and on_this_host and not _worker_alive_here(trial)


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue a copy of ``trial`` (same params, its intermediate values) that a worker will resume.

    The copy leaves out the failed trial's worker identity (``identity()``'s keys): a worker takes the retry
    RUNNING some time before its session writes its own, and meanwhile another worker's ``claim_slot`` would
    take the dead worker's pid for the retry's and fail it again as ``worker_died``, retry after retry. It also
    leaves out the failed attempt's own record (``records.PER_ATTEMPT``: its MLflow run, reason, epochs, ...):
    a waiting retry would show them as its own, and count the failed attempt's epochs a second time."""
    dropped = (*IDENTITY_KEYS, *records.PER_ATTEMPT)
    anonymous = copy.copy(trial)  # shallow: only its user_attrs are replaced
    anonymous.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in dropped}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, anonymous)


def fail_and_retry(study: optuna.Study, trial: FrozenTrial, reason: str,
                   on_fail: Callable[[FrozenTrial], None] | None = None) -> bool:
    """Mark a RUNNING trial FAIL with a reason and enqueue its retry; False if someone else got there first."""
    if not fail_running(study, trial, reason):
        return False
    if on_fail is not None:
        on_fail(trial)
    retry(study, trial)
    return True


def recover_local_orphans(study: optuna.Study, on_fail: Callable[[FrozenTrial], None] | None = None,
                          trials: Sequence[FrozenTrial] | None = None) -> list[int]:
    """Fail and retry RUNNING trials whose worker process on this machine is gone. ``trials``: the study's trials
    as the caller just read them (``claim_slot`` counts states from the same read); else they are read here."""
    recovered = []
    candidates = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if trials is None else trials
    for trial in candidates:
        if is_local_orphan(trial) and fail_and_retry(study, trial, "worker_died", on_fail):
            recovered.append(trial.number)
    return recovered


def recover_older_than(study: optuna.Study, seconds: float,
                       on_fail: Callable[[FrozenTrial], None] | None = None) -> list[int]:
    """For storages without heartbeats (journal): fail and retry RUNNING trials started over ``seconds`` ago."""
    import datetime as dt

    now = dt.datetime.now()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start
        stale = started is not None and (now - started).total_seconds() > seconds
        if stale and not _worker_alive_here(trial) and fail_and_retry(study, trial, "stale_recovered", on_fail):
            recovered.append(trial.number)
    return recovered


class _AdvisoryLock:
    """A PostgreSQL advisory lock keyed by study name: one budget decision at a time across machines.

    Taking it is retried on connection errors like every storage call (``retrier``); a connection lost while
    it is held took the lock with it (the server drops a session's advisory locks), so releasing it then is not
    an error, but it is said: another process may have held the lock meanwhile (``lost`` is then True)."""

    def __init__(self, url: str, name: str, retrier: Retrier | None = None) -> None:
        import sqlalchemy

        self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                               connect_args=dict(POSTGRES_TIMEOUTS))
        self.name = name
        self.key = int.from_bytes(hashlib.sha256(f"hpo:{name}".encode()).digest()[:8], "big", signed=True)
        self.conn: Any = None
        self.lost = False
        self.retrier = retrier or Retrier(0, "the PostgreSQL budget lock")

    def _take(self) -> None:
        import sqlalchemy

        conn = self.engine.connect()
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        except BaseException:
            conn.close()
            raise
        self.conn = conn

    def __enter__(self) -> _AdvisoryLock:
        self.retrier.call(self._take)
        return self

    def __exit__(self, *exc: object) -> None:
        import sqlalchemy

        if self.conn is not None:
            conn, self.conn = self.conn, None
            try:
                held = conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key}).scalar()
            except Exception as error:
                if not is_connection_error(error):
                    raise
                held = False
            finally:
                conn.close()
            self.lost = not held
            if self.lost:
                log.warning(
                    "the PostgreSQL advisory lock %r was lost while this process held it (its database connection "
                    "dropped, and the server released the lock with it), so another worker may have taken it "
                    "meanwhile. For the budget lock the study can end with a trial more than n_trials; `hpo "
                    "status` shows the counts. Frequent drops point at the network or the server's connection "
                    "limits.", self.name)


class _HostThenAdvisory:
    """The advisory lock, taken only by the worker that holds this machine's file lock for the same study.

    Waiting for ``pg_advisory_lock`` holds a database connection, so N waiting workers held N connections on
    top of their pools (64 light workers: over PostgreSQL's default 100), for the budget lock and for the
    schema lock when they open the storage together. Workers on one machine queue on a local file lock
    instead, and at most one per machine waits in the database.
    """

    def __init__(self, url: str, name: str, retrier: Retrier | None = None) -> None:
        import tempfile

        key = hashlib.sha256(f"{url}\n{name}".encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / f"hpo-locks-{os.getuid()}"
        folder.mkdir(exist_ok=True)
        self.host = FileLock(str(folder / f"{key}.lock"))
        self.database = _AdvisoryLock(url, name, retrier)

    def __enter__(self) -> _HostThenAdvisory:
        self.host.acquire()
        try:
            self.database.__enter__()
        except BaseException:
            self.host.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.database.__exit__(*exc)
        finally:
            self.host.release()


def advisory_lock(url: str, name: str, per_machine: bool = True,
                  retrier: Retrier | None = None) -> AbstractContextManager[Any]:
    """A PostgreSQL advisory lock named ``name``, shared by every process that can reach the database; with
    ``per_machine``, processes on one machine queue for it on a local file first (``_HostThenAdvisory``).
    Taking it is retried on connection errors through ``retrier`` (none by default)."""
    return _HostThenAdvisory(url, name, retrier) if per_machine else _AdvisoryLock(url, name, retrier)


class BudgetLock:
    """Held from "is there budget left?" until the new trial is RUNNING; ``release()`` may come early."""

    def __init__(self, inner: AbstractContextManager[Any]) -> None:
        self.inner = inner
        self.held = False

    def acquire(self) -> None:
        self.inner.__enter__()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.inner.__exit__(None, None, None)


def budget_lock(storage_url: str, study_name: str, run_root: Path, retry_seconds: float = 0.0) -> BudgetLock:
    if storage_url.startswith(("postgresql", "postgres")):
        retrier = Retrier(retry_seconds, "the PostgreSQL budget lock")
        return BudgetLock(advisory_lock(storage_url, study_name, retrier=retrier))
    if storage_url.startswith("grpc://"):  # held in `hpo storage-proxy`, shared by every worker behind it
        from search.proxy import ProxyLock

        return BudgetLock(ProxyLock(storage_url, study_name))
    run_root.mkdir(parents=True, exist_ok=True)
    return BudgetLock(FileLock(str(run_root / f".{study_name}.budget.lock")))


def set_threads(n: int | None) -> None:
    """Give each of N CPU workers its share of the cores instead of all of them fighting for every core."""
    if n:
        import torch

        torch.set_num_threads(max(1, n))
