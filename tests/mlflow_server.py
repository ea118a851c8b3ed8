"""A real `mlflow server` with proxied artifacts for tests: a tmp SQLite backend and artifact folder, a free port,
stopped with its whole process group. Optionally started through a command prefix (``ip netns exec HOST``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, seconds: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{url}: server exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} not ready after {seconds} s:\n{log.read_text() if log else ''}") from None
            time.sleep(0.5)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, SIGKILL to what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def mlflow_server(folder: Path, host: str = "127.0.0.1", port: int | None = None,
                  prefix: Sequence[str] = ()) -> Iterator[str]:
    """``mlflow server`` (SQLite backend, proxied artifacts in ``folder/mlartifacts``); yields its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = folder / "mlflow-server.log"
    cmd = [*prefix, sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
           f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "mlartifacts"),
           "--serve-artifacts", "--host", host, "--port", str(port), "--workers", "1"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
    url = f"http://{host}:{port}"
    try:
        wait_http(url + "/health", 180, proc, log)
        yield url
    finally:
        stop_group(proc)
