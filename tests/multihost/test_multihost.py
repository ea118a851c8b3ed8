"""Several machines for real: workers on network-namespace hosts, PostgreSQL and an MLflow server on others.

Each worker host has its own hostname and its own local --run-dir (nothing shared but the database and the
MLflow server, reached over the veth links). Three ways a machine or the database can fail mid-study:
a worker killed with -9, a worker cut off from the network while it keeps training, and a database restart.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from search.workers import advisory_lock
from tests.multihost.cluster import REPO, Cluster

pytestmark = pytest.mark.slow
T = TypeVar("T")
# Trials long enough to be interrupted (40 epochs, no pruning or early stopping), a checkpoint every epoch,
# and a heartbeat every second that goes stale after 4 s. 40, not 10: once a trial's fixed cost fell, a 10-epoch
# trial of this tiny CNN passed its epochs 3 to 6 between two of the tests' polls, and one CI run never caught
# a trial of host A there before the workers had finished the study.
EPOCHS = 40
SHORT = ["--set", f"study.max_epochs={EPOCHS}", "--set", "pruner={name='none'}",
         "--set", "early_stopping.enabled=false", "--set", "objective.widths=[8,16]",
         "--set", "study.checkpoint_every_seconds=0",
         "--set", "study.heartbeat_interval=1", "--set", "study.grace_period=4"]


def _wait(what: str, check: Callable[[], T | None], seconds: float, logs: list[Path]) -> T:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            found = check()
        except Exception:  # noqa: BLE001 - the study or a run may not exist yet
            found = None
        if found is not None:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n" + "\n".join(_tail(log) for log in logs))


def _tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    return f"--- {log}\n" + "\n".join(text[-lines:])


@functools.cache
def _reader(storage: str) -> optuna.storages.RDBStorage:
    """One storage per database for the tests' polls, each call on a connection of its own that is closed after
    it. An RDBStorage made per poll keeps its pooled connection open until the garbage collector frees it (it
    sits in a reference cycle), and polls every 0.2 s filled the cluster server's 100 connections. Opening one
    creates Optuna's tables where they are missing, so it waits for the lock the workers create them under (a
    poll racing a worker's CREATE TABLE failed that worker with a duplicate key in ``pg_type``)."""
    with advisory_lock(storage, "schema", per_machine=False):
        return optuna.storages.RDBStorage(storage, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})


def _trials(storage: str, study: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name=study, storage=_reader(storage)).get_trials()


def _pointer(client: MlflowClient, run_id: str) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return dict(json.loads(Path(client.download_artifacts(run_id, "resume/latest.json", tmp)).read_text()))
        except Exception:  # noqa: BLE001 - none uploaded yet
            return None


def _uploaded_trial_on(host: str, storage: str, study: str, client: MlflowClient) -> Callable[[], FrozenTrial | None]:
    """A RUNNING trial of ``host`` with at least 3 epochs reported, many still to go, and a resume checkpoint in
    the artifact store."""
    def check() -> FrozenTrial | None:
        for t in _trials(storage, study):
            ok = t.state == TrialState.RUNNING and t.user_attrs.get("host") == host
            mid_trial = 3 <= len(t.intermediate_values) <= EPOCHS // 2
            if ok and mid_trial and _pointer(client, t.user_attrs["mlflow_run_id"]):
                return t
        return None
    return check


def _finish(procs: list[tuple[subprocess.Popen[Any], Path]], seconds: float = 400) -> list[str]:
    logs = []
    for proc, log in procs:
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            raise AssertionError("a worker did not finish\n" + "\n".join(_tail(p) for _, p in procs)) from None
        logs.append(log.read_text(errors="replace"))
    assert [p.returncode for p, _ in procs] == [0] * len(procs), "\n".join(_tail(p) for _, p in procs)
    return logs


def _assert_exact_budget(trials: list[FrozenTrial], n: int) -> None:
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def _runs(client: MlflowClient, study: str) -> list[Any]:
    experiment = client.get_experiment_by_name(study)
    assert experiment is not None
    return list(client.search_runs([experiment.experiment_id], max_results=1000))


def _assert_resumed_elsewhere(trials: list[FrozenTrial], victim: FrozenTrial, host: str) -> FrozenTrial:
    """The victim FAILed; exactly one retry, on another host, with its params, resumed from the artifact store."""
    first = next(t for t in trials if t.number == victim.number)
    assert first.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1, [(t.number, t.system_attrs) for t in trials]
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert retry.user_attrs["host"] != host
    assert retry.user_attrs["resumed_from_trial"] == victim.number
    assert sorted(retry.intermediate_values) == list(range(EPOCHS))  # every epoch reported once
    return retry


