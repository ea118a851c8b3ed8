"""`hpo run --workers N`: N worker processes on one machine, one study, GPUs assigned round-robin.

Each worker runs `hpo worker` (so what runs on one machine is what runs on many); this module only decides
who gets which GPU and how many CPU threads, starts them, shows their progress from the storage, and stops
them cleanly on Ctrl-C or SIGTERM. CPU workers on Linux are forked from this process once it has loaded
torch, mlflow, optuna and the data, before it opens any store: each saves the ~5 s of imports and loading
that a new process pays (BENCHMARKS.md section 6). GPU workers are new processes: CUDA cannot cross a fork.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn, Protocol

from search.config import Settings
from search.errors import SettingsError
from search.interrupts import LAUNCHER_ENV
from search.loading import collector_off
from search.plugins import data_identity, load_objective
from search.preflight import check_gpus
from search.progress import Progress
from search.proxy import is_grpc
from search.publish import note_writer
from search.run_dir import check_before_creating, check_folder, stored_id
from search.stores import RunPaths, close_storages, open_storage
from search.study import (
    OpenStudy,
    RunResult,
    finish_study,
    load_or_create_study,
    open_study,
    parent_lifetime,
    quiet_libraries,
)
from search.tracking import import_store_code, prepare_local_store, warm_model_logging


@dataclass(frozen=True)
class WorkerPlan:
    """One entry per worker: the GPU id it sees (None = CPU), plus torch threads per CPU worker."""

    workers: tuple[str | None, ...]
    threads: int | None

    def describe(self) -> str:
        n = len(self.workers)
        gpus = sorted({g for g in self.workers if g is not None})
        if not gpus:
            each = f" ({self.threads} thread{'s' if self.threads != 1 else ''} each)" if n > 1 else ""
            return f"{n} worker{'s' if n > 1 else ''} on the CPU{each}"
        return f"{n} worker{'s' if n > 1 else ''} on GPU{'s' if len(gpus) > 1 else ''} {','.join(gpus)}"


def visible_gpus() -> list[str]:
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no usable CUDA means CPU workers
        return []


def plan_workers(workers: int | None, gpus: str | None, trials_per_gpu: int = 1,
                 cpu_count: int | None = None, visible: list[str] | None = None) -> WorkerPlan:
    """Who runs where; ``--gpus`` must name devices torch sees (``visible``: those, for tests)."""
    if workers is not None and workers < 1:
        raise SettingsError(f"--workers must be at least 1, got {workers}")
    if trials_per_gpu < 1:
        raise SettingsError(f"--trials-per-gpu must be at least 1, got {trials_per_gpu}")
    visible = visible_gpus() if visible is None else visible
    ids = check_gpus(gpus, visible) if gpus else visible
    if ids:
        n = workers or len(ids) * trials_per_gpu
        return WorkerPlan(tuple(ids[i % len(ids)] for i in range(n)), None)
    n = workers or 1
    cores = cpu_count or os.cpu_count() or 1
    return WorkerPlan((None,) * n, max(1, cores // n) if n > 1 else None)


def worker_command(args: argparse.Namespace, n_trials: int | None, threads: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "search.cli", "worker", args.file, "--run-dir", args.run_dir, "--quiet",
           "--no-finish"]
    for flag, value in (("--storage", args.storage), ("--tracking-uri", args.tracking_uri),
                        ("--study-name", args.study_name), ("--trials", n_trials),
                        ("--timeout", args.timeout), ("--threads", threads), ("--pack", getattr(args, "pack", None))):
        if value is not None:
            cmd += [flag, str(value)]
    for override in args.overrides:
        cmd += ["--set", override]
    return cmd


class Worker(Protocol):
    """What the launcher needs of a worker process (``subprocess.Popen`` has it; so does ``ForkedWorker``)."""

    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...


class ForkedWorker:
    """A worker forked from the launcher: the child runs ``hpo worker`` with ``argv`` (what a new process would
    run) on the modules and data the launcher has loaded, then exits without returning here."""

    def __init__(self, argv: list[str]) -> None:
        sys.stdout.flush()  # or the child would write the launcher's buffered output again
        sys.stderr.flush()
        launcher = os.getpid()
        pid = os.fork()
        if pid == 0:
            os.environ[LAUNCHER_ENV] = str(launcher)  # the worker stops if the launcher dies (follow_launcher)
            _run_forked(argv)
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


def _run_forked(argv: list[str]) -> NoReturn:
    code = 1
    try:
        import random

        import numpy as np
        import torch

        from search import cli

        random.seed()  # fresh random states, as a new process has, not the launcher's copied into every worker
        np.random.seed()
        torch.seed()
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # as PYTHONUNBUFFERED does
        sys.argv = [sys.argv[0], *argv]
        cli.entry()  # exits through cli.exit_now
    except SystemExit as exc:  # exit_now under a profiler
        code = exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:  # stopped before its command took over the signals: nothing of its own to end
        code = 130
    except BaseException:  # noqa: BLE001 - what an uncaught exception prints in a new process
        traceback.print_exc()
    finally:
        os._exit(code)


def forks_workers(plan: WorkerPlan, storage_url: str, threads: int | None = None) -> bool:
    """Fork CPU workers on Linux; not for GPUs (CUDA), elsewhere (macOS forks badly), behind a storage proxy
    (gRPC's threads do not survive a fork), or from a process running other ``threads`` than its main one (a
    fork copies the locks they hold: `hpo run` called as a library, not the `hpo` command)."""
    threads = threading.active_count() if threads is None else threads
    return (sys.platform == "linux" and all(g is None for g in plan.workers) and not is_grpc(storage_url)
            and threads == 1)


def create_stores_first(settings: Settings, paths: RunPaths, data: dict[str, Any] | None = None) -> set[int]:
    """Before the fork: create the study in its storage (or check the one there), and a local MLflow store's
    file; return the study's trial numbers. The forked workers and this process then open stores that exist, as
    they did when this process opened its own first (several processes making a new SQLite file at once can fail
    with "database is locked"); a study made by an incompatible study file, or a run directory stamped for another
    study, fails here, once. The Optuna storage is closed again and MLflow's is only copied into place, so a forked
    worker inherits no open connection."""
    quiet_libraries()  # as open_study does: no "A new study created" line from Optuna
    check_before_creating(paths)
    storage = open_storage(paths.storage_url, retry_seconds=settings.study.storage_retry_seconds)
    try:
        check_folder(paths, stored_id(storage, settings.study.name))  # as open_study does, before creating it
        before = {t.number for t in load_or_create_study(settings, storage, data).get_trials(deepcopy=False)}
    finally:
        close_storages()
    prepare_local_store(paths.tracking_uri)
    return before


def import_before_fork(tracking_uri: str) -> None:
    """Import, once, what each forked worker would otherwise import on its own after the fork, in parallel but
    paying it each: optuna-dashboard's note writer (the trial notes) and MLflow's SQL store (about 0.7 s).
    If the process froze what it loaded (`hpo` does, cli.py ``_loading``), these join it, so no collection walks
    them and the workers do not copy their pages. Not ``torch._dynamo`` (about 1 s): workers training without
    torch.compile never load it (objectives/optimizer_update.py), and the launcher's own use (torch.export, to log
    the model at the end) loads it in the warm-up thread while the workers train (``start_warm_up``)."""
    with collector_off(freeze=gc.get_freeze_count() > 0):
        note_writer()
        import_store_code(tracking_uri)


def start_workers(args: argparse.Namespace, plan: WorkerPlan, n_trials: int | None, fork: bool) -> list[Worker]:
    """One worker per plan entry; if one cannot be started (a process limit), those already started are stopped."""
    cmd = worker_command(args, n_trials, plan.threads)
    procs: list[Worker] = []
    try:
        for gpu in plan.workers:
            if fork:
                procs.append(ForkedWorker([*cmd[3:], "--forked"]))
                continue
            env = dict(os.environ, PYTHONUNBUFFERED="1", **{LAUNCHER_ENV: str(os.getpid())})
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            procs.append(subprocess.Popen(cmd, env=env))
    except BaseException:
        stop_workers(procs)
        raise
    return procs


def stop_workers(procs: list[Worker]) -> None:
    """SIGTERM to every worker still running (each ends its trials as interrupted), then wait for all."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait()


