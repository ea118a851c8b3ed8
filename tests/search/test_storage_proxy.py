"""`hpo storage-proxy` and grpc:// storages: workers behind the proxy keep the budget exact, its lock is
released when a worker dies, and a bad or unreachable proxy URL is one clear paragraph."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.errors import SettingsError, StorageError
from tests.search.workers_helpers import child_runs, hpo, hpo_cmd

pytest.importorskip("grpc", reason="grpcio is not installed (pip install 'hpo-service[grpc]')")

from search.proxy import ProxyLock, build_server, open_proxy  # noqa: E402

TRAIN = '''
import torch

def train(config, on_epoch):
    model = torch.nn.Linear(2, 2)
    x = config.params["x"]
    for epoch in range(config.max_epochs):
        if on_epoch(epoch, {"score": x * (epoch + 1), "loss": 1.0 - x}, model):
            break
    return model
'''

STUDY = '''
[study]
name = "behind_proxy"
direction = "maximize"
metric = "score"
n_trials = 6
max_epochs = 3

[sampler]
name = "random"
seed = 0

[pruner]
name = "none"

[early_stopping]
enabled = false

[space.x]
type = "float"
low = 0.0
high = 1.0

[objective]
name = "custom"
train = "trivial.py:train"
metrics = ["score", "loss"]
device = "cpu"
'''


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """`hpo storage-proxy` on a free port over a SQLite file: (grpc URL, the database URL under it)."""
    db_url = f"sqlite:///{tmp_path / 'proxied.db'}"
    proc = subprocess.Popen(hpo_cmd("storage-proxy", "--storage", db_url, "--port", "0"), cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    found = re.search(r"grpc://127\.0\.0\.1:\d+", line)
    try:
        assert found, f"no address in the proxy's first line: {line!r}"
        yield found.group(0), db_url
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_two_workers_behind_the_proxy_finish_the_exact_budget(tmp_path: Path, proxy: tuple[str, str]) -> None:
    url, db_url = proxy
    (tmp_path / "trivial.py").write_text(TRAIN)
    (tmp_path / "study.toml").write_text(STUDY)
    root = tmp_path / "runs" / "behind_proxy"
    root.mkdir(parents=True)
    # the MLflow SQLite store is created once beforehand: two processes creating it at the same moment race in
    # MLflow's own schema migration (not what this test is about; a tracking server has no such race)
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_experiments()
    cmd = hpo_cmd("worker", "study.toml", "--storage", url, "--run-dir", str(tmp_path / "runs"), "--quiet",
                  "--threads", "1")
    workers = [subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [w.communicate(timeout=600)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    assert all("no heartbeats through it" in e and "hpo recover --older-than" in e for e in errors)
    study = optuna.load_study(study_name="behind_proxy", storage=db_url)  # the database itself, not the proxy
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 6 and len(states) == 6  # exactly the budget, nothing extra
    assert all(t.value is not None and t.value == pytest.approx(3 * t.params["x"]) for t in study.trials)
    runs = child_runs(MlflowClient(f"sqlite:///{root / 'mlflow.db'}"), "behind_proxy")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == list(range(6))
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_the_proxy_lock_waits_for_its_holder_and_is_freed_when_the_holder_is_killed(tmp_path: Path) -> None:
    server, port = build_server(f"sqlite:///{tmp_path / 'lock.db'}", "127.0.0.1", 0, threads=16)
    url = f"grpc://127.0.0.1:{port}"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from search.proxy import ProxyLock; lock = ProxyLock({url!r}, 's'); lock.__enter__(); "
                               "print('held', flush=True); import time; time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        got = threading.Event()
        other = ProxyLock(url, "s")
        waiter = threading.Thread(target=lambda: (other.__enter__(), got.set()), daemon=True)
        waiter.start()
        assert not got.wait(0.5), "a second worker took the lock while the first held it"
        with ProxyLock(url, "another study"):  # other names are not blocked
            pass
        holder.kill()  # kill -9: the connection goes away, the proxy releases the lock
        assert got.wait(60)
        other.__exit__(None, None, None)
        with ProxyLock(url, "s"):
            pass
    finally:
        holder.kill()
        holder.wait()
        server.stop(grace=0)


def test_unreachable_or_foreign_proxies_and_malformed_urls_are_clear_errors(tmp_path: Path) -> None:
    closed = _free_port()
    with pytest.raises(StorageError, match=r"no storage proxy answered there .*hpo storage-proxy --storage"):
        open_proxy(f"grpc://127.0.0.1:{closed}")
    for bad in ("grpc://127.0.0.1", "grpc://127.0.0.1:13000/db", "grpc://:13000"):
        with pytest.raises(SettingsError, match="grpc://HOST:PORT with nothing after the port"):
            open_proxy(bad)
    storage = optuna.storages.get_storage(f"sqlite:///{tmp_path / 'plain.db'}")
    from concurrent.futures import ThreadPoolExecutor

    from search.optuna_adapter import grpc_proxy_server

    plain = grpc_proxy_server(storage, ThreadPoolExecutor(max_workers=4))  # Optuna's proxy without hpo's lock
    port = plain.add_insecure_port("127.0.0.1:0")
    plain.start()
    try:
        with pytest.raises(StorageError, match="not one started by `hpo storage-proxy`"):
            open_proxy(f"grpc://127.0.0.1:{port}")
    finally:
        plain.stop(grace=0)


def test_a_worker_pointed_at_no_proxy_exits_2_with_one_paragraph(tmp_path: Path) -> None:
    (tmp_path / "trivial.py").write_text(TRAIN)
    (tmp_path / "study.toml").write_text(STUDY)
    out = hpo("worker", "study.toml", "--storage", f"grpc://127.0.0.1:{_free_port()}", "--run-dir",
              str(tmp_path / "runs"), cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
    assert "no storage proxy answered there" in out.stderr and "hpo storage-proxy" in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing created


def test_storage_proxy_refuses_a_taken_port_and_a_proxy_behind_a_proxy(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = hpo("storage-proxy", "--storage", f"sqlite:///{tmp_path / 'o.db'}", "--port", str(port), cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert f"--port {port}: cannot listen there" in out.stderr and "--port 0 for a free one" in out.stderr
    out = hpo("storage-proxy", "--storage", "grpc://127.0.0.1:13000", "--port", "0", cwd=tmp_path)
    assert out.returncode == 2 and "needs the database itself" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "o.db").exists()
