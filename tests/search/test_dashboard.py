"""`hpo dashboard` serves a study while `hpo run` writes to it: live trial counts, no "database is locked"."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.finished_study import ENV, QUICKSTART, Server, finished_study, hpo
from tests.search.workers_helpers import hpo_cmd

pytestmark = pytest.mark.slow
TINY = ["--set", "study.max_epochs=2", "--quiet"]


def test_dashboard_follows_a_running_study_without_locking_its_sqlite_storage(tmp_path: Path) -> None:
    runs = ["--run-dir", str(tmp_path / "runs")]
    first = hpo("run", str(QUICKSTART), "--trials", "1", *runs, *TINY, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    server = Server("dashboard", str(QUICKSTART), *runs, cwd=tmp_path, ready_path="/api/studies")
    reads: list[tuple[int, bool]] = []  # (trials listed, whether the run was still going when the read returned)
    failures: list[str] = []
    stop, running = threading.Event(), threading.Event()
    second: subprocess.Popen[str] | None = None

    def poll(path: str) -> None:
        """Read as the dashboard page does (it polls every few seconds), here as fast as it answers."""
        while not stop.wait(0.05):
            try:
                with urllib.request.urlopen(server.url + path, timeout=60) as response:
                    data = json.load(response)
                if "trials" in data:
                    reads.append((len(data["trials"]), running.is_set()))
            except Exception as exc:  # an HTTP 500 from a locked database lands here
                failures.append(f"{path}: {exc!r}")

    pollers = [threading.Thread(target=poll, args=(p,)) for p in ("/api/studies/1?after=0", "/api/studies")]
    try:
        for t in pollers:
            t.start()
        running.set()
        second = subprocess.Popen(hpo_cmd("run", str(QUICKSTART), "--trials", "4", *runs, *TINY), cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        out, err = second.communicate(timeout=600)
        running.clear()
        stop.set()
        for t in pollers:
            t.join(timeout=60)
        final = _settled_trials(server.url + "/api/studies/1?after=0", 4)
    finally:
        stop.set()
        if second is not None and second.poll() is None:
            second.kill()
        server.stop()
    assert second.returncode == 0, err
    for text in (out, err, server.output()):
        assert "database is locked" not in text
    assert not failures, failures[:3]
    counts = [n for n, _ in reads]
    # the study was read while the run wrote it: reads went on back to back from before the run started until it
    # ended (how many land in between depends on the machine's load, so only one is asked for); never a trial lost
    # or a count going back
    assert any(during for _, during in reads), "no read of the dashboard came back while the study ran"
    assert counts[0] >= 1 and counts == sorted(counts) and counts[-1] <= 4
    assert len(final) == 4 and {t["state"] for t in final} <= {"Complete", "Pruned"}


def _settled_trials(url: str, n: int) -> list[dict[str, object]]:
    """The trials the dashboard lists once the run has ended. optuna-dashboard keeps a study's trials for 2-10 s
    (its in-memory cache), and `hpo` exits within a second of its last trial: read until it lists ``n`` trials,
    all finished, or a minute has passed, as a person reloading the page would."""
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(url, timeout=60) as response:
            trials: list[dict[str, object]] = json.load(response)["trials"]
        settled = len(trials) == n and all(t["state"] in ("Complete", "Pruned", "Fail") for t in trials)
        if settled or time.monotonic() > deadline:
            return trials
        time.sleep(1.0)


def test_dashboard_on_a_storage_alone_serves_every_study_with_its_artifacts(tmp_path_factory: pytest.TempPathFactory,
                                                                           tmp_path: Path) -> None:
    work = finished_study(tmp_path_factory)
    storage = f"sqlite:///{work / 'runs' / 'quickstart' / 'optuna.db'}"
    server = Server("dashboard", "--storage", storage, "--run-dir", str(work / "runs"), cwd=tmp_path,
                    ready_path="/api/studies")
    try:
        with urllib.request.urlopen(server.url + "/api/studies", timeout=60) as response:
            names = [s["study_name"] for s in json.load(response)["study_summaries"]]
        with urllib.request.urlopen(server.url + "/api/studies/1?after=0", timeout=60) as response:
            trial = json.load(response)["trials"][0]
        artifact = trial["artifacts"][0]  # stored in runs/quickstart/optuna-artifacts, found from the storage alone
        url = f"{server.url}/artifacts/1/{trial['trial_id']}/{artifact['artifact_id']}"
        with urllib.request.urlopen(url, timeout=60) as response:
            body = response.read()
    finally:
        server.stop()
    assert names == ["quickstart"]
    assert len(body) > 1000
    assert "every study" in server.output()


def test_mlflow_ui_on_a_tracking_store_alone_serves_it(tmp_path_factory: pytest.TempPathFactory,
                                                      tmp_path: Path) -> None:
    work = finished_study(tmp_path_factory)
    uri = f"sqlite:///{work / 'runs' / 'quickstart' / 'mlflow.db'}"
    server = Server("ui", "--tracking-uri", uri, cwd=tmp_path)
    try:
        server.wait("/health")
        query = "/ajax-api/2.0/mlflow/experiments/search?max_results=100"
        with urllib.request.urlopen(server.url + query, timeout=60) as response:
            experiments = json.load(response)["experiments"]
    finally:
        server.stop()
    assert "quickstart" in [e["name"] for e in experiments]
