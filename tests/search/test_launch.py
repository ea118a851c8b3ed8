"""`hpo run --workers 2` on digits when it is stopped: SIGTERM or Ctrl-C fail every worker's trial, re-enqueue it and
end its MLflow run KILLED, and the next run resumes them; kill -9 of one worker leaves the other to finish the exact
budget. (The single-process versions are in test_recovery.py.)

The model (tests/search/faulty_model.py, mode ``hold``) waits at the start of epoch 1 until the test lets it go, so
the signal always finds both trials RUNNING with epoch 0 reported and saved: no fixed sleeps, no races with the
trial's end."""

from __future__ import annotations

import contextlib
import gc
import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import FrozenTrial, TrialState

from search.config import Settings, load_settings
from search.errors import StorageError
from search.launch import WorkerPlan, create_stores_first, forks_workers
from search.stores import run_paths
from search.workers import is_alive
from tests.search.failure_helpers import faulty_study, wait_for
from tests.search.workers_helpers import child_runs, hpo, hpo_cmd, load, postgres_database

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "studies" / "quickstart.toml"

pytestmark = pytest.mark.slow

EPOCHS = 3


def _both_held(root: Path) -> Callable[[list[FrozenTrial]], bool]:
    """Both workers' trials past epoch 0: reported, and its last.pt written (the session writes it just after the
    report, so the report alone left a window in which a signal found no last.pt: one CI run)."""

    def ready(trials: list[FrozenTrial]) -> bool:
        held = [t for t in trials if t.state == TrialState.RUNNING and len(t.intermediate_values) >= 1]
        saved = all((root / "checkpoints" / f"trial-{t.number}" / "last.pt").exists() for t in held)
        return len({t.user_attrs.get("pid") for t in held}) == 2 and saved

    return ready


def _wait_dead(pid: int) -> None:
    """Until the killed process has exited (a zombie, or reaped): SIGKILL is delivered asynchronously."""
    stat = Path(f"/proc/{pid}/stat")
    for _ in range(6000):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except OSError:  # reaped
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not exit after SIGKILL")


