"""One finished quickstart study per test session, shared by the report/export tests and the browser tests.

8 trials of at most 10 epochs (about 15 s on 2 cores): enough for completed and pruned trials, curves,
notes, dashboard artifacts, a logged and registered best model. Made by the real `hpo run` command.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.mlflow_server import free_port

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "studies" / "quickstart.toml"
TRIALS, MAX_EPOCHS = 8, 10
RUN_ARGS = ["--trials", str(TRIALS), "--set", f"study.max_epochs={MAX_EPOCHS}"]
_MADE: dict[str, Path] = {}
# One torch thread per process: these tiny CNNs gain nothing from a second one, and on a 2-core machine
# shared with other jobs, intra-op threads waiting on each other made a study 6x slower (see
# tests/objectives/conftest.py for the same finding).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def hpo(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def finished_study(factory: pytest.TempPathFactory) -> Path:
    """The working folder holding ``runs/quickstart``; the study is run once per session."""
    if "work" not in _MADE:
        work = factory.mktemp("views")
        done = hpo("run", str(QUICKSTART), *RUN_ARGS, "--run-dir", str(work / "runs"), "--quiet", cwd=work)
        assert done.returncode == 0, done.stderr
        _MADE["work"] = work
    return _MADE["work"]


class Server:
    """`hpo dashboard` or `hpo ui` as a real subprocess in its own process group, stopped with the group."""

    def __init__(self, *args: str, cwd: Path, ready_path: str | None = None, port: int | None = None) -> None:
        """Start it; with ``ready_path``, also wait until that URL path answers 200 (else call ``wait``)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cwd / f"server-{self.port}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "search.cli", *args, "--port", str(self.port)],
                                         cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=ENV)
        if ready_path:
            self.wait(ready_path)

    def wait(self, path: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise AssertionError(f"server not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM to the group (mlflow ui runs uvicorn as a child), SIGKILL to what is left after 5 s."""
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                time.sleep(0.5)  # let children of the group exit too
            except subprocess.TimeoutExpired:
                continue
