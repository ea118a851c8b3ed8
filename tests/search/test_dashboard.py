"""`hpo dashboard` serves a study while `hpo run` writes to it: live trial counts, no "database is locked"."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.finished_study import QUICKSTART, Server, hpo

pytestmark = pytest.mark.slow
TINY = ["--set", "study.max_epochs=2", "--quiet"]


def test_dashboard_follows_a_running_study_without_locking_its_sqlite_storage(tmp_path: Path) -> None:
    runs = ["--run-dir", str(tmp_path / "runs")]
    first = hpo("run", str(QUICKSTART), "--trials", "1", *runs, *TINY, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    server = Server("dashboard", str(QUICKSTART), *runs, cwd=tmp_path, ready_path="/api/studies")
    counts: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def poll(path: str) -> None:
        """Read as the dashboard page does (it polls every few seconds), here 20 times a second."""
        while not stop.wait(0.05):
            try:
                with urllib.request.urlopen(server.url + path, timeout=60) as response:
                    data = json.load(response)
                if "trials" in data:
                    counts.append(len(data["trials"]))
            except Exception as exc:  # an HTTP 500 from a locked database lands here
                failures.append(f"{path}: {exc!r}")

    pollers = [threading.Thread(target=poll, args=(p,)) for p in ("/api/studies/1?after=0", "/api/studies")]
    try:
        for t in pollers:
            t.start()
        second = hpo("run", str(QUICKSTART), "--trials", "4", *runs, *TINY, cwd=tmp_path)
        stop.set()
        for t in pollers:
            t.join(timeout=60)
        with urllib.request.urlopen(server.url + "/api/studies/1?after=0", timeout=60) as response:
            final = json.load(response)
    finally:
        stop.set()
        server.stop()
    assert second.returncode == 0, second.stderr
    for text in (second.stdout, second.stderr, server.output()):
        assert "database is locked" not in text
    assert not failures, failures[:3]
    assert len(counts) > 20, "the dashboard was hardly read while the study ran"
    assert counts[0] == 1 and any(1 < c < 4 for c in counts), "the dashboard showed the trials as they came"
    assert len(final["trials"]) == 4
