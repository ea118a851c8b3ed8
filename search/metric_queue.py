"""Epoch metrics written behind the training thread, in a few calls per trial instead of one per epoch.

Why held and merged, not written as each epoch ends: one MLflow ``log_batch`` is about 5 ms of Python
(SQLAlchemy) on the writer thread, and with the GIL that time is taken from the training thread, which at
that moment writes its own report to Optuna: in a 30-trial quickstart run the report took 5-6 ms with a
write per epoch beside it and under 3 ms without (BENCHMARKS.md section 2). Held for up to ``interval``
seconds and merged per run, a short trial's epochs reach the store in one call, at its end (``flush``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

Write = Callable[[str, list[Any]], object]

# MLflow's limit on the metrics of one log_batch call.
MAX_PER_CALL = 1000


def in_calls(items: list[Any], per_call: int) -> list[list[Any]]:
    """``items`` in order, split into lists of at most ``per_call``."""
    return [items[start:start + per_call] for start in range(0, len(items), per_call)]


class MetricQueue:
    """Items queued per run, written by one daemon thread in order, per run in calls of at most ``per_call``.

    The first item queued after a write waits at most ``interval`` seconds; ``flush`` writes everything queued
    at once and waits for it. A failed write loses its call's items and is handed to the next ``flush``."""

    def __init__(self, interval: float = 2.0, per_call: int = MAX_PER_CALL) -> None:
        if interval < 0 or per_call < 1:
            raise ValueError(f"interval must be >= 0 and per_call >= 1, got {interval} and {per_call}")
        self.interval = interval
        self.per_call = per_call
        self._cond = threading.Condition()
        self._pending: dict[str, tuple[Write, list[Any]]] = {}
        self._since = 0.0  # when the oldest pending item was queued
        self._writing = False
        self._flushes = 0
        self._errors: list[BaseException] = []
        self._thread: threading.Thread | None = None

    def put(self, run_id: str, items: list[Any], write: Write) -> None:
        """Queue ``items`` for ``write(run_id, items)``; the run's first ``write`` is the one used."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="hpo-mlflow-metrics", daemon=True)
                self._thread.start()
            if not self._pending:
                self._since = time.monotonic()
            self._pending.setdefault(run_id, (write, []))[1].extend(items)
            self._cond.notify_all()

    def take(self, run_id: str) -> list[Any]:
        """Remove and return the run's queued items, for a caller that writes them itself (a trial's last call)."""
        with self._cond:
            entry = self._pending.pop(run_id, None)
        return entry[1] if entry else []

    def flush(self) -> list[BaseException]:
        """Write everything queued now and wait until it is written; the errors raised since the last flush."""
        with self._cond:
            self._flushes += 1
            self._cond.notify_all()
            try:
                while self._pending or self._writing:
                    if self._thread is None or not self._thread.is_alive():  # never wait on a writer that died
                        batch, self._pending, self._writing = self._pending, {}, False
                        self._errors.extend(self._write(batch))
                        break
                    self._cond.wait(0.5)
            finally:
                self._flushes -= 1
            errors, self._errors = self._errors, []
        return errors

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                while not self._flushes and (left := self._since + self.interval - time.monotonic()) > 0:
                    self._cond.wait(left)
                batch, self._pending = self._pending, {}
                self._writing = True
            errors = self._write(batch)
            with self._cond:
                self._errors.extend(errors)
                self._writing = False
                self._cond.notify_all()

    def _write(self, batch: dict[str, tuple[Write, list[Any]]]) -> list[BaseException]:
        errors: list[BaseException] = []
        for run_id, (write, items) in batch.items():
            for part in in_calls(items, self.per_call):
                try:
                    write(run_id, part)
                except Exception as exc:  # kept for flush(): a logging failure must not kill the writer
                    errors.append(exc)
        return errors