def _start(tmp_path: Path, name: str, trials: int) -> tuple[Path, subprocess.Popen, list[FrozenTrial]]:
    """Start `hpo run --workers 2`; return once each worker's trial is held at epoch 1."""
    study_file = faulty_study(tmp_path, name, ["hold"], n_trials=trials, max_epochs=EPOCHS, at_epoch=1)
    proc = subprocess.Popen(hpo_cmd("run", str(study_file), "--workers", "2", "--quiet"), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    trials_now = wait_for(proc, tmp_path / "runs" / name / "optuna.db", name, _both_held(tmp_path / "runs" / name))
    return study_file, proc, [t for t in trials_now if t.state == TrialState.RUNNING]


# Both signals leave the same state behind, so the resuming run (two more worker processes) is run after one.
@pytest.mark.parametrize(("how", "resume"), [("sigterm", False), ("ctrl-c", True)])
def test_stopping_two_workers_fails_and_requeues_both_trials_and_the_next_run_resumes_them(
        tmp_path: Path, how: str, resume: bool) -> None:
    study_file, proc, held = _start(tmp_path, how, trials=2)
    if sys.platform == "linux":  # forked from `hpo run`, not started as `hpo worker`: the launcher's command line
        for trial in held:
            argv = Path(f"/proc/{trial.user_attrs['pid']}/cmdline").read_bytes().split(b"\0")
            assert b"run" in argv and b"worker" not in argv, argv
    if how == "sigterm":  # a scheduler stopping the job signals the command it started
        proc.send_signal(signal.SIGTERM)
    else:  # Ctrl-C in a terminal signals the whole foreground process group: the command and its workers
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err
    assert err.count("interrupted: finished trials are saved") == 1, err  # the launcher's, not one per worker too
    assert "A new study created" not in err  # Optuna's info line, quiet before the stores are made for the fork
    root = tmp_path / "runs" / how
    study, client = load(root, how)
    trials = {t.number: t for t in study.get_trials()}
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
    runs = {r.info.run_id: r for r in child_runs(client, how)}
    for t in held:
        stopped = trials[t.number]
        assert stopped.state == TrialState.FAIL and stopped.user_attrs["reason"] == "interrupted"
        assert runs[stopped.user_attrs["mlflow_run_id"]].info.status == "KILLED"
        assert (root / "checkpoints" / f"trial-{t.number}" / "last.pt").exists()
    waiting = [t for t in trials.values() if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == sorted(t.number for t in held)
    assert not [t.user_attrs for t in waiting if {"reason", "mlflow_run_id", "epochs_run"} & t.user_attrs.keys()]
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert client.get_run(parent).info.status == "KILLED"
    if not resume:
        return

    (tmp_path / "model.go").touch()  # the resumed trials train to the end
    again = hpo("run", str(study_file), "--workers", "2", "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    # Each stopped attempt trained epoch 0; each retry resumed at 1 and trained the rest: every epoch once.
    assert f"; {2 * EPOCHS} epochs spent of" in again.stdout, again.stdout
    assert "worker done" not in again.stderr  # the launcher reports the end, not each of its workers
    if sys.platform == "linux":  # forked workers leave the data line to their launcher
        assert [line[:5] for line in again.stderr.splitlines()].count("data ") == 1, again.stderr
    study, client = load(root, how)
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["resumed_from_trial"] for t in done) == sorted(t.number for t in held)
    for t in done:
        assert t.user_attrs["resumed_at_epoch"] == 1  # last.pt of epoch 0, written before the hold
        assert sorted(t.intermediate_values) == list(range(EPOCHS))
        steps = [m.step for m in client.get_metric_history(t.user_attrs["mlflow_run_id"], "val_accuracy")]
        assert sorted(steps) == list(range(EPOCHS))
    assert len(done) == 2 and not [t for t in study.get_trials() if t.state in (TrialState.RUNNING,
                                                                                 TrialState.WAITING)]
    assert client.get_run(parent).info.status == "FINISHED"


def test_kill_9_of_one_worker_leaves_the_other_to_finish_the_exact_budget(tmp_path: Path) -> None:
    _, proc, held = _start(tmp_path, "k9w", trials=3)
    victim = held[0]
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    _wait_dead(victim.user_attrs["pid"])  # a zombie until `hpo run` reaps it: dead for the survivor all the same
    (tmp_path / "model.go").touch()  # the survivor goes on
    _, err = proc.communicate(timeout=300)
    # The command reports the dead worker (exit 1), after the other one finished the budget.
    assert proc.returncode == 1, err
    assert re.search(r"worker process \d of 2 was killed by SIGKILL", err), err
    study, client = load(tmp_path / "runs" / "k9w", "k9w")
    trials = study.get_trials()
    dead = trials[victim.number]
    assert dead.state == TrialState.FAIL and dead.user_attrs["reason"] == "worker_died"
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3 and len(trials) == 4  # the budget exactly: 3 finished, plus the dead worker's trial
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_trial"] == victim.number
    assert retry.user_attrs["pid"] != victim.user_attrs["pid"]  # the survivor ran it
    runs = {r.info.run_id: r for r in child_runs(client, "k9w")}
    assert runs[dead.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    assert {runs[t.user_attrs["mlflow_run_id"]].info.status for t in finished} == {"FINISHED"}


# A parent that starts `hpo worker` as `hpo run --workers` starts a GPU worker (a new process, told the launcher's pid)
# and then waits: the new-process path of a launcher that is killed.
NEW_PROCESS_LAUNCHER = ("import os, subprocess, sys, time; subprocess.Popen(sys.argv[1:], env=dict(os.environ, "
                        "HPO_LAUNCHER_PID=str(os.getpid()))); time.sleep(600)")


@pytest.mark.skipif(sys.platform != "linux", reason="a worker follows its launcher on Linux only (prctl)")
@pytest.mark.parametrize("started", ["forked", "new process"])
def test_kill_9_of_the_launcher_stops_its_workers_as_a_sigterm_would(tmp_path: Path, started: str) -> None:
    """`kill -9` of `hpo run --workers` (or the kernel's out-of-memory killer) cannot pass a signal on: each worker
    gets SIGTERM from the kernel instead, fails and re-enqueues its trial and ends its MLflow run KILLED, rather
    than training on unseen, beyond the user's reach."""
    name = "k9l"
    if started == "forked":
        study_file, proc, held = _start(tmp_path, name, trials=2)
    else:
        study_file = faulty_study(tmp_path, name, ["hold"], n_trials=2, max_epochs=EPOCHS, at_epoch=1)
        proc = subprocess.Popen([sys.executable, "-c", NEW_PROCESS_LAUNCHER,
                                 *hpo_cmd("worker", str(study_file), "--quiet")], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)

        def one_held(trials: list[FrozenTrial]) -> bool:
            return any(t.state == TrialState.RUNNING and len(t.intermediate_values) >= 1 and
                       (tmp_path / "runs" / name / "checkpoints" / f"trial-{t.number}" / "last.pt").exists()
                       for t in trials)

        trials_now = wait_for(proc, tmp_path / "runs" / name / "optuna.db", name, one_held)
        held = [t for t in trials_now if t.state == TrialState.RUNNING]
    pids = {t.user_attrs["pid"] for t in held}
    assert proc.pid not in pids and len(pids) == (2 if started == "forked" else 1)
    proc.kill()
    proc.wait()
    for pid in pids:
        _wait_dead(pid)  # the workers exit on their own (reaped by init): none is left training
    study, client = load(tmp_path / "runs" / name, name)
    trials = {t.number: t for t in study.get_trials()}
    runs = {r.info.run_id: r for r in child_runs(client, name)}
    for t in held:
        stopped = trials[t.number]
        assert stopped.state == TrialState.FAIL and stopped.user_attrs["reason"] == "interrupted", stopped.user_attrs
        assert runs[stopped.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    waiting = [t for t in trials.values() if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == sorted(t.number for t in held)

    (tmp_path / "model.go").touch()  # and the next run resumes them
    again = hpo("run", str(study_file), "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    done = [t for t in load(tmp_path / "runs" / name, name)[0].get_trials() if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["resumed_from_trial"] for t in done if "resumed_from_trial" in t.user_attrs) == \
        sorted(t.number for t in held)


def test_a_killed_worker_not_yet_reaped_is_dead() -> None:
    """Between SIGKILL and its parent's next poll a worker is a zombie; its trial must count as an orphan then."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    _wait_dead(proc.pid)  # exited; not reaped, since nothing has waited for it yet
    assert Path(f"/proc/{proc.pid}").exists() and not is_alive(proc.pid)
    proc.wait()


def test_cpu_workers_are_forked_on_linux_only_without_gpus_a_storage_proxy_or_other_threads() -> None:
    cpu, gpu = WorkerPlan((None, None), 1), WorkerPlan(("0", "1"), None)
    assert forks_workers(cpu, "sqlite:///runs/optuna.db", threads=1) is (sys.platform == "linux")
    assert forks_workers(cpu, "postgresql://u@h/db", threads=1) is (sys.platform == "linux")
    assert forks_workers(gpu, "sqlite:///runs/optuna.db", threads=1) is False  # CUDA cannot cross a fork
    assert forks_workers(cpu, "grpc://127.0.0.1:50051", threads=1) is False  # nor gRPC's threads
    assert forks_workers(cpu, "sqlite:///runs/optuna.db", threads=2) is False  # nor locks other threads hold


def _python(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``script`` run by a new Python with this repository importable; it must exit 0."""
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr
    return done


def test_before_the_fork_the_launcher_imports_what_every_worker_would_import_on_its_own(tmp_path: Path) -> None:
    """optuna-dashboard's note writer (trial notes), MLflow's SQL store (a database URI only): afterwards a worker's
    first note and client import neither again, and what was imported joins the frozen objects of a process that
    froze its own. Not torch._dynamo, which the workers' eager trials never load."""
    script = (
        "import gc, sys\n"
        "from search.launch import import_before_fork\n"
        "heavy = ('optuna_dashboard._note', 'mlflow.store.tracking.sqlalchemy_store')\n"
        "assert not [m for m in heavy if m in sys.modules]\n"
        "import_before_fork('http://127.0.0.1:5000')\n"
        "assert [m for m in heavy if m in sys.modules] == list(heavy[:1]), 'a server URI needs no SQL store'\n"
        "gc.freeze(); frozen = gc.get_freeze_count()\n"
        f"import_before_fork('sqlite:///{tmp_path}/mlflow.db')\n"
        "assert all(m in sys.modules for m in heavy) and gc.get_freeze_count() > frozen\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "loaded = set(sys.modules)\n"
        "from search.publish import note_writer\n"
        "note_writer()\n"
        "from search.tracking import MlflowClient\n"
        f"MlflowClient('sqlite:///{tmp_path}/mlflow.db')\n"
        "again = sorted(m for m in set(sys.modules) - loaded if m.startswith(heavy))\n"
        "assert not again, again\n"
        "assert 'optuna_dashboard' not in sys.modules and 'sklearn' not in sys.modules, 'the web app was imported'\n"
    )
    _python(script, tmp_path)


@pytest.mark.skipif(sys.platform != "linux", reason="workers are forked on Linux only")
def test_a_forked_worker_runs_hpo_worker_and_its_exit_status_is_the_worker_s(tmp_path: Path) -> None:
    """The child runs `hpo worker ARGS` and exits with its code (2 for a missing study file, said once); a worker
    killed by a signal reads as minus that signal, as subprocess gives it."""
    script = (
        "import signal\n"
        "from search.launch import ForkedWorker\n"
        "missing = ForkedWorker(['worker', 'no-such-study.toml'])\n"
        "print(missing.wait(), missing.poll())\n"
        f"killed = ForkedWorker(['worker', {str(QUICKSTART)!r}, '--run-dir', 'runs', '--quiet'])\n"
        "killed.send_signal(signal.SIGKILL)\n"
        "print(killed.wait())\n"
        "print('launcher goes on')\n"
    )
    done = _python(script, tmp_path)
    assert done.stdout.splitlines() == ["2 2", str(-signal.SIGKILL), "launcher goes on"]
    assert done.stderr.count("study file 'no-such-study.toml' does not exist") == 1


def test_bad_data_fails_once_in_the_launcher_before_any_worker_starts_or_store_exists(tmp_path: Path) -> None:
    study = tmp_path / "bad.toml"
    study.write_text(QUICKSTART.read_text().replace('dataset = "digits"', 'dataset = "folder"\ndata_dir = "nowhere"'))
    done = hpo("run", str(study), "--workers", "2", "--run-dir", str(tmp_path / "runs"), cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("error:") == 1 and "does not exist or is not a folder" in done.stderr
    assert "worker done" not in done.stderr and "data digits" not in done.stderr
    assert not (tmp_path / "runs" / "quickstart").exists()  # no Optuna or MLflow store was created


@pytest.mark.skipif(sys.platform != "linux", reason="workers are forked on Linux only")
def test_forked_workers_draw_fresh_random_states_not_the_launcher_s(tmp_path: Path) -> None:
    """Each child starts as a new process would, with its own random states (Python's, numpy's, torch's), not a
    copy of the launcher's: two workers must not draw the same retry jitter or unseeded samples."""
    script = (
        "import random, numpy, torch\n"
        "import search.cli\n"
        "from search.launch import ForkedWorker\n"
        "def draw():\n"
        "    print(random.random(), numpy.random.random(), torch.rand(1).item(), flush=True)\n"
        "    search.cli.exit_now(0)\n"
        "search.cli.entry = draw\n"
        "random.seed(0); numpy.random.seed(0); torch.manual_seed(0)\n"
        "for worker in [ForkedWorker([]), ForkedWorker([])]:\n"
        "    assert worker.wait() == 0\n"
        "print(random.random(), numpy.random.random(), torch.rand(1).item())\n"
    )
    done = _python(script, tmp_path)
    first, second, launcher = (line.split() for line in done.stdout.splitlines())
    assert all(a != b and a != c and b != c for a, b, c in zip(first, second, launcher, strict=True))


def _open_files(path: Path) -> list[str]:
    """This process's open file descriptors that point at ``path``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(fd)
    return found


def _settings(name: str, direction: str = "maximize") -> Settings:
    return load_settings(QUICKSTART, [f"study.name={name!r}", f"study.direction={direction!r}"])


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_before_the_fork_the_stores_exist_and_no_connection_is_left_open(tmp_path: Path) -> None:
    """What `hpo run --workers` does before it forks: the study created (or found) with its trial numbers read,
    the MLflow store's file in place, and no connection to either database left for the workers to inherit."""
    import optuna

    paths = run_paths(str(tmp_path / "runs"), "s")
    assert create_stores_first(_settings("s"), paths) == set()  # nothing there yet: both stores made
    assert paths.root.joinpath("optuna.db").is_file() and paths.root.joinpath("mlflow.db").is_file()
    assert not _open_files(paths.root / "optuna.db") and not _open_files(paths.root / "mlflow.db")
    study = optuna.load_study(study_name="s", storage=paths.storage_url)
    assert study.user_attrs["hpo.fingerprint"]  # created as `hpo run` creates it
    for _ in range(3):
        study.tell(study.ask(), 1.0)
    del study
    gc.collect()  # Optuna's storage object above closes its connections here
    assert create_stores_first(_settings("s"), paths) == {0, 1, 2}
    assert not _open_files(paths.root / "optuna.db") and not _open_files(paths.root / "mlflow.db")  # nothing left


def test_before_the_fork_a_study_from_another_study_file_fails_once(tmp_path: Path) -> None:
    paths = run_paths(str(tmp_path / "runs"), "s")
    create_stores_first(_settings("s"), paths)
    with pytest.raises(StorageError, match="already exists in this storage with a different"):
        create_stores_first(_settings("s", direction="minimize"), paths)


def test_before_the_fork_on_postgresql(tmp_path: Path) -> None:
    import optuna

    with postgres_database() as url:
        paths = run_paths(str(tmp_path / "runs"), "s", url)
        assert create_stores_first(_settings("s"), paths) == set()
        study = optuna.load_study(study_name="s", storage=url)
        study.tell(study.ask(), 1.0)
        assert create_stores_first(_settings("s"), paths) == {0}


class _AnswersOnce(http.server.BaseHTTPRequestHandler):
    """An MLflow server that answers the first request (the launcher's check before it forks) and then holds every
    request open, unanswered, until the test lets go: each later store opening waits in its probe."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        server: Any = self.server
        with server.lock:
            server.requests += 1
            first = server.requests == 1
        if first:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")
            return
        with server.lock:
            server.held += 1
        server.release.wait(60)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """Quiet."""


@pytest.mark.skipif(sys.platform != "linux", reason="workers are forked on Linux only; reads /proc")
def test_sigterm_while_the_launcher_opens_its_stores_beside_forked_workers_stops_the_workers_first(
        tmp_path: Path) -> None:
    """The launcher forks its workers and then opens its own stores beside them; a SIGTERM (a scheduler stopping
    the job: the launcher alone is signalled) that comes then must stop the workers before the launcher exits,
    not leave them running on. The tracking server holds every store opening after the first, so the signal
    finds the launcher and both workers waiting on it: no sleeps, no race."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnswersOnce)
    server.daemon_threads = True
    server.lock, server.requests, server.held, server.release = threading.Lock(), 0, 0, threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        proc = subprocess.Popen(hpo_cmd("run", str(QUICKSTART), "--workers", "2", "--tracking-uri", uri,
                                        "--run-dir", str(tmp_path / "runs"), "--quiet"),
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        workers: list[int] = []
        for _ in range(2400):  # the launcher and its two workers each waiting on the server
            with contextlib.suppress(OSError):
                workers = [int(pid) for pid in children.read_text().split()]
            if server.held >= 3 and len(workers) == 2:
                break
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        assert server.held >= 3 and len(workers) == 2, (server.held, workers)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        still = [pid for pid in workers if is_alive(pid)]  # the launcher is gone: its workers must be too
        assert proc.returncode == 130 and "Traceback" not in err, err
        assert "interrupted" in err and not still, (still, err)
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(sys.platform != "linux", reason="only Linux gives one thread its own priority")
def test_the_end_s_model_logging_set_up_runs_beside_the_workers_at_the_lowest_priority(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import search.launch as launch

    seen: dict[str, int] = {}

    def warm() -> None:  # what the thread runs, in place of the 1-2 s set-up itself
        seen["priority"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        seen["thread"] = threading.get_native_id()

    monkeypatch.setattr(launch, "warm_model_logging", warm)
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    launch.start_warm_up().join(timeout=30)
    assert seen["priority"] == 19
    assert seen["thread"] != threading.get_native_id()
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # this thread keeps its own
