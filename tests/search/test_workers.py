"""Several workers on one study: exact budgets on SQLite and PostgreSQL, every trial in MLflow, no locks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search import records
from search.config import load_settings
from search.errors import SettingsError
from search.launch import plan_workers
from search.optuna_adapter import fail_running
from search.stores import run_paths
from search.study import OpenStudy, claim_slot, run_study
from search.tracking import Tracker
from search.workers import HOST, identity, recover_local_orphans, retry
from tests.mlflow_server import free_port, wait_http
from tests.search.workers_helpers import QUICKSTART, child_runs, hpo_cmd, load, postgres_database

SMALL = ["--set", "study.max_epochs=2", "--set", "objective.widths=[8,16]"]


def test_a_retry_keeps_the_params_and_curve_but_none_of_the_failed_attempt_s_record(tmp_path: Path) -> None:
    """What `hpo status` and the epoch counts read off a waiting retry must be its own (nothing yet), not the
    dead attempt's: its reason, MLflow run, epochs, resume point, worker."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", direction="maximize")
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)})
    for step in range(3):
        trial.report(0.5 + step / 10, step)
    attempt = {"mlflow_run_id": "r1", "mlflow_run_url": "http://x/r1", "epochs_run": 3, "reason": "interrupted",
               "resumed_from_trial": 7, "resumed_at_epoch": 1, "packed_with": [0, 1], "oom_batch_size": 64,
               "early_stopped": False, **identity(), "user_note": "kept"}
    for key, value in attempt.items():
        trial.set_user_attr(key, value)
    assert set(attempt) - {"user_note"} <= {*records.PER_ATTEMPT, "host", "pid", "pid_start"}
    assert fail_running(study, study.trials[0], "worker_died")
    retry(study, study.trials[0])
    waiting = study.trials[1]
    assert waiting.state == TrialState.WAITING and waiting.params == study.trials[0].params
    assert waiting.intermediate_values == {0: 0.5, 1: 0.6, 2: 0.7}
    assert waiting.user_attrs == {"user_note": "kept"}
    assert records.epochs_trained(waiting) == 0 and records.epochs_trained(study.trials[0]) == 2


def test_plan_assigns_gpus_round_robin_and_shares_cpu_threads() -> None:
    four = ["0", "1", "2", "3"]
    assert plan_workers(None, "0,1", trials_per_gpu=2, visible=four).workers == ("0", "1", "0", "1")
    assert plan_workers(3, "0,1,2,3", visible=four).workers == ("0", "1", "2")
    assert plan_workers(5, "2,3", visible=four).workers == ("2", "3", "2", "3", "2")
    assert plan_workers(None, None, visible=four).workers == tuple(four)
    with pytest.raises(SettingsError, match="no GPU 4 on this machine; torch sees 4"):
        plan_workers(None, "0,4", visible=four)
    with pytest.raises(SettingsError, match="no CUDA GPU that torch can use"):
        plan_workers(None, "0", visible=[])
    cpu = plan_workers(4, None, cpu_count=16)
    if cpu.workers[0] is None:  # no GPU on this machine
        assert cpu.workers == (None,) * 4 and cpu.threads == 4
        assert plan_workers(None, None).workers == (None,)
    assert plan_workers(4, None, cpu_count=16, visible=[]).describe() == "4 workers on the CPU (4 threads each)"
    assert plan_workers(2, None, cpu_count=2, visible=[]).describe() == "2 workers on the CPU (1 thread each)"
    assert plan_workers(None, None, visible=[]).describe() == "1 worker on the CPU"
    assert plan_workers(None, None, trials_per_gpu=2, visible=["0"]).describe() == "2 workers on GPU 0"


def test_claim_slot_counts_the_study_after_it_retries_an_orphan(tmp_path: Path) -> None:
    """``claim_slot`` decides from one read of the study, read again only when it failed and retried a trial: a
    dead worker's RUNNING trial, once failed and retried, no longer fills the budget, so the next trial starts."""
    settings = load_settings(QUICKSTART, ["study.name='claim'"])
    paths = run_paths(tmp_path / "runs", "claim")
    tracker = Tracker(paths.tracking_uri, "claim", paths.artifacts)
    study = optuna.create_study(study_name="claim", direction="maximize")  # in memory: no heartbeat, no waiting
    opened = OpenStudy(settings, paths, study, tracker, tracker.parent_run("claim", {"n_trials": 2}), None)
    study.tell(study.ask(), 0.9)
    live = study.ask()
    for key, value in identity().items():  # this very process: alive
        live.set_user_attr(key, value)
    assert claim_slot(opened, n_trials=2) == "stop"  # 1 finished + 1 running fill a budget of 2

    study.tell(live, 0.8)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = study.ask()
    orphan.set_user_attr("host", HOST)
    orphan.set_user_attr("pid", dead.pid)
    assert claim_slot(opened, n_trials=3) == "start"  # the orphan's budget is free again: its retry waits
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert claim_slot(opened, n_trials=2) == "stop"


