"""Every use of Optuna's private API, in one module, so an Optuna upgrade means reading one file.

Checked against Optuna 5.0.0 (``CHECKED_AGAINST``; ``tests/search/test_optuna_adapter.py`` covers each
function on a real SQLite storage). Public API is used wherever it exists: ``study.tell(...,
skip_if_finished=True)``, ``RetryHeartbeatStaleTrialCallback``.
What is left needs the storage itself: a live trial's stored record (to see which trials it retries), several user
attrs written in one transaction, a trial's held reported steps written with one insert, an atomic "fail this
RUNNING trial unless someone else finished it" with a reason attached first (also for the trials whose heartbeat
stopped, which ``optuna.storages.fail_stale_trials`` fails without one), telling whether Optuna refused to tell a
finished trial, and ``RDBStorage`` with its calls (private ones included: ``_get_trials``, which Optuna's cache
calls, and ``_get_stale_trial_ids``) retried on lost connections, whose writes to a trial are fenced by the
trial's row lock (``RetryingRDBStorage``).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Container, Mapping
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from search import records
from search.storage_retry import Retrier, first_line, is_connection_error

CHECKED_AGAINST = "5.0.0"


def stored_trial(trial: optuna.Trial) -> FrozenTrial:
    """The storage's record of a live trial (system attrs included, which ``optuna.Trial`` does not expose)."""
    return trial.study._storage.get_trial(trial._trial_id)


def _write_trial(trial: optuna.Trial, rdb: Callable[[RDBStorage, Any], None],
                 each: Callable[[optuna.storages.BaseStorage], None]) -> None:
    """``rdb(backend, session)`` in one transaction on an RDB storage (retried and fenced by the trial's row lock
    where the storage is ``RetryingRDBStorage``), else ``each(storage)``: the storage's own call per item."""
    storage = trial.study._storage
    backend = getattr(storage, "_backend", storage)  # Optuna wraps an RDB storage in its _CachedStorage
    if not isinstance(backend, RDBStorage):
        each(storage)
        return
    from optuna.storages._rdb.storage import _create_scoped_session

    def write() -> None:
        with _create_scoped_session(backend.scoped_session, True) as session:
            rdb(backend, session)

    if isinstance(backend, RetryingRDBStorage):
        backend.retrier.call(write)
    else:
        write()


def set_user_attrs(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    """``trial.set_user_attr`` for each of ``attrs``, in one transaction on an RDB storage instead of a commit each
    (about 2 ms a commit on SQLite, more over a network; a trial sets about ten as it starts and ends). Optuna's
    own per-attr write does the work, so a finished trial is refused alike; other storages get one call each."""
    from optuna.storages._rdb import models

    def rdb(backend: RDBStorage, session: Any) -> None:
        for key, value in attrs.items():
            backend._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial._trial_id, key,
                                                   value)

    def each(storage: optuna.storages.BaseStorage) -> None:
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial._trial_id, key, value)

    _write_trial(trial, rdb, each)
    trial._cached_frozen_trial.user_attrs.update(attrs)  # what Trial.set_user_attr does after its write


def report_values(trial: optuna.Trial, values: Mapping[int, float]) -> None:
    """``trial.report(value, step)`` for each of ``values``, in one transaction on an RDB storage: the trial is
    checked once (a finished trial is refused as Optuna refuses a report; ``RetryingRDBStorage`` takes its row
    lock), its stored steps read once, and the new rows inserted together. Optuna's per-step write queries the
    trial and the step each time, a round trip each on a server: 20 steps took 250 ms on PostgreSQL."""
    from optuna.storages._rdb import models

    def rdb(backend: RDBStorage, session: Any) -> None:
        if isinstance(backend, RetryingRDBStorage):
            _lock_trial_row(session, trial._trial_id)
        row = models.TrialModel.find_or_raise_by_id(trial._trial_id, session)
        backend.check_trial_is_updatable(trial._trial_id, cast(TrialState, row.state))
        model = models.TrialIntermediateValueModel
        stored = {v.step: v for v in session.query(model).filter(model.trial_id == trial._trial_id,
                                                                  model.step.in_(list(values)))}
        for step, value in values.items():
            number, kind = model.intermediate_value_to_stored_repr(value)
            if step in stored:  # as Optuna's write does: the new value replaces it
                stored[step].intermediate_value, stored[step].intermediate_value_type = number, kind
            else:
                session.add(model(trial_id=trial._trial_id, step=step, intermediate_value=number,
                                  intermediate_value_type=kind))

    def each(storage: optuna.storages.BaseStorage) -> None:
        for step, value in values.items():
            storage.set_trial_intermediate_value(trial._trial_id, step, value)

    _write_trial(trial, rdb, each)
    trial._cached_frozen_trial.intermediate_values.update(values)  # what Trial.report does after its write


