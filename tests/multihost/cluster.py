"""A small cluster on namespace hosts: its own PostgreSQL server, an MLflow tracking server with proxied
artifacts, and worker hosts that each run `hpo worker` with their own local --run-dir and hostname.

The PostgreSQL server is this harness's own: ``initdb`` into a tmp data directory with the server binaries
found on this machine (``/usr/lib/postgresql/*/bin``), run as the ``postgres`` user, listening only on the
database host's address. It never touches another server on this machine.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.mlflow_server import wait_http
from tests.multihost.netns import Host, Network

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "studies" / "quickstart.toml"


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries on this machine, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Postgres:
    """A throwaway PostgreSQL server on a namespace host; ``stop``/``start`` restart it on the same data."""

    def __init__(self, net: Network, host: Host, binaries: Path) -> None:
        self.net, self.host, self.bin = net, host, binaries
        self.user = pwd.getpwnam("postgres")
        self.dir = Path(tempfile.mkdtemp(prefix="hpo-multihost-pg-"))
        os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.proc: subprocess.Popen[Any] | None = None
        done = subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / "initdb"), "-D", str(self.data),
                               "-U", "postgres", "--auth=trust", "--no-sync"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr}")
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {net.subnet}.0/24 trust\n")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.host.address}:5432"

    def start(self) -> None:
        cmd = ["runuser", "-u", "postgres", "--", str(self.bin / "postgres"), "-D", str(self.data),
               "-c", f"listen_addresses={self.host.address}", "-c", "port=5432",
               "-c", f"unix_socket_directories={self.dir}", "-c", "fsync=off", "-c", "max_connections=100"]
        self.log.touch()
        os.chown(self.log, self.user.pw_uid, self.user.pw_gid)
        self.proc = self.net.start(self.host, cmd, log=self.log)
        self._wait_ready()

    def _wait_ready(self, seconds: float = 60) -> None:
        import sqlalchemy

        engine = sqlalchemy.create_engine(f"{self.url}/postgres", poolclass=sqlalchemy.pool.NullPool,
                                          connect_args={"connect_timeout": 2})
        deadline = time.monotonic() + seconds
        try:
            while True:
                try:
                    with engine.connect() as conn:
                        conn.execute(sqlalchemy.text("SELECT 1"))
                    return
                except sqlalchemy.exc.OperationalError:
                    if self.proc is not None and self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"PostgreSQL did not start:\n{self.log.read_text()}") from None
                    time.sleep(0.3)
        finally:
            engine.dispose()

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open connections are closed, as in a restart of a real server."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=60)
        self.proc = None

    def create_database(self, name: str) -> str:
        import sqlalchemy

        admin = sqlalchemy.create_engine(f"{self.url}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return f"{self.url}/{name}"

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


# Worker processes: one torch thread (2-core CI machines), no proxy for the namespace addresses, and MLflow
# HTTP calls that give up in seconds while a host is cut off (its defaults wait minutes).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NO_PROXY": "*", "no_proxy": "*",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class Cluster:
    """The database host, the MLflow host and the worker hosts, with helpers to run workers on them."""

    def __init__(self, net: Network, postgres: Postgres, mlflow_url: str, workers: list[Host], work: Path) -> None:
        self.net, self.postgres, self.mlflow_url, self.workers, self.work = net, postgres, mlflow_url, workers, work

    def worker(self, host: Host, study: str, storage: str, *args: str) -> tuple[subprocess.Popen[Any], Path]:
        """`hpo worker` on ``host`` (hostname = the host's name, run dir local to it); returns (process, log)."""
        run_dir = self.work / host.name / study
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "worker.log"
        cmd = [sys.executable, "-m", "search.cli", "worker", str(QUICKSTART), "--set", f"study.name='{study}'",
               "--storage", storage, "--tracking-uri", self.mlflow_url, "--run-dir", str(run_dir / "runs"),
               "--threads", "1", "--quiet", *args]
        env = {**os.environ, **WORKER_ENV}
        proc = self.net.start(host, cmd, log=log, hostname=host.name, env=env, cwd=REPO)
        return proc, log


def start_mlflow(net: Network, host: Host, folder: Path) -> subprocess.Popen[Any]:
    folder.mkdir(parents=True, exist_ok=True)
    url = f"http://{host.address}:5000"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "mlartifacts"), "--serve-artifacts",
           "--host", host.address, "--port", "5000", "--workers", "1"]
    log = folder / "mlflow-server.log"
    proc = net.start(host, cmd, log=log, env={**os.environ, "NO_PROXY": "*", "no_proxy": "*"}, cwd=folder)
    wait_http(url + "/health", 180, proc, log)
    return proc
