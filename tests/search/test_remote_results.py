"""Reading a study whose workers log to an MLflow tracking server, from the machine that ran it and from another
one: the commands `hpo run` prints, `hpo export` of a trial run elsewhere, `hpo report` with the wrong tracking
URI. Two --run-dir folders stand for two machines; a real `mlflow server` with proxied artifacts."""

from __future__ import annotations

import http.server
import shlex
import threading
import time
from collections.abc import Iterator

import pytest

from tests.mlflow_server import free_port, mlflow_server
from tests.search.workers_helpers import QUICKSTART, hpo

NAME = "remote"


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A finished 2-trial study: storage shared by the machines, MLflow on a server, machine A's run directory."""
    work = tmp_path_factory.mktemp("remote")
    with mlflow_server(work / "mlflow") as uri:
        storage = f"sqlite:///{work / 'shared.db'}"
        done = hpo("run", str(QUICKSTART), "--trials", "2", "--set", "study.max_epochs=2", "--study-name", NAME,
                   "--storage", storage, "--tracking-uri", uri, "--run-dir", "machine-a", "--quiet", cwd=work)
        assert done.returncode == 0, done.stderr
        yield {"work": work, "uri": uri, "storage": storage, "out": done.stdout}


def _reading(remote: dict, *args: str, run_dir: str = "machine-b") -> list[str]:
    return ["--study", NAME, "--storage", remote["storage"], "--run-dir", run_dir, *args]


@pytest.mark.slow
def test_the_printed_commands_work_with_a_tracking_server(remote: dict) -> None:
    lines = remote["out"].split("open them:\n", 1)[1].splitlines()
    assert f"MLflow:   {remote['uri']} (artifacts on that server)" in remote["out"]  # not machine A's mlartifacts/
    assert "View run" not in remote["out"]  # MLflow's own two lines per trial ended on a server
    (ui,) = [line for line in lines if "MLflow UI" in line]
    assert ui.strip().startswith(f"open {remote['uri']}/#/experiments/") and " ui " not in ui  # `hpo ui` refuses it
    for line in lines:
        command = shlex.split(line.split("#", 1)[0])
        if command[1] not in ("status", "report", "export"):  # not the servers (`hpo dashboard`, the MLflow UI)
            continue
        assert command[0].endswith("hpo"), line
        command = [c.replace("best-model", str(remote["work"] / "printed-model")) for c in command[1:]]
        done = hpo(*command, cwd=remote["work"])
        assert done.returncode == 0, (line, done.stderr)


@pytest.fixture
def on_machine_b(remote: dict) -> Iterator[dict]:
    """Machine A's checkpoints out of reach, as on another machine (both folders share this test's filesystem)."""
    ours = remote["work"] / "machine-a" / NAME / "checkpoints"
    away = ours.with_name("checkpoints.away")
    ours.rename(away)
    try:
        yield remote
    finally:
        away.rename(ours)


@pytest.mark.slow
def test_export_on_another_machine_fetches_the_checkpoint_from_mlflow(on_machine_b: dict) -> None:
    remote = on_machine_b
    out = remote["work"] / "model-b"
    done = hpo("export", *_reading(remote, "--tracking-uri", remote["uri"], "--out", str(out)), cwd=remote["work"])
    assert done.returncode == 0, done.stderr
    assert (out / "MLmodel").is_file()
    assert not (remote["work"] / "machine-b" / NAME / "checkpoints").exists()  # machine B has none of its own


@pytest.mark.slow
def test_export_whose_checkpoint_cannot_be_fetched_fails_in_seconds(on_machine_b: dict) -> None:
    remote = on_machine_b
    out = remote["work"] / "model-unreachable"
    started = time.monotonic()
    done = hpo("export", *_reading(remote, "--tracking-uri", f"http://127.0.0.1:{free_port()}", "--out", str(out)),
               cwd=remote["work"])
    assert done.returncode == 1 and time.monotonic() - started < 60  # not MLflow's minutes of retries
    assert "is not on this machine" in done.stderr and "nor could it be fetched" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


@pytest.fixture
def not_mlflow() -> Iterator[str]:
    """An HTTP server that is not MLflow (404 for everything), as optuna-dashboard's port is."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.mark.slow
def test_report_with_a_wrong_tracking_uri_is_refused_and_keeps_the_report(remote: dict, not_mlflow: str) -> None:
    good = hpo("report", *_reading(remote, "--tracking-uri", remote["uri"], run_dir="machine-a"), cwd=remote["work"])
    assert good.returncode == 0, good.stderr
    page = remote["work"] / "machine-a" / NAME / "report" / "report.html"
    before = page.read_bytes()
    for wrong, expected in ((["--tracking-uri", not_mlflow], "answers but is not an MLflow tracking server"),
                            ([], f"has no experiment '{NAME}', but the study logged its trials to MLflow")):
        done = hpo("report", *_reading(remote, *wrong, run_dir="machine-a"), cwd=remote["work"])
        assert done.returncode == 2 and expected in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert page.read_bytes() == before  # the good report is not replaced by one without loss curves
    done = hpo("report", *_reading(remote), cwd=remote["work"])  # machine B, no --tracking-uri
    assert done.returncode == 2 and "Pass that --tracking-uri" in done.stderr, done.stderr
    assert not (remote["work"] / "machine-b" / NAME / "report").exists()
