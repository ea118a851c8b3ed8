"""`hpo run --workers N`: N worker processes on one machine, one study, GPUs assigned round-robin.

Each worker is a plain `hpo worker` process (so what runs on one machine is what runs on many); this
module only decides who gets which GPU and how many CPU threads, starts them, shows their progress from
the storage, and stops them cleanly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from search.config import Settings
from search.errors import SettingsError
from search.preflight import check_gpus
from search.progress import Progress
from search.stores import RunPaths
from search.study import OpenStudy, RunResult, finish_study, open_study, parent_lifetime


@dataclass(frozen=True)
class WorkerPlan:
    """One entry per worker: the GPU id it sees (None = CPU), plus torch threads per CPU worker."""

    workers: tuple[str | None, ...]
    threads: int | None

    def describe(self) -> str:
        n = len(self.workers)
        gpus = sorted({g for g in self.workers if g is not None})
        if not gpus:
            return f"{n} worker{'s' if n > 1 else ''} on the CPU" + (f" ({self.threads} threads each)" if n > 1 else "")
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


def run_parallel(settings: Settings, paths: RunPaths, args: argparse.Namespace, plan: WorkerPlan,
                 n_trials: int | None, progress: Progress | None) -> RunResult:
    """Create the study and parent run once, start the workers, follow the storage until they exit."""
    opened = open_study(settings, paths, n_trials)
    with parent_lifetime(opened, own=True) as outcome:  # the workers run with --no-finish: this process ends it
        result = _follow_workers(opened, args, plan, n_trials, progress)
        outcome["status"] = "FAILED" if result.stopped_by_failures or result.workers_failed else "FINISHED"
    return result


def _follow_workers(opened: OpenStudy, args: argparse.Namespace, plan: WorkerPlan, n_trials: int | None,
                    progress: Progress | None) -> RunResult:
    study, paths = opened.study, opened.paths
    if progress is not None:
        progress.start(study)
    before = {t.number for t in study.get_trials(deepcopy=False)}
    shown = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    procs = []
    for gpu in plan.workers:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        procs.append(subprocess.Popen(worker_command(args, n_trials, plan.threads), env=env))
    try:
        while True:
            done = all(p.poll() is not None for p in procs)
            for trial in study.get_trials(deepcopy=False):
                if trial.state.is_finished() and trial.number not in shown:
                    shown.add(trial.number)
                    if progress is not None:
                        progress(study, trial)
            if done:
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        raise
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    test_metrics = finish_study(opened, n_trials)
    new = [t for t in study.get_trials(deepcopy=False) if t.number not in before]
    # A worker that stopped after max_failures failed trials says so itself (above); here we only know it exited.
    return RunResult(study, paths, opened.parent_run_id, len(new), None, test_metrics, failed or None)