def test_a_worker_killed_mid_trial_is_resumed_on_another_host_from_the_artifact_store(cluster: Cluster) -> None:
    storage, study = cluster.postgres.create_database("kill"), "mh-kill"
    client = MlflowClient(cluster.mlflow_url)
    host_a, host_b = cluster.workers[0], cluster.workers[1]
    a = cluster.worker(host_a, study, storage, *SHORT, "--trials", "4")
    b = cluster.worker(host_b, study, storage, *SHORT, "--trials", "4")
    victim = _wait("a trial on host A with an uploaded checkpoint",
                   _uploaded_trial_on(host_a.name, storage, study, client), 300, [a[1], b[1]])
    os.killpg(a[0].pid, signal.SIGKILL)
    a[0].wait()
    time.sleep(1)  # an upload A sent whole before it died may still be landing; B takes over after 4 s
    pointer = _pointer(client, victim.user_attrs["mlflow_run_id"])  # the newest whole upload, A being dead
    assert pointer is not None
    _finish([b])

    trials = _trials(storage, study)
    _assert_exact_budget(trials, 4)
    retry = _assert_resumed_elsewhere(trials, victim, host_a.name)
    assert retry.user_attrs["host"] == host_b.name
    assert retry.user_attrs["resumed_at_epoch"] == pointer["epoch"] + 1  # the epoch after the uploaded one
    assert not (cluster.work / host_b.name / study / "runs" / study / "checkpoints" / f"trial-{victim.number}").exists()
    runs = {r.info.run_id: r for r in _runs(client, study)}
    assert "RUNNING" not in {r.info.status for r in runs.values()}  # the study's run too
    assert runs[victim.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    resumed = runs[retry.user_attrs["mlflow_run_id"]]
    assert resumed.data.tags["hpo.resumed_from_checkpoint"] == "artifact store"
    assert client.list_artifacts(victim.user_attrs["mlflow_run_id"], "resume") == []  # removed after COMPLETE
    assert client.list_artifacts(resumed.info.run_id, "resume") == []


def test_a_partitioned_worker_is_taken_over_and_its_late_result_is_dropped(cluster: Cluster) -> None:
    storage, study = cluster.postgres.create_database("part"), "mh-part"
    client = MlflowClient(cluster.mlflow_url)
    host_a, host_b = cluster.workers[0], cluster.workers[2]
    a = cluster.worker(host_a, study, storage, *SHORT, "--trials", "4")
    b = cluster.worker(host_b, study, storage, *SHORT, "--trials", "4")
    victim = _wait("a trial on host A with an uploaded checkpoint",
                   _uploaded_trial_on(host_a.name, storage, study, client), 300, [a[1], b[1]])
    cluster.net.partition(host_a)  # A keeps training, but its database calls and heartbeats go nowhere
    try:
        def taken_over() -> FrozenTrial | None:
            trials = _trials(storage, study)
            retry = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
            return retry[0] if retry and retry[0].state != TrialState.WAITING else None

        _wait("host B to take the trial over", taken_over, 180, [a[1], b[1]])
        assert a[0].poll() is None, "A's worker keeps running while cut off"
        at_takeover = next(t for t in _trials(storage, study) if t.number == victim.number)
        pointer = _pointer(client, victim.user_attrs["mlflow_run_id"])  # what B found: A can upload nothing now
        assert pointer is not None
    finally:
        cluster.net.heal(host_a)
    logs = _finish([a, b])

    assert "was failed and retried by another worker" in logs[0]
    trials = _trials(storage, study)
    _assert_exact_budget(trials, 4)
    retry = _assert_resumed_elsewhere(trials, victim, host_a.name)
    assert retry.user_attrs["resumed_at_epoch"] == pointer["epoch"] + 1
    assert retry.user_attrs["host"] != host_a.name and retry.user_attrs["resumed_at_epoch"] >= 1
    first = next(t for t in trials if t.number == victim.number)
    assert first.user_attrs["host"] == host_a.name and first.value is None  # A's late result changed nothing:
    assert first.intermediate_values == at_takeover.intermediate_values  # no epoch reported after the takeover
    assert first.user_attrs == at_takeover.user_attrs
    runs = _runs(client, study)
    assert "RUNNING" not in {r.info.status for r in runs}
    children = [r for r in runs if r.data.tags.get("hpo.role") != "study"]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [t.number for t in trials]
    victim_run = next(r for r in children if r.info.run_id == victim.user_attrs["mlflow_run_id"])
    assert victim_run.info.status == "KILLED"


def test_workers_ride_out_a_database_restart(cluster: Cluster) -> None:
    storage, study = cluster.postgres.create_database("restart"), "mh-restart"
    # 40 epochs: long enough that the check below sees both workers mid-trial at once (6-epoch trials ended in
    # well under a second once a trial's fixed cost fell, and one CI run never caught both running).
    settings = ["--set", f"study.max_epochs={EPOCHS}", "--set", "pruner={name='none'}",
                "--set", "early_stopping.enabled=false",
                "--set", "objective.widths=[8,16]", "--set", "study.heartbeat_interval=2",
                "--set", "study.grace_period=40", "--set", "study.storage_retry_seconds=120", "--trials", "4"]
    a = cluster.worker(cluster.workers[0], study, storage, *settings)
    b = cluster.worker(cluster.workers[1], study, storage, *settings)

    def both_training() -> bool | None:
        running = [t for t in _trials(storage, study) if t.state == TrialState.RUNNING and t.intermediate_values]
        return True if len(running) == 2 else None

    _wait("both workers in a trial", both_training, 300, [a[1], b[1]])
    cluster.postgres.stop()
    time.sleep(5)  # both workers hit the closed database meanwhile (an epoch takes well under that)
    cluster.postgres.start()
    logs = _finish([a, b])

    assert any("does not answer" in log for log in logs) and any("answers again" in log for log in logs)
    trials = _trials(storage, study)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4  # nothing failed, lost or run twice
    for t in trials:
        assert sorted(t.intermediate_values) == list(range(t.user_attrs["epochs_run"]))
    client = MlflowClient(cluster.mlflow_url)
    runs = _runs(client, study)
    children = [r for r in runs if r.data.tags.get("hpo.role") != "study"]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [0, 1, 2, 3]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_worker_stops_with_a_clear_message_when_the_database_stays_away(cluster: Cluster) -> None:
    storage, study = cluster.postgres.create_database("away"), "mh-away"
    # 1000 epochs: the trial cannot end (and a second begin) between the wait and the database's stop
    settings = [*SHORT, "--set", "study.max_epochs=1000", "--set", "study.storage_retry_seconds=3", "--trials", "2"]
    a = cluster.worker(cluster.workers[2], study, storage, *settings)

    def training() -> bool | None:
        return True if any(t.intermediate_values and t.state == TrialState.RUNNING
                           for t in _trials(storage, study)) else None

    _wait("the worker in a trial", training, 300, [a[1]])
    cluster.postgres.stop()
    try:
        a[0].wait(timeout=120)
    finally:
        cluster.postgres.start()
    log = a[1].read_text(errors="replace")
    assert a[0].returncode == 1, _tail(a[1])
    assert "did not answer for 3 s (study.storage_retry_seconds)" in log and "Traceback" not in log
    trials = _trials(storage, study)
    assert [t.state for t in trials] == [TrialState.RUNNING]  # left to the heartbeat: another worker retries it
    run = MlflowClient(cluster.mlflow_url).get_run(trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["hpo.reason"] == "storage_lost"


HOLD_LOCK = """
import sys, time
from search.workers import advisory_lock
with advisory_lock(sys.argv[1], "mh-held", per_machine=False):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_budget_lock_held_by_a_worker_that_was_cut_off_is_freed_by_the_server_in_seconds(cluster: Cluster) -> None:
    """A worker cut off while it holds the budget lock (an advisory lock, held by its database session) must not
    stop every other worker for the two hours the server's TCP would take to give up on its session."""
    storage, host = cluster.postgres.create_database("held"), cluster.workers[1]
    log = cluster.work / "lock-holder.log"
    holder = cluster.net.start(host, [sys.executable, "-c", HOLD_LOCK, storage], log=log, env=dict(os.environ),
                               cwd=REPO)
    _wait("the lock taken on host B", lambda: True if "held" in log.read_text() else None, 60, [log])
    taken = threading.Event()

    def take() -> None:
        with advisory_lock(storage, "mh-held", per_machine=False):
            taken.set()

    cluster.net.partition(host)
    try:
        started = time.monotonic()
        threading.Thread(target=take, daemon=True).start()  # blocks until the server drops host B's session
        assert not taken.wait(3), "the lock was free while its holder was alive"
        assert taken.wait(90), "the server kept the cut-off holder's session, and the lock, for 90 s"
        waited = time.monotonic() - started
    finally:
        cluster.net.heal(host)
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert waited <= 60  # the server's keepalives and 15 s limit on unacknowledged data, not TCP's defaults