def run_parallel(settings: Settings, paths: RunPaths, args: argparse.Namespace, plan: WorkerPlan,
                 n_trials: int | None, progress: Progress | None) -> RunResult:
    """Start the workers and open (or create) the study and its parent run; follow the storage until the
    workers exit; end the study. Forked workers start once the data is loaded and the stores exist (bad data
    or an incompatible study fails here, before any worker starts), and the launcher opens the stores beside
    them, as workers started together do."""
    if forks_workers(plan, paths.storage_url):
        objective = load_objective(settings.objective_name)(settings)
        objective.prepare()
        before = create_stores_first(settings, paths, data_identity(objective))
        import_before_fork(paths.tracking_uri)
        procs = start_workers(args, plan, n_trials, fork=True)
        try:
            opened = open_study(settings, paths, n_trials)
        except BaseException:
            stop_workers(procs)
            raise
    else:
        opened = open_study(settings, paths, n_trials)
        before = {t.number for t in opened.study.get_trials(deepcopy=False)}
        procs = start_workers(args, plan, n_trials, fork=False)
    with parent_lifetime(opened, own=True) as outcome:  # the workers run with --no-finish: this process ends it
        result = _follow_workers(opened, procs, before, n_trials, progress)
        outcome["status"] = "FAILED" if result.stopped_by_failures or result.workers_failed else "FINISHED"
    return result


