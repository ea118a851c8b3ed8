"""Storage calls retried across a lost database connection (search/storage_retry.py), on a real PostgreSQL.

The database is reached through a TCP relay in the test, so "the database went away" is the relay closing
every connection and refusing new ones, and "it is back" is the relay listening again on the same port: a
restart as the workers see it, without touching the shared server.
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
from optuna.trial import TrialState

from search.storage_retry import StorageUnavailable
from search.stores import open_storage
from tests.search.workers_helpers import postgres_database


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
