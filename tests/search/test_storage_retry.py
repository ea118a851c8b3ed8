"""Storage calls retried across a lost database connection (search/storage_retry.py), on a real PostgreSQL.

The database is reached through a TCP relay in the test, so "the database went away" is the relay closing
every connection and refusing new ones, and "it is back" is the relay listening again on the same port: a
restart as the workers see it, without touching the shared server.
The last tests hold a write's transaction open by hand, as a worker cut off by a network partition between
Optuna's "is the trial still running" check and its commit does, and check the trial's row lock that fences it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import optuna
import pytest
import sqlalchemy.exc
from optuna.trial import TrialState

from search import stores
from search.storage_retry import StorageUnavailable, is_connection_error
from search.stores import open_storage
from search.workers import advisory_lock
from tests.search.workers_helpers import InThread, postgres_database


class Relay:
    """127.0.0.1:PORT -> the database server; ``down()`` drops every connection, ``up()`` listens again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept(): close alone leaves it listening
            self.listener.close()
            self.listener = None
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def _through(relay: Relay, url: str) -> str:
    parts = urlsplit(url)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{relay.port}"))


def _target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def test_storage_calls_wait_for_the_database_to_come_back(caplog: pytest.LogCaptureFixture) -> None:
    with postgres_database() as url:
        relay = Relay(_target(url))
        try:
            storage = open_storage(_through(relay, url), retry_seconds=60)
            study = optuna.create_study(study_name="rt", storage=storage, direction="maximize")
            trial = study.ask()
            trial.report(0.5, 0)
            relay.down()
            threading.Timer(2.0, relay.up).start()  # the database is back after a while
            with caplog.at_level(logging.WARNING, logger="hpo"):
                trial.report(0.6, 1)  # made while it is away: retried until it answers
                study.tell(trial, 0.7)
            messages = [r.getMessage() for r in caplog.records]
            assert any("does not answer" in m and "retrying for up to 60 s" in m for m in messages), messages
            assert any("answers again" in m for m in messages), messages
            stored = optuna.load_study(study_name="rt", storage=url).trials
            assert [t.state for t in stored] == [TrialState.COMPLETE]
            assert stored[0].intermediate_values == {0: 0.5, 1: 0.6} and stored[0].value == 0.7
        finally:
            relay.down()


def test_a_database_away_longer_than_the_retry_time_is_one_clear_error() -> None:
    with postgres_database() as url:
        relay = Relay(_target(url))
        try:
            storage = open_storage(_through(relay, url), retry_seconds=1)
            study = optuna.create_study(study_name="gone", storage=storage)
            trial = study.ask()
            relay.down()
            with pytest.raises(StorageUnavailable, match=r"did not answer for 1 s \(study.storage_retry_seconds\)"):
                trial.report(0.1, 0)
            with pytest.raises(StorageUnavailable):  # it gave up: the next call fails too, without a new wait
                study.tell(trial, 0.2)
            relay.up()
            time.sleep(0.1)
            trial.report(0.3, 1)  # back: calls go through again
            assert optuna.load_study(study_name="gone", storage=url).trials[0].intermediate_values == {1: 0.3}
        finally:
            relay.down()


def _running_trial(url: str) -> tuple[optuna.storages.RDBStorage, int]:
    storage = open_storage(url, retry_seconds=5)
    assert isinstance(storage, optuna.storages.RDBStorage)
    study = optuna.create_study(study_name="fence", storage=storage, direction="maximize")
    return storage, study.ask()._trial_id


def _half_written(storage: optuna.storages.RDBStorage, trial_id: int, step: int) -> object:
    """A report that passed Optuna's "still running" check and whose INSERT has not reached the server (its
    worker was cut off between the two; once the INSERT is there, its foreign key check locks the trial's row)."""
    session = storage.scoped_session()
    storage._set_trial_intermediate_value_without_commit(session, trial_id, step, 0.9)
    return session


def _fail_in_thread(storage: optuna.storages.BaseStorage, trial_id: int) -> threading.Thread:
    """Another worker failing the trial as stale (Optuna's fail_stale_trials makes this call)."""
    failer = threading.Thread(target=storage.set_trial_state_values, args=(trial_id, TrialState.FAIL))
    failer.start()
    return failer


def test_a_late_write_and_the_takeover_of_its_trial_are_ordered_by_the_trials_row_lock() -> None:
    with postgres_database() as url:
        worker, trial_id = _running_trial(url)
        other = open_storage(url, retry_seconds=5)
        session = _half_written(worker, trial_id, step=4)
        failer = _fail_in_thread(other, trial_id)
        failer.join(1.0)
        assert failer.is_alive(), "the takeover waits for the write it would otherwise overtake"
        session.commit()  # type: ignore[attr-defined]
        session.close()  # type: ignore[attr-defined]
        failer.join(10)
        assert not failer.is_alive()
        trial = optuna.load_study(study_name="fence", storage=url).trials[0]
        assert trial.state == TrialState.FAIL and trial.intermediate_values == {4: 0.9}  # written, then failed
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # a write after the takeover: refused
            worker.set_trial_intermediate_value(trial_id, 5, 0.95)
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
            worker.set_trial_user_attr(trial_id, "late", True)
        trial = optuna.load_study(study_name="fence", storage=url).trials[0]
        assert trial.intermediate_values == {4: 0.9} and "late" not in trial.user_attrs