def exit_text(code: int) -> str:
    """How a worker process ended, for its launcher's message: a negative exit code is the signal that ended it,
    which leaves no message of the worker's own."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}" + (" (kill -9, or the kernel's out-of-memory killer, which `dmesg` shows)"
                                      if -code == signal.SIGKILL else "")


def start_warm_up() -> threading.Thread:
    """Pay the end's model-logging set-up (``tracking.warm_model_logging``, 1-2 s of CPU) while the workers train,
    in a thread at the lowest CPU priority (Linux sets it per thread): it runs on the cycles the workers leave idle
    (their storage commits, the core of a worker that ended first), not on theirs, and not after the last trial,
    where the study's end used to wait for it whenever the workers ended together. The caller joins it before
    logging the model."""

    def warm() -> None:
        if sys.platform == "linux":
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        warm_model_logging()

    thread = threading.Thread(target=warm, name="hpo-warm-up", daemon=True)
    thread.start()
    return thread


def _follow_workers(opened: OpenStudy, procs: list[Worker], before: set[int], n_trials: int | None,
                    progress: Progress | None) -> RunResult:
    study, paths = opened.study, opened.paths
    if progress is not None:
        progress.start(study)
    shown = set() if progress is None else {
        t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.number in before}
    read_at = 0.0
    warm_up = start_warm_up()
    try:
        while True:  # the workers' exits seen within 0.1 s, so the study ends then; the storage read once a second
            done = all(p.poll() is not None for p in procs)
            if progress is not None and (done or time.monotonic() - read_at >= 1.0):  # --quiet: never read
                read_at = time.monotonic()
                ended = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
                for trial in sorted(ended, key=lambda t: (t.datetime_complete or datetime.min, t.number)):
                    if trial.number not in shown:
                        shown.add(trial.number)
                        progress(study, trial)
                if not done:
                    progress.workers_running(study)
            if done:
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        stop_workers(procs)
        raise
    failed = {i: p.returncode for i, p in enumerate(procs) if p.returncode}
    warm_up.join()  # the end logs the model: not while torch.export is being set up beside it
    test_metrics = finish_study(opened, n_trials)
    new = [t for t in study.get_trials(deepcopy=False) if t.number not in before]
    # A worker that stopped after max_failures failed trials says so itself (above); here we only know it exited.
    return RunResult(study, paths, opened.parent_run_id, len(new), None, test_metrics, failed or None)
