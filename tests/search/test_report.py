"""What a finished run leaves to look at, read back through Optuna's, optuna-dashboard's and MLflow's own APIs:
notes, dashboard artifacts, fit diagnoses, the logged and registered model, `hpo report` and `hpo export`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import urllib.request
from pathlib import Path

import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState
from optuna_dashboard import get_note
from sklearn.datasets import load_digits

from search.cli import main
from search.diagnosis import LABELS, diagnose
from search.notes import epoch_account
from search.publish import CURVES
from tests.finished_study import MAX_EPOCHS, QUICKSTART, TRIALS, finished_study
from tests.mlflow_server import free_port, wait_http

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = finished_study(tmp_path_factory)
    root = work / "runs" / "quickstart"
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{root / 'optuna.db'}")
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return {"work": work, "root": root, "study": study, "client": client,
            "opts": ["--run-dir", str(work / "runs")]}


def _sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw 8x8 digit images (pixel values 0..16), the scale the exported model takes."""
    data = load_digits()
    return data.images[:n].astype(np.float32)[:, None], data.target[:n]


def test_study_note_summarises_the_run(done: dict) -> None:
    study = done["study"]
    note = get_note(study)
    acc = epoch_account(study.trials, MAX_EPOCHS)
    assert f"{TRIALS} of {TRIALS} trials finished" in note
    assert f"**Epochs:** {acc.spent} spent of {acc.full}" in note
    assert f"saved by pruning: **{acc.saved_by_pruning}** epochs" in note
    assert f"saved by early stopping: **{acc.saved_by_early_stopping}** epochs" in note
    assert f"**Best trial:** #{study.best_trial.number}" in note and "test_accuracy" in note
    assert f"--set study.max_epochs={MAX_EPOCHS}" in note and f"hpo export {QUICKSTART}" in note


def test_every_trial_has_a_note_artifacts_a_run_link_and_completed_ones_a_fit(done: dict) -> None:
    study, client, root = done["study"], done["client"], done["root"]
    experiment = client.get_experiment_by_name("quickstart")
    store = root / "optuna-artifacts"
    states = {t.state for t in study.trials}
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states
    for t in study.trials:
        run_id = t.user_attrs["mlflow_run_id"]
        assert t.user_attrs["mlflow_run_url"] == f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}" \
                                                 f"/runs/{run_id}?workflowType=machine_learning"
        note = get_note(optuna.trial.Trial(study, t._trial_id))
        assert f"## Trial {t.number}: {t.state.name}" in note and run_id in note
        metas = {m.filename: m for m in get_all_artifact_meta(t, storage=study._storage)}
        assert f"trial-{t.number}-curves.png" in metas
        png = store / metas[f"trial-{t.number}-curves.png"].artifact_id
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        run = client.get_run(run_id)
        if t.state == TrialState.COMPLETE:
            assert _sha(store / metas["best.pt"].artifact_id) == _sha(t.user_attrs["checkpoint"])
            assert t.user_attrs["fit_diagnosis"] in LABELS
            stored = {key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
                      for key in CURVES}  # what `hpo report` reads: the trial's end diagnosed the same curves
            assert diagnose(stored, MAX_EPOCHS).label == t.user_attrs["fit_diagnosis"]
            assert run.data.tags["fit_diagnosis"] == t.user_attrs["fit_diagnosis"]
            assert t.user_attrs["fit_diagnosis"] in note
        else:
            assert "best.pt" not in metas and "fit_diagnosis" not in run.data.tags
            assert f"pruned at epoch {t.user_attrs['pruned_epoch']}" in note


def test_best_model_is_logged_with_signature_and_registered_under_the_study_name(done: dict) -> None:
    study, client = done["study"], done["client"]
    best = study.best_trial
    versions = client.search_model_versions("name = 'quickstart'")
    assert len(versions) == 1 and versions[0].run_id == best.user_attrs["mlflow_run_id"]
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["best_model_version"] == str(versions[0].version)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{done['root'] / 'mlflow.db'}")  # models:/ URIs resolve in the registry
    try:
        model = mlflow.pyfunc.load_model("models:/quickstart/1")
    finally:
        mlflow.set_tracking_uri(previous)
    signature = model.metadata.signature.to_dict()
    assert json.loads(signature["inputs"])[0]["tensor-spec"]["shape"] == [-1, 1, 8, 8]
    images, labels = _digits(200)
    accuracy = (model.predict(images) == labels).mean()  # class indices
    assert accuracy > 0.8, accuracy
    assert model.metadata.metadata["class_names"] == [str(i) for i in range(10)]
    assert model.metadata.metadata["input"].startswith("float32 images (N, 1, 8, 8), pixel values 0..16")