def test_local_orphan_is_failed_and_retried_with_same_params() -> None:
    study = optuna.create_study(direction="maximize")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    orphan.report(0.5, 0)
    orphan.set_user_attr("host", HOST)
    orphan.set_user_attr("pid", dead.pid)
    alive = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    for key, value in identity().items():  # this very process: never an orphan
        alive.set_user_attr(key, value)
    elsewhere = study.ask()
    elsewhere.set_user_attr("host", socket.gethostname() + "-other")
    elsewhere.set_user_attr("pid", dead.pid)  # another machine's pid says nothing here
    killed: list[int] = []
    assert recover_local_orphans(study, on_fail=lambda t: killed.append(t.number)) == [0]
    assert killed == [0]
    trials = study.get_trials()
    assert [t.state for t in trials[:3]] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]
    assert trials[0].user_attrs["reason"] == "worker_died"
    retry = trials[3]
    assert retry.state == TrialState.WAITING
    assert retry.params == trials[0].params and retry.intermediate_values == {0: 0.5}
    assert retry.system_attrs["failed_trial"] == 0

    # The retry does not carry the dead worker's identity: taken RUNNING by another worker, whose session has not
    # written its own yet, it is not that dead worker's orphan (it was, and was failed again, retry after retry)
    assert not {"host", "pid", "pid_start"} & set(retry.user_attrs)
    taken = study.ask()
    assert taken.number == 3 and study.get_trials()[3].state == TrialState.RUNNING
    assert recover_local_orphans(study) == []
    assert study.get_trials()[3].state == TrialState.RUNNING


@pytest.mark.parametrize("kind", ["memory", "sqlite", "journal", "postgresql"])
def test_study_runs_to_exact_budget_on_every_storage(kind: str, tmp_path: Path) -> None:
    """The same study path on each storage: exact finished count, one MLflow child run per trial."""
    settings = load_settings(QUICKSTART, ["study.max_epochs=2", "objective.widths=[8,16]", "study.name='st'"])

    def run(url: str | None) -> None:
        paths = run_paths(tmp_path / "runs", "st", url)
        result = run_study(settings, paths, n_trials=3)
        trials = result.study.get_trials()
        assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 3
        assert not [t for t in trials if t.state == TrialState.RUNNING]
        from mlflow.tracking import MlflowClient

        runs = child_runs(MlflowClient(paths.tracking_uri), "st")
        assert sorted(r.data.tags["optuna.trial_number"] for r in runs) == [str(t.number) for t in trials]
        assert {r.info.status for r in runs} == {"FINISHED"}
        if url != "memory":  # a persistent storage resumes: a second run adds exactly one trial
            again = run_study(settings, paths, n_trials=4)
            assert again.new_trials == 1

    if kind == "postgresql":
        with postgres_database() as url:
            run(url)
    else:
        run({"memory": "memory", "sqlite": None, "journal": f"journal:{tmp_path / 'journal.log'}"}[kind])