def test_without_the_lock_a_late_write_lands_on_the_failed_trial() -> None:
    """The race the lock closes, shown on Optuna's own RDBStorage: the FAIL does not wait, the write commits
    after it."""
    with postgres_database() as url:
        plain = optuna.storages.RDBStorage(url)
        study = optuna.create_study(study_name="fence", storage=plain, direction="maximize")
        trial_id = study.ask()._trial_id
        session = _half_written(plain, trial_id, step=4)
        failer = _fail_in_thread(open_storage(url, retry_seconds=5), trial_id)
        failer.join(10)
        assert not failer.is_alive()
        session.commit()  # type: ignore[attr-defined]
        session.close()  # type: ignore[attr-defined]
        trial = optuna.load_study(study_name="fence", storage=url).trials[0]
        assert trial.state == TrialState.FAIL and trial.intermediate_values == {4: 0.9}


def test_a_cut_off_writer_delays_the_takeover_only_until_the_server_ends_its_session(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with postgres_database() as url:
        default = open_storage(url)
        with default.engine.connect() as conn:  # type: ignore[attr-defined]
            assert conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar() == "15s"
            assert conn.exec_driver_sql("SHOW tcp_keepalives_idle").scalar() == "10"  # the server's side too
            assert conn.exec_driver_sql("SHOW tcp_user_timeout").scalar() == "15000"
        with advisory_lock(url, "budget", per_machine=False) as lock:  # the budget lock's own connection:
            assert lock.conn.exec_driver_sql("SHOW tcp_keepalives_idle").scalar() == "10"  # keepalives, and
            assert lock.conn.exec_driver_sql("SHOW tcp_user_timeout").scalar() == "15000"
            assert lock.conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar() == "0"  # no limit
        monkeypatch.setattr(stores, "POSTGRES_IDLE_IN_TRANSACTION_MS", 1000)
        worker, trial_id = _running_trial(url)
        session = _half_written(worker, trial_id, step=4)  # and nothing more: its worker is cut off
        started = time.monotonic()
        failer = _fail_in_thread(open_storage(url, retry_seconds=5), trial_id)
        failer.join(30)
        assert not failer.is_alive() and time.monotonic() - started >= 0.9  # waited about the idle limit
        with pytest.raises(sqlalchemy.exc.DBAPIError) as ended:  # the server ended that session
            session.commit()  # type: ignore[attr-defined]
        session.close()  # type: ignore[attr-defined]
        assert is_connection_error(ended.value)  # so the worker's call is retried: on a new connection, and refused
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
            worker.set_trial_intermediate_value(trial_id, 4, 0.9)
        trial = optuna.load_study(study_name="fence", storage=url).trials[0]
        assert trial.state == TrialState.FAIL and trial.intermediate_values == {}  # the late write rolled back


def test_held_steps_written_together_wait_for_a_takeover_that_holds_the_row_and_are_then_refused() -> None:
    """``report_values`` (a session's held steps) takes the trial's row lock before its check, like one report:
    a takeover in progress makes it wait, and once that FAIL commits the write is refused, nothing stored."""
    from optuna.storages._rdb import models

    from search import optuna_adapter
    from search.optuna_adapter import report_values

    with postgres_database() as url:
        worker = open_storage(url, retry_seconds=5)
        study = optuna.create_study(study_name="fence", storage=worker, direction="maximize")
        trial = study.ask()
        other = open_storage(url, retry_seconds=5)
        assert isinstance(other, optuna.storages.RDBStorage)
        taker = other.scoped_session()  # another worker failing the trial: its row locked, not yet committed
        row = taker.query(models.TrialModel).filter(
            models.TrialModel.trial_id == trial._trial_id).with_for_update().one()
        row.state = TrialState.FAIL
        taker.flush()
        writing = InThread(lambda: report_values(trial, {0: 0.5, 1: 0.6}))
        writing.thread.join(1.0)
        assert writing.thread.is_alive(), "the write waits for the takeover that holds the trial's row"
        taker.commit()
        taker.close()
        writing.thread.join(10)
        assert isinstance(writing.outcome, optuna.exceptions.UpdateFinishedTrialError)
        stored = optuna.load_study(study_name="fence", storage=url).trials[0]
        assert stored.state == TrialState.FAIL and stored.intermediate_values == {}
        report = optuna.create_study(study_name="fresh", storage=worker, direction="maximize").ask()
        assert optuna_adapter.report_hold(report) == 0.0  # on a server every step is written as it ends
        report_values(report, {0: 0.5, 1: 0.6})
        assert optuna.load_study(study_name="fresh", storage=url).trials[0].intermediate_values == {0: 0.5, 1: 0.6}
