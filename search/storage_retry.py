"""Storage calls that ride out a database restart or a short network partition, for a bounded time.

A worker on another machine talks to PostgreSQL over the network; a database restart or a lost link must not
turn into failed trials or a crashed worker if it lasts seconds. ``RetryingRDBStorage`` (in
search/optuna_adapter.py, as it wraps private methods too) is Optuna's ``RDBStorage`` with every call made
through a ``Retrier``: retried on connection errors (and only on those: a constraint or a finished-trial
error is an answer, not an outage) for up to ``study.storage_retry_seconds``, with backoff.
After that it raises ``StorageUnavailable`` (exit 1, one paragraph); once it has given up, further calls fail
at once until one succeeds, so a worker that lost its database stops in one window, not one per call.
Heartbeats are never retried and never raise: a missed beat is skipped (the next one is due in seconds), so
the heartbeat thread survives an outage. On PostgreSQL the connections get libpq timeouts
(``POSTGRES_TIMEOUTS``), so a call on a dead link fails in seconds instead of hanging on TCP for minutes.
Retrying a write whose commit reached the server just before the link broke can repeat it; Optuna's writes are
upserts except ``create_new_trial`` (a retried one can leave an extra trial that never gets a heartbeat) and
``set_trial_state_values`` (a retried COMPLETE or PRUNED that finds the trial so is taken as done).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from search import errors
from search.errors import HpoError

log = logging.getLogger("hpo")
R = TypeVar("R")
# libpq: give up connecting after 10 s; on an open connection, fail when sent data stays unacknowledged for
# 15 s (a pulled cable) or the idle peer stops answering keepalives. ``options`` asks the server for the same
# on its side: without them a worker cut off or powered off leaves its session, with any lock it held (the budget
# lock), on the server until the OS gives up on it (hours); with them, 15 to 25 s. Keepalives alone were not
# enough in the multi-host test: the server had a few bytes in flight to the cut-off worker, and a socket with
# unacknowledged data is left to TCP's retransmissions (about 15 minutes), not to keepalives; tcp_user_timeout
# bounds that.
POSTGRES_SERVER_KEEPALIVES = ("-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3 "
                              "-c tcp_user_timeout=15000")
POSTGRES_TIMEOUTS = {"connect_timeout": 10, "tcp_user_timeout": 15000, "keepalives": 1, "keepalives_idle": 10,
                     "keepalives_interval": 5, "keepalives_count": 3, "options": POSTGRES_SERVER_KEEPALIVES}


class StorageUnavailable(HpoError):
    """The Optuna storage did not answer for longer than ``storage_retry_seconds``."""

    exit_code = 1


# PostgreSQL ended the session itself: idle in a transaction too long (stores.POSTGRES_IDLE_IN_TRANSACTION_MS, a
# worker cut off mid-write). psycopg raises it as an InternalError, not as a lost connection.
SESSION_ENDED_BY_SERVER = {"25P03"}


def _sqlstate(error: object) -> str | None:
    """The SQLSTATE of a psycopg (``sqlstate``) or psycopg2 (``pgcode``) error."""
    return getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)


def is_connection_error(exc: BaseException) -> bool:
    """A lost or refused database connection anywhere in the exception's chain (Optuna wraps SQLAlchemy's)."""
    import sqlalchemy.exc

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and _sqlstate(seen.orig) in SESSION_ENDED_BY_SERVER:
            return True
        if isinstance(seen, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                             sqlalchemy.exc.DisconnectionError, ConnectionError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Retrier:
    """Runs calls, retrying connection errors for up to ``seconds``; shared by a storage and its budget lock."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self._gave_up = False
        self._lock = threading.Lock()

    def call(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        deadline: float | None = None
        delay = 0.25
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                now = time.monotonic()
                if deadline is None:
                    if self._gave_up or self.seconds <= 0:
                        raise self._unavailable(exc) from exc
                    deadline = now + self.seconds
                    log.warning("%s does not answer (%s); retrying for up to %.0f s (study.storage_retry_seconds)",
                                self.what, first_line(exc), self.seconds)
                if now >= deadline:
                    with self._lock:
                        self._gave_up = True
                    raise self._unavailable(exc) from exc
                time.sleep(min(delay, max(0.0, deadline - now)))
                delay = min(delay * 2, 5.0)
                continue
            if deadline is not None or self._gave_up:
                with self._lock:
                    self._gave_up = False
                log.warning("%s answers again", self.what)
            return result

    def _unavailable(self, exc: BaseException) -> StorageUnavailable:
        return StorageUnavailable(
            f"{self.what} did not answer for {self.seconds:.0f} s (study.storage_retry_seconds): "
            f"{first_line(exc)}. The trial this worker was running will be failed by its missing heartbeat and "
            "retried by another worker; start this worker again once the database is reachable, or raise "
            "study.storage_retry_seconds to ride out longer outages."
        )


def first_line(exc: BaseException) -> str:
    """The database driver's own words: the cause SQLAlchemy wrapped, else the exception."""
    return errors.first_line(exc.__cause__ or exc)