@pytest.mark.slow
def test_four_workers_on_sqlite_finish_exactly_forty_trials(tmp_path: Path) -> None:
    launcher = subprocess.Popen(hpo_cmd("run", str(QUICKSTART), "--workers", "4", "--trials", "40", "--set",
                                        "study.name='w4'", *SMALL), cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    stdout, stderr = launcher.communicate(timeout=600)
    out = subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr)
    assert out.returncode == 0, out.stderr
    assert "locked" not in (out.stderr + out.stdout).lower()
    assert "4 workers on the CPU" in out.stderr
    study, client = load(tmp_path / "runs" / "w4", "w4")
    states = [t.state for t in study.trials]
    assert len(states) == 40 and all(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    # The launcher printed the data line; workers forked from it (Linux) leave it to the launcher, new worker
    # processes print their own. Every trial ran in a worker, never in the launcher. How the 40 trials fell to
    # the four is the scheduler's business, so the test does not ask that each got one.
    assert out.stderr.count("data digits:") == (1 if sys.platform == "linux" else 1 + 4), out.stderr
    pids = {t.user_attrs["pid"] for t in study.trials}
    assert 1 <= len(pids) <= 4 and launcher.pid not in pids
    runs = child_runs(client, "w4")
    assert len(runs) == 40 and {r.info.status for r in runs} == {"FINISHED"}
    assert "finished 40 trials" in out.stdout
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"]).info
    assert parent.status == "FINISHED" and parent.end_time >= max(r.info.end_time for r in runs)  # ended last


@pytest.mark.slow
def test_four_workers_on_postgresql_with_an_mlflow_server(tmp_path: Path) -> None:
    """Workers as on several machines: a PostgreSQL study and an `mlflow server` backed by PostgreSQL."""
    with postgres_database() as optuna_url, postgres_database() as mlflow_url:
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", mlflow_url, "--host", "127.0.0.1",
             "--port", str(port), "--artifacts-destination", str(tmp_path / "mlartifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
        )
        try:
            uri = f"http://127.0.0.1:{port}"
            wait_http(uri + "/health", 120)
            common = ["--storage", optuna_url, "--tracking-uri", uri, "--set", "study.name='pg'", *SMALL,
                      "--trials", "12", "--quiet"]
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            workers = [subprocess.Popen([sys.executable, "-m", "search.cli", "worker", str(QUICKSTART), *common,
                                         "--threads", "1"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
                       for _ in range(4)]
            errors = [w.communicate(timeout=600)[1] for w in workers]
            assert [w.returncode for w in workers] == [0, 0, 0, 0], errors
            study = optuna.load_study(study_name="pg", storage=optuna_url)
            finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
            assert len(finished) == 12 and len(study.trials) == 12
            # every trial ran in one of the four workers (which ones got how many is the scheduler's business)
            assert {t.user_attrs["pid"] for t in study.trials} <= {w.pid for w in workers}
            from mlflow.tracking import MlflowClient

            runs = child_runs(MlflowClient(uri), "pg")
            assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == list(range(12))
            assert {r.info.status for r in runs} == {"FINISHED"}
            parents = MlflowClient(uri).search_runs(
                [MlflowClient(uri).get_experiment_by_name("pg").experiment_id], "tags.`hpo.role` = 'study'")
            assert len(parents) == 1, "one parent run shared by every worker"
            # each worker tries to end it when it stops; only the last one, with no trial left running, does
            assert parents[0].info.status == "FINISHED"
            assert parents[0].info.end_time >= max(r.info.end_time for r in runs)
        finally:
            server.terminate()
            server.wait(timeout=30)


def test_workers_opening_a_new_postgresql_storage_at_once_all_succeed() -> None:
    """Optuna creates its tables on first open; six workers racing to do that must not fail."""
    with postgres_database() as url:
        code = f"from search.stores import open_storage; open_storage({url!r}); print('opened')"
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(6)]
        outputs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, [err[-500:] for _, err in outputs]
        assert all(out.strip() == "opened" for out, _ in outputs)


def test_an_advisory_lock_whose_connection_dropped_while_held_says_so_at_release(
        caplog: pytest.LogCaptureFixture) -> None:
    """The server ends the lock holder's session (as a network cut or an administrator would): the lock is gone
    with it, so another process can take it while this one still thinks it holds it. Releasing it is not an
    error, but it warns, naming the lock, and says what can follow; a normal release says nothing."""
    import sqlalchemy

    from search.workers import advisory_lock

    with postgres_database() as url:
        other = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with caplog.at_level("WARNING", logger="search.workers"):
                with advisory_lock(url, "budget-cut", per_machine=False) as kept:
                    pass
                assert not kept.lost and not caplog.records
                with advisory_lock(url, "budget-cut", per_machine=False) as lock:
                    pid = lock.conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
                    with other.connect() as conn:
                        assert conn.execute(sqlalchemy.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
                        deadline, taken = time.monotonic() + 10, False
                        while not taken and time.monotonic() < deadline:  # the backend ends asynchronously
                            taken = conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"),
                                                 {"k": lock.key}).scalar()
                            time.sleep(0.05)
                        assert taken, "the lock survived its connection"
                        conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": lock.key})
            assert lock.lost
            warned = [r.getMessage() for r in caplog.records]
            assert len(warned) == 1 and "'budget-cut' was lost" in warned[0] and "n_trials" in warned[0], warned
        finally:
            other.dispose()


@pytest.mark.parametrize(("url", "seconds"), [("sqlite:////tmp/x/optuna.db", 0.2), ("sqlite:///runs/q/optuna.db", 0.2),
                                              ("postgresql://u@db:5432/hpo", 1.0), ("mysql://u@db/hpo", 1.0)])
def test_a_waiting_worker_reads_a_local_sqlite_file_often_and_a_server_once_a_second(
        url: str, seconds: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose budget runs on other workers waits to take a trial over if one dies; once the last trial ends
    it exits at its next look. On an SQLite file (one machine) it looks every 0.2 s, so a run ends soon after its
    last trial; on a server shared by many machines' workers once a second."""
    from types import SimpleNamespace

    from search import study

    slept: list[float] = []
    monkeypatch.setattr(study.time, "sleep", slept.append)
    study.wait_to_take_over(SimpleNamespace(paths=SimpleNamespace(storage_url=url)))  # type: ignore[arg-type]
    assert slept == [seconds]