def heartbeat_enabled(study: optuna.Study) -> bool:
    """Whether the study's storage runs Optuna's heartbeat (RDB storages opened with heartbeat_interval)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def reported_epochs(trial: FrozenTrial) -> int:
    """The epochs a first attempt that recorded none reached, by its reported steps (0 for a retry, whose steps
    include those it inherited, or for a trial that recorded its own)."""
    if records.EPOCHS_RUN in trial.user_attrs or optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial):
        return 0
    return records.steps_reached(trial)


def fail_running(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Record ``reason`` and move a RUNNING trial to FAIL; False when another worker finished it first.

    ``study.tell`` cannot do this: it sets no attribute, and with ``skip_if_finished`` it does not say
    whether this call or another one ended the trial, which decides who enqueues the retry. A dead worker's
    trial never recorded its epochs; a first attempt's are its reported steps, recorded here so the epoch counts
    include them (a retry's steps include its predecessor's, so a dead retry counts none).
    """
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, records.REASON, reason)
        reached = reported_epochs(trial)
        if reached:
            storage.set_trial_user_attr(trial._trial_id, records.EPOCHS_RUN, reached)
        return bool(storage.set_trial_state_values(trial._trial_id, TrialState.FAIL))
    except RuntimeError:  # "has already finished and can not be updated"
        return False


def fail_stale(study: optuna.Study, reason: str) -> list[int]:
    """``optuna.storages.fail_stale_trials`` with ``reason`` recorded on each trial it fails (Optuna records none,
    so a trial whose worker's heartbeat stopped would show no reason), then the storage's stale-trial callback
    for each, as Optuna runs it. Returns the numbers of the trials this call failed."""
    if not heartbeat_enabled(study):
        return []
    storage = study._storage
    stale = [storage.get_trial(i) for i in storage._get_stale_trial_ids(study._study_id)]  # type: ignore[attr-defined]
    failed = [t for t in stale if fail_running(study, t, reason)]
    callback = storage.get_heartbeat_stale_trial_callback()  # type: ignore[attr-defined]
    for t in failed:
        if callback is not None:
            callback(study, storage.get_trial(t._trial_id))
    return [t.number for t in failed]