def test_report_writes_offline_html_and_pngs_and_logs_them_on_the_parent_run(
    done: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    out = done["work"] / "report-out"
    assert main(["report", str(QUICKSTART), *done["opts"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.html") in printed and "fit:" in printed
    html = (out / "report.html").read_text()
    for title in ("Optimization History Plot", "Intermediate Values Plot", "Parallel Coordinate Plot",
                  "Hyperparameter Importances", "Slice Plot", "Epochs spent per trial, by outcome", "Fit diagnosis"):
        assert title in html, title
    assert html.count("Plotly.newPlot") >= 7
    assert not re.search(r"<script[^>]+src=", html), "plotly.js must be inlined so the file opens offline"
    assert len(html) > 1_000_000  # plotly.js itself
    study, client = done["study"], done["client"]
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    table = html[html.index("id='fit-diagnosis'"):]
    for t in completed:
        label = client.get_run(t.user_attrs["mlflow_run_id"]).data.tags["fit_diagnosis"]
        assert f"<tr><td>{t.number}</td>" in table and f">{label}</td>" in table
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["epochs_by_outcome.png", "intermediate_values.png", "optimization_history.png",
                    "param_importances.png"]
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    parent = study.user_attrs["mlflow_parent_run_id"]
    logged = sorted(a.path for a in client.list_artifacts(parent, "plots"))
    assert logged == [f"plots/{n}" for n in pngs]
    assert [a.path for a in client.list_artifacts(parent, "report")] == ["report/report.html"]


def test_export_writes_an_mlflow_model_that_predicts_digits(done: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out = done["work"] / "best-model"
    assert main(["export", str(QUICKSTART), *done["opts"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"exported trial #{done['study'].best_trial.number}" in printed
    assert "input:       float32 images (N, 1, 8, 8), pixel values 0..16" in printed and "image files" not in printed
    assert (out / "MLmodel").is_file()
    images, labels = _digits(100)
    served = mlflow.pyfunc.load_model(str(out))
    predicted = served.predict(images)
    assert predicted.shape == (100,) and predicted.dtype == np.int64  # class indices, named in the metadata
    assert (predicted == labels).mean() > 0.8
    assert served.metadata.metadata["class_names"] == [str(i) for i in range(10)]
    assert "pixel values 0..16" in served.metadata.metadata["input"]
    module = mlflow.pytorch.load_model(str(out))
    with torch.no_grad():
        again = module(torch.from_numpy(images)).numpy()
    np.testing.assert_array_equal(again, predicted)
    assert main(["export", str(QUICKSTART), *done["opts"], "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists and is not an empty folder" in err and err.count("\n") == 1


def test_the_serve_command_export_prints_serves_the_model_without_an_activated_venv(
    done: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mlflow models serve` starts uvicorn by name: run from a shell whose PATH lacks the venv (not activated),
    it exits 127. The command `hpo export` prints puts the venv's scripts on PATH; run as printed, it serves."""
    out = done["work"] / "served-model"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert main(["export", str(QUICKSTART), *done["opts"], "--out", str(out)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("serve it:"))
    command = line.split("serve it:", 1)[1].split("   #", 1)[0].strip()
    assert command.endswith("--port 5001")
    port = free_port()
    log = done["work"] / "serve.log"
    with log.open("w") as sink:
        server = subprocess.Popen(["bash", "-c", command.removesuffix("5001") + str(port)], stdout=sink,
                                  stderr=subprocess.STDOUT, env={**os.environ, "PATH": "/usr/bin:/bin"},
                                  start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 180, server, log)
        images, _ = _digits(20)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = json.loads(response.read())["predictions"]
        assert served == mlflow.pyfunc.load_model(str(out)).predict(images).tolist()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_export_by_study_name_uses_the_settings_stored_with_the_study(
    done: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    out = done["work"] / "best-model-by-name"
    assert main(["export", "--study", "quickstart", *done["opts"], "--out", str(out)]) == 0, capsys.readouterr().err
    assert f"exported trial #{done['study'].best_trial.number}" in capsys.readouterr().out
    images, labels = _digits(100)
    assert (mlflow.pyfunc.load_model(str(out)).predict(images) == labels).mean() > 0.8


def test_views_refuse_a_study_that_was_never_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("report", "export", "ui", "dashboard"):
        args = [command, str(QUICKSTART), "--run-dir", str(tmp_path / "nothing")]
        assert main(args + ["--out", str(tmp_path / "o")] if command == "export" else args) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "does not exist" in err and "hpo run" in err, err
    assert not (tmp_path / "nothing" / "quickstart").exists()


def test_a_report_without_complete_trials_says_what_it_left_out_and_warns_nothing(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from search.report import write_report

    study = optuna.create_study(direction="maximize")
    lr = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    for value in (0.01, 0.02):
        study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, params={"lr": value}, distributions=lr,
                                                  intermediate_values={0: 0.3, 1: 0.4}, user_attrs={"epochs_run": 2}))
    report = write_report(study, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "report", log_to_mlflow=False)
    assert sorted(p.name for p in report.pngs) == ["epochs_by_outcome.png", "intermediate_values.png"]
    page = report.html.read_text()
    assert "Not drawn: needs 2 complete trials; the study has 0" in page
    assert page.count("Not drawn: needs 1 complete trial; the study has 0") == 3
    err = capfd.readouterr().err
    assert "does not contain completed trials" not in err and "Warning" not in err, err


def test_a_report_after_a_resume_with_another_max_epochs_counts_and_judges_with_the_latest_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A short first run, resumed with more epochs: the report's fit rules use the latest run's budget (the
    account once read '6 spent of 4 (2 trials x 2)'), and its epoch account counts each trial against the
    budget it trained under: 2 epochs for the first run's trial, 5 for the second's."""
    opts = ["--run-dir", str(tmp_path / "runs")]
    for trials, epochs in ((1, 2), (2, 5)):
        assert main(["run", str(QUICKSTART), *opts, "--trials", str(trials), "--set", f"study.max_epochs={epochs}",
                     "--set", "early_stopping.enabled=false", "--quiet"]) == 0, capsys.readouterr().err
    assert main(["report", str(QUICKSTART), *opts, "--no-mlflow"]) == 0, capsys.readouterr().err
    page = (tmp_path / "runs" / "quickstart" / "report" / "report.html").read_text()
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp_path / 'runs/quickstart/optuna.db'}")
    acc = epoch_account(study.trials, 5)
    assert (acc.spent, acc.full) == (2 + 5, 2 + 5)
    assert f"Epochs: {acc.spent} spent of {acc.full} (2 trials of 2 to 5 epochs)" in page
    assert "2-epoch budget" not in page and "max_epochs = 5" in page
