"""Every use of Optuna's private API, in one module, so an Optuna upgrade means reading one file.

Checked against Optuna 5.0.0 (``CHECKED_AGAINST``; ``tests/search/test_optuna_adapter.py`` covers each
function on a real SQLite storage). Public API is used wherever it exists: ``study.tell(...,
skip_if_finished=True)``, ``optuna.storages.fail_stale_trials``, ``RetryHeartbeatStaleTrialCallback``.
What is left needs the storage itself: a live trial's stored record (to see which trials it retries) and
an atomic "fail this RUNNING trial unless someone else finished it" with a reason attached first.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Container
from concurrent.futures import Executor
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

CHECKED_AGAINST = "5.0.0"


def stored_trial(trial: optuna.Trial) -> FrozenTrial:
    """The storage's record of a live trial (system attrs included, which ``optuna.Trial`` does not expose)."""
    return trial.study._storage.get_trial(trial._trial_id)


def heartbeat_enabled(study: optuna.Study) -> bool:
    """Whether the study's storage runs Optuna's heartbeat (RDB storages opened with heartbeat_interval)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def fail_running(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Record ``reason`` and move a RUNNING trial to FAIL; False when another worker finished it first.

    ``study.tell`` cannot do this: it sets no attribute, and with ``skip_if_finished`` it does not say
    whether this call or another one ended the trial, which decides who enqueues the retry.
    """
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "reason", reason)
        return bool(storage.set_trial_state_values(trial._trial_id, TrialState.FAIL))
    except RuntimeError:  # "has already finished and can not be updated"
        return False


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class FinishedTrialsCache:
    """The study as a pruner sees it, with its finished trials read from the storage at most every ``ttl``
    seconds. Optuna's pruners read every finished trial at every ``should_prune`` (on SQLite a few ms a
    call); finished trials change only when another worker finishes one, so a trial of one worker sees
    exactly what an uncached read gives, and one of several workers sees finished trials up to ``ttl`` late.
    Reads that include unfinished states, and everything else, go to the study itself."""

    def __init__(self, study: optuna.Study, ttl: float) -> None:
        self._study = study
        self._ttl = ttl
        self._finished: list[FrozenTrial] = []
        self._read_at = -float("inf")

    def __getattr__(self, name: str) -> object:
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        if states is None or any(s not in FINISHED for s in TrialState if s in states):
            return self._study.get_trials(deepcopy=deepcopy, states=states)
        now = time.monotonic()
        if now - self._read_at >= self._ttl:
            self._finished = self._study.get_trials(deepcopy=False, states=FINISHED)
            self._read_at = now
        chosen = [t for t in self._finished if t.state in states]
        return copy.deepcopy(chosen) if deepcopy else chosen


class PruningTrial:
    """``optuna.Trial.report`` and ``should_prune`` as the per-epoch decision calls them, with the pruner
    reading finished trials through a ``FinishedTrialsCache`` (``Trial.should_prune`` is these same two
    lines on the study itself)."""

    def __init__(self, trial: optuna.Trial, ttl: float = 10.0) -> None:
        self.trial = trial
        self.view = FinishedTrialsCache(trial.study, ttl)

    def report(self, value: float, step: int) -> None:
        self.trial.report(value, step)

    def should_prune(self) -> bool:
        return bool(self.trial.study.pruner.prune(self.view, stored_trial(self.trial)))  # type: ignore[arg-type]


def grpc_proxy_server(storage: optuna.storages.BaseStorage, thread_pool: Executor) -> Any:
    """A gRPC server (not started, no port yet) with Optuna's storage proxy service for ``storage``.

    ``optuna.storages.run_grpc_proxy_server`` builds the same server but starts it itself, on a fixed port,
    with no room for another service; `hpo storage-proxy` adds its lock service and may listen on port 0.
    Keepalive pings let the server notice a worker whose machine went away, so its lock is released.
    """
    import grpc
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    server = grpc.server(thread_pool, options=[("grpc.keepalive_time_ms", 20_000),
                                               ("grpc.keepalive_timeout_ms", 10_000)])
    api_pb2_grpc.add_StorageServiceServicer_to_server(  # type: ignore[no-untyped-call]
        OptunaStorageProxyService(storage), server)
    return server