def heartbeat(trial: optuna.Trial) -> AbstractContextManager[object]:
    """The heartbeat ``study.optimize`` keeps for the trial it runs (a no-op without heartbeats), for trials run
    by ask and tell (trial packing), so other workers do not take them for stale."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    return get_heartbeat_thread(trial._trial_id, trial.study._storage)  # type: ignore[return-value]


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class FinishedTrialsCache:
    """The study as a pruner sees it, with its finished trials read from the storage at most every ``ttl``
    seconds. Optuna's pruners read every finished trial at every ``should_prune`` (on SQLite a few ms a
    call); finished trials change only when another worker finishes one, so a trial of one worker sees
    exactly what an uncached read gives, and one of several workers sees finished trials up to ``ttl`` late.
    Reads that include unfinished states, and everything else, go to the study itself; a pruner's writes go to
    ``storage`` (default: the study's)."""

    def __init__(self, study: optuna.Study, ttl: float, storage: object | None = None) -> None:
        self._study = study
        self._storage = storage or study._storage
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


class OwnSystemAttrs:
    """A storage whose writes of one trial's system attrs also land in ``attrs`` (the session's copy of them);
    every call goes to ``storage``. Successive Halving (and Hyperband through it) writes its ``completed_rung_*``
    attrs through ``study._storage`` while it decides, and reads them back from the trial it is given."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int, attrs: dict[str, Any]) -> None:
        self._storage = storage
        self._trial_id = trial_id
        self._attrs = attrs

    def __getattr__(self, name: str) -> object:
        return getattr(self._storage, name)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._storage.set_trial_system_attr(trial_id, key, value)
        if trial_id == self._trial_id:
            self._attrs[key] = value


def report_hold(trial: optuna.Trial) -> float:
    """How long ``PruningTrial`` holds reported steps on ``trial``'s storage: 2 s on an SQLite file (one machine,
    where the write was most of a short epoch's hook), none on a database server or proxy, where other machines'
    workers and viewers read a running trial's steps and the write is one round trip per epoch, as before."""
    storage = trial.study._storage
    backend = getattr(storage, "_backend", storage)
    return 2.0 if isinstance(backend, RDBStorage) and backend.engine.name == "sqlite" else 0.0


class PruningTrial:
    """``optuna.Trial.report`` and ``should_prune`` as the per-epoch decision calls them, with no read of the
    running trial per epoch (a ``get_trial`` was most of a decision's cost on SQLite; Optuna's own
    ``Trial.should_prune`` reads the trial's system attrs whenever the pruner looks at them).

    Reported values are held for up to ``hold`` seconds (by default ``report_hold``'s) and written together, one
    transaction (``flush``): on a short epoch the write was most of the per-epoch hook (about 3-4 ms a step on
    SQLite inside a run, a round trip on a server), and the pruner decides on ``local``, which has every value at
    once. The session flushes before every ``last.pt`` (a retry inherits every step before the epoch it resumes
    at) and as the trial ends, before it is told (a pruned trial's value is its last step as stored); what a
    ``kill -9`` loses (at most ``hold`` seconds of steps) the retry trains again. Epochs longer than ``hold`` are
    written as they end.

    The pruner gets the trial as this worker knows it: read from the storage once, at the start (params,
    inherited intermediate values, system attrs), then each reported value added locally as it is reported.
    Only this worker reports for its trial, and the only system attrs written while it runs are the pruners' own
    (through ``OwnSystemAttrs``), so the pruner sees what a fresh read would give. Finished trials come through a
    ``FinishedTrialsCache``."""

    def __init__(self, trial: optuna.Trial, ttl: float = 10.0, stored: FrozenTrial | None = None,
                 hold: float | None = None) -> None:
        self.trial = trial
        # In memory: get_trial gives the storage's own object. `stored`: the caller's read of it, made just now.
        self.local = copy.deepcopy(stored if stored is not None else stored_trial(trial))
        own = OwnSystemAttrs(trial.study._storage, trial._trial_id, self.local.system_attrs)
        self.view = FinishedTrialsCache(trial.study, ttl, own)
        self.hold = report_hold(trial) if hold is None else hold
        self.pending: dict[int, float] = {}
        self._written = time.monotonic()

    def report(self, value: float, step: int) -> None:
        """Hold the step's value for the next write, unless the trial has one: a retry inherits its predecessor's
        steps and, resumed from an older last.pt (or from epoch 0 without one), trains some of them again; Optuna
        keeps the first value and would only warn "already reported" once per such epoch."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step {step} must be non-negative")
        if step in self.local.intermediate_values:
            return
        self.local.intermediate_values[step] = float(value)
        self.pending[step] = float(value)
        if time.monotonic() - self._written >= self.hold:
            self.flush()

    def flush(self) -> None:
        """Write the held values, one transaction; nothing if none is held."""
        if self.pending:
            report_values(self.trial, self.pending)
            self.pending = {}
        self._written = time.monotonic()

    def should_prune(self) -> bool:
        return bool(self.trial.study.pruner.prune(self.view, self.local))  # type: ignore[arg-type]


def refused_tell(exc: BaseException) -> bool:
    """Whether ``study.optimize`` failed because the trial was already finished when it told the result.

    Optuna 5.0's ``_run_trial`` raises ``ValueError("Cannot tell a FAIL trial.")`` from its tell, and then,
    in its ``finally``, an ``AssertionError("Should not reach.")`` with that ValueError as context.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ValueError) and str(seen).startswith("Cannot tell a "):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


log = logging.getLogger("hpo")
P = ParamSpec("P")
R = TypeVar("R")
Method = Callable[Concatenate["RetryingRDBStorage", P], R]


