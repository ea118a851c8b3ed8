"""Many light workers on one PostgreSQL study: trials per second, exact budget, lock waits, connections.

Each worker is its own process running the loop of ``search.study.run_trials`` (take the budget lock, recover
orphans and stale trials, count finished + running trials, start one trial, release the lock once it is
RUNNING) with hpo's storage code (``search.stores.open_storage`` with hpo's heartbeat, ``search.workers.
budget_lock``), on a trivial objective: four suggested parameters, the worker identity as user attrs, five
reported epochs with a median-pruner check each, no training. A real `hpo worker` also imports torch and
MLflow (about 850 MB and 3 s per process here), which 64 processes on a 2-core, 23 GB machine cannot carry;
the storage and lock traffic per trial are the same.

For each mode and worker count: a fresh study in one throwaway database (created on the server and dropped
at the end), every worker started and connected before the clock starts (connections are sampled from
before the first worker starts), then ``--trials`` trials to finish.
Modes: ``direct`` (each worker connects to PostgreSQL) and ``proxy`` (an `hpo storage-proxy` in front of the
database; workers use ``grpc://``). While the workers run, pg_stat_activity and pg_locks are sampled every
0.2 s: connections to the database (and to the whole server, whose limit is max_connections), sessions
waiting on a lock, ungranted locks. After the run the study is read back through Optuna: finished trials
must be exactly ``--trials``, none RUNNING.

    python bench/many_workers.py                                   # 8, 32, 64 workers; direct and proxy
    python bench/many_workers.py --modes before,direct,proxy       # also the lock and pool as they were
    python bench/many_workers.py --workers 4 --trials 16           # a smoke run (tests/bench/test_many_workers.py)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS = 5


def child(url: str, study_name: str, n_trials: int, pool: tuple[int, int], folder: Path, before: bool) -> None:
    """One light worker: the loop of search.study.run_trials around a trivial objective; prints its trial count
    and the seconds it waited for the budget lock. ``before``: the lock as it was before this bench (the advisory
    lock alone, each waiting worker holding a connection)."""
    import optuna

    from search.optuna_adapter import heartbeat_enabled
    from search.stores import open_storage
    from search.workers import BudgetLock, _AdvisoryLock, budget_lock, identity, recover_local_orphans

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(url, heartbeat=(10, 60), pool=pool)  # hpo's defaults: heartbeat every 10 s, grace 60 s
    study = optuna.load_study(study_name=study_name, storage=storage,
                              sampler=optuna.samplers.TPESampler(n_startup_trials=10, seed=os.getpid()),
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2))
    lock = BudgetLock(_AdvisoryLock(url, study_name)) if before else budget_lock(url, study_name, folder)
    me = identity()

    def objective(trial: optuna.Trial) -> float:
        lock.release()  # RUNNING now: the others count it
        lr = trial.suggest_float("lr", 1e-4, 3e-1, log=True)
        batch = trial.suggest_categorical("batch_size", [32, 64, 128])
        wd = trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
        dropout = trial.suggest_float("dropout", 0.0, 0.5)
        for key, value in me.items():
            trial.set_user_attr(key, value)
        value = 1.0 - (abs(lr - 0.01) + dropout / 5 + wd + batch / 1e4)
        for step in range(STEPS):
            trial.report(value * (1 - 0.5 ** (step + 1)), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    (folder / f"ready-{os.getpid()}").touch()
    while not (folder / "go").exists():
        time.sleep(0.05)
    ran = acquired = 0
    waited = 0.0
    while True:
        t0 = time.perf_counter()
        lock.acquire()
        waited += time.perf_counter() - t0
        acquired += 1
        try:
            recover_local_orphans(study)
            if heartbeat_enabled(study):
                optuna.storages.fail_stale_trials(study)
            states = [t.state.name for t in study.get_trials(deepcopy=False)]
            if sum(states.count(s) for s in ("COMPLETE", "PRUNED", "RUNNING")) >= n_trials:
                break
            study.optimize(objective, n_trials=1)
            ran += 1
        finally:
            lock.release()
    print(json.dumps({"ran": ran, "lock_wait_s": waited, "acquired": acquired}), flush=True)


class Sampler(threading.Thread):
    """pg_stat_activity and pg_locks every 0.2 s from before the workers start until they have all exited."""

    def __init__(self, admin_url: str, database: str) -> None:
        super().__init__(daemon=True)
        import sqlalchemy

        # autocommit: PostgreSQL keeps one snapshot of pg_stat_activity per transaction, so a sampler inside one
        # transaction would see the same list of sessions every time
        self.engine = sqlalchemy.create_engine(admin_url, poolclass=sqlalchemy.pool.NullPool,
                                               isolation_level="AUTOCOMMIT")
        self.database = database
        self.stop = threading.Event()
        self.rows: list[tuple[int, int, int, int]] = []

    def run(self) -> None:
        import sqlalchemy

        query = sqlalchemy.text(
            "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = :db),"
            " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),"
            " (SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND wait_event_type = 'Lock'),"
            " (SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            "  WHERE d.datname = :db AND NOT l.granted)")
        with self.engine.connect() as conn:
            while not self.stop.wait(0.2):
                db, server, waiting, ungranted = conn.execute(query, {"db": self.database}).one()
                self.rows.append((int(db), int(server) - 1, int(waiting), int(ungranted)))  # less this sampler

    def summary(self) -> dict[str, Any]:
        cols = list(zip(*self.rows, strict=True)) or [(0,)] * 4
        return {"samples": len(self.rows), "max_connections_db": max(cols[0]), "max_connections_server": max(cols[1]),
                "max_lock_waiters": max(cols[2]), "mean_lock_waiters": round(statistics.mean(cols[2]), 1),
                "share_of_samples_with_lock_waits": round(sum(1 for w in cols[2] if w) / max(1, len(cols[2])), 2),
                "max_ungranted_locks": max(cols[3])}


def start_proxy(db_url: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "storage-proxy", "--storage", db_url, "--port", "0"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    found = re.search(r"grpc://[\d.]+:\d+", line)
    if not found:
        proc.kill()
        raise SystemExit(f"storage proxy did not start: {line}{proc.stderr.read()}")
    return proc, found.group(0)


def one_run(mode: str, workers: int, trials: int, db_url: str, admin_url: str, database: str,
            pool: tuple[int, int]) -> dict[str, Any]:
    import optuna

    from search.stores import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"many-{mode}-{workers}-{int(time.time())}"
    before = mode == "before"
    pool = (5, 10) if before else pool
    optuna.create_study(study_name=name, storage=open_storage(db_url), direction="maximize")
    proxy, url = start_proxy(db_url) if mode == "proxy" else (None, db_url)
    errors: list[str] = []
    sampler = Sampler(admin_url, database)  # connected before the workers, so a full server cannot keep it out
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cmd = [sys.executable, str(Path(__file__)), "--child", url, name, str(trials), f"{pool[0]},{pool[1]}", tmp,
               "before" if before else "now"]
        procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(workers)]
        while len(list(folder.glob("ready-*"))) < workers and all(p.poll() is None for p in procs):
            time.sleep(0.1)
        started = time.perf_counter()
        (folder / "go").touch()
        ran = acquired = 0
        waited = 0.0
        for p in procs:
            out, err = p.communicate()
            if p.returncode != 0:
                errors.append((err.strip().splitlines() or [f"exit {p.returncode}"])[-1])
            else:
                report = json.loads(out.strip().splitlines()[-1])
                ran, acquired = ran + report["ran"], acquired + report["acquired"]
                waited += report["lock_wait_s"]
        wall = time.perf_counter() - started
        sampler.stop.set()
        sampler.join()
    if proxy is not None:
        proxy.terminate()
        proxy.wait()
    study = optuna.load_study(study_name=name, storage=open_storage(db_url))
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    finished = states.count("COMPLETE") + states.count("PRUNED")
    return {"mode": mode, "workers": workers, "trials": trials, "wall_s": round(wall, 2),
            "trials_per_s": round(finished / wall, 1), "finished": finished, "ran_by_workers": ran,
            "exact": finished == trials and states.count("RUNNING") == 0, "running": states.count("RUNNING"),
            "failed": states.count("FAIL"), "worker_errors": errors,
            "budget_lock_wait_ms_mean": round(1000 * waited / max(1, acquired), 1),
            "budget_lock_wait_share": round(waited / max(1e-9, wall * (workers - len(errors))), 2), **sampler.summary()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="8,32,64")
    p.add_argument("--modes", default="direct,proxy",
                   help="comma-separated: direct, proxy, before (direct with SQLAlchemy's default pool and the "
                        "advisory lock alone, as before this bench)")
    p.add_argument("--trials", type=int, default=256, help="finished trials each run must end with (default 256)")
    p.add_argument("--pool", default="1,2", help="workers' SQLAlchemy pool: kept,extra (default hpo's 1,2)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        url, name, trials, pool, folder, version = args.child
        kept, extra = (int(x) for x in pool.split(","))
        child(url, name, int(trials), (kept, extra), Path(folder), version == "before")
        return
    from bench.service_overhead import postgres
    from bench.trial_throughput import machine

    kept, extra = (int(x) for x in args.pool.split(","))
    admin = os.environ.get("HPO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    results = []
    with postgres(admin) as db_url:
        if db_url is None:
            raise SystemExit("no PostgreSQL server: set HPO_TEST_POSTGRES_URL")
        database = db_url.rsplit("/", 1)[1]
        print(f"database {database} (dropped at the end); {args.trials} trials per run; workers' pool {kept}+{extra}",
              flush=True)
        print("| mode | workers | trials/s | wall s | finished (exact?) | failed | max conns db | max conns server "
              "| PG lock waiters max (mean) | samples with PG lock waits | budget-lock wait per trial start "
              "| workers' time in that wait | errors |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
        for workers in (int(w) for w in args.workers.split(",")):
            for mode in args.modes.split(","):  # the modes side by side at each count, so load drift hits both
                r = one_run(mode, workers, args.trials, db_url, admin, database, (kept, extra))
                results.append(r)
                errs = "; ".join(sorted(set(r["worker_errors"])))[:200]
                errors = f"{len(r['worker_errors'])}{': ' + errs if errs else ''}"
                print(f"| {mode} | {workers} | {r['trials_per_s']} | {r['wall_s']} | {r['finished']} "
                      f"({'yes' if r['exact'] else 'NO'}) | {r['failed']} | {r['max_connections_db']} | "
                      f"{r['max_connections_server']} | {r['max_lock_waiters']} ({r['mean_lock_waiters']}) | "
                      f"{r['share_of_samples_with_lock_waits']:.0%} | {r['budget_lock_wait_ms_mean']} ms | "
                      f"{r['budget_lock_wait_share']:.0%} | {errors} |",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