def _retried(method: Method[P, R]) -> Method[P, R]:
    def call(self: RetryingRDBStorage, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.retrier.call(method, self, *args, **kwargs)

    return call


def _lock_trial_row(session: Any, trial_id: int) -> None:
    """Take the trial's row lock (``FOR NO KEY UPDATE``, the lock an UPDATE of its state conflicts with) for the
    rest of the transaction. Database servers only: SQLite files are opened as Optuna's plain ``RDBStorage``
    (stores._create_rdb), where this check-then-write stays unfenced (pysqlite runs the check's SELECT outside
    its transaction; a window of microseconds, reached only by a stale-heartbeat takeover on one machine)."""
    from optuna.storages._rdb import models

    session.query(models.TrialModel).filter(models.TrialModel.trial_id == trial_id).with_for_update(
        key_share=True).one_or_none()


class RetryingRDBStorage(RDBStorage):
    """``RDBStorage`` whose calls are retried through a ``Retrier`` (see the module docstring), and whose writes
    to a trial (a reported value, a user or system attr) hold the trial's row lock from the moment they check that
    it is still running until they commit.

    Optuna checks "is the trial still running" and then writes, without a lock. A worker cut off by a network
    partition between the two had its write committed once the link came back, after another worker had failed
    the trial as stale and retried it: a late epoch on a FAILED trial (one CI run of the partition test). With
    the lock, the other worker's FAIL (Optuna's ``set_trial_state_values`` locks the row) waits for the write, or
    the write waits for the FAIL and is refused; a cut-off holder's session is ended by the server after
    ``stores.POSTGRES_IDLE_IN_TRANSACTION_MS``, so the wait is bounded and its write rolled back."""

    def __init__(self, url: str, retrier: Retrier, **kwargs: Any) -> None:
        self.retrier = retrier
        super().__init__(url, **kwargs)

    create_new_study = _retried(RDBStorage.create_new_study)
    delete_study = _retried(RDBStorage.delete_study)
    set_study_user_attr = _retried(RDBStorage.set_study_user_attr)
    set_study_system_attr = _retried(RDBStorage.set_study_system_attr)
    get_study_id_from_name = _retried(RDBStorage.get_study_id_from_name)
    get_study_name_from_id = _retried(RDBStorage.get_study_name_from_id)
    get_study_directions = _retried(RDBStorage.get_study_directions)
    get_study_user_attrs = _retried(RDBStorage.get_study_user_attrs)
    get_study_system_attrs = _retried(RDBStorage.get_study_system_attrs)
    get_all_studies = _retried(RDBStorage.get_all_studies)
    create_new_trial = _retried(RDBStorage.create_new_trial)
    set_trial_param = _retried(RDBStorage.set_trial_param)
    get_trial_param = _retried(RDBStorage.get_trial_param)
    get_trial_id_from_study_id_trial_number = _retried(RDBStorage.get_trial_id_from_study_id_trial_number)
    set_trial_intermediate_value = _retried(RDBStorage.set_trial_intermediate_value)
    set_trial_user_attr = _retried(RDBStorage.set_trial_user_attr)
    set_trial_system_attr = _retried(RDBStorage.set_trial_system_attr)
    get_trial_user_attrs = _retried(RDBStorage.get_trial_user_attrs)
    get_trial_system_attrs = _retried(RDBStorage.get_trial_system_attrs)
    get_trial = _retried(RDBStorage.get_trial)
    get_all_trials = _retried(RDBStorage.get_all_trials)
    _get_trials = _retried(RDBStorage._get_trials)
    get_best_trial = _retried(RDBStorage.get_best_trial)
    _get_stale_trial_ids = _retried(RDBStorage._get_stale_trial_ids)

    def _set_trial_intermediate_value_without_commit(self, session: Any, trial_id: int, step: int,
                                                     intermediate_value: float) -> None:
        _lock_trial_row(session, trial_id)
        super()._set_trial_intermediate_value_without_commit(session, trial_id, step, intermediate_value)

    def _set_trial_attr_without_commit(self, session: Any, model_cls: Any, trial_id: int, key: str,
                                       value: Any) -> None:
        _lock_trial_row(session, trial_id)
        super()._set_trial_attr_without_commit(session, model_cls, trial_id, key, value)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        attempts = [0]

        def once() -> bool:
            attempts[0] += 1
            try:
                return RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except optuna.exceptions.UpdateFinishedTrialError:
                # A retry after a commit whose answer was lost: only this worker completes or prunes its trial,
                # so finding that state means the first attempt did it (FAIL may be another worker's).
                mine = state in (TrialState.COMPLETE, TrialState.PRUNED)
                if mine and attempts[0] > 1 and RDBStorage.get_trial(self, trial_id).state == state:
                    return True
                raise

        return self.retrier.call(once)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            RDBStorage.record_heartbeat(self, trial_id)
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            log.debug("heartbeat of trial %s skipped: %s", trial_id, first_line(exc))


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
