"""The whole user path: `hpo run` on the quickstart study, checked through Optuna's and MLflow's own APIs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "studies" / "quickstart.toml"

pytestmark = pytest.mark.slow


def hpo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run 12 trials (the README's claim: pruned and early-stopped trials both show), then resume to 14."""
    work = tmp_path_factory.mktemp("quickstart")
    first = hpo("run", str(QUICKSTART), "--trials", "12", cwd=work)
    assert first.returncode == 0, first.stderr
    root = work / "runs" / "quickstart"
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{root / 'optuna.db'}")
    first_numbers = [t.number for t in study.trials]
    resumed = hpo("run", str(QUICKSTART), "--trials", "14", cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    again = hpo("run", str(QUICKSTART), "--trials", "14", cwd=work)
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{root / 'optuna.db'}")
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return {"work": work, "root": root, "first": first, "resumed": resumed, "again": again, "study": study,
            "client": client, "first_numbers": first_numbers}


def _runs(q: dict) -> tuple[object, list]:
    client = q["client"]
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None
    return experiment, client.search_runs([experiment.experiment_id], max_results=1000)


def test_budget_counts_finished_trials_and_resume_tops_up(quickstart: dict) -> None:
    study = quickstart["study"]
    states = [t.state for t in study.trials]
    assert len(quickstart["first_numbers"]) == 12
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 14
    assert TrialState.RUNNING not in states
    assert "14 trials" in quickstart["resumed"].stderr.splitlines()[0]
    assert "0 new in this run" in quickstart["again"].stdout


def test_quickstart_ends_with_a_good_model(quickstart: dict) -> None:
    """`make run`'s first result must not read as "the tool makes my model worse": at least 99% on digits."""
    line = next(li for li in quickstart["first"].stdout.splitlines() if li.startswith("best trial #"))
    match = re.search(r"test_accuracy (\d\.\d+)", line)
    assert match is not None, line
    assert float(match.group(1)) >= 0.99, line


def test_quickstart_shows_pruned_and_early_stopped_trials(quickstart: dict) -> None:
    trials = quickstart["study"].trials[:12]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    stopped = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs["early_stopped"]]
    assert pruned, "the quickstart should prune some trials"
    assert stopped, "the quickstart should stop some trials early"
    max_epochs = 20
    for t in pruned:
        assert t.user_attrs["reason"] == "pruned"
        assert t.user_attrs["pruned_epoch"] == t.user_attrs["epochs_run"] - 1 < max_epochs - 1
        assert sorted(t.intermediate_values) == list(range(t.user_attrs["epochs_run"]))
    for t in stopped:
        assert t.user_attrs["stopped_epoch"] == t.user_attrs["epochs_run"] - 1 < max_epochs - 1
        assert t.user_attrs["reason"].startswith("early_stopped")


def test_trial_value_is_metric_at_restored_best_epoch(quickstart: dict) -> None:
    client = quickstart["client"]
    for t in quickstart["study"].trials:
        if t.state != TrialState.COMPLETE:
            continue
        best_epoch = t.user_attrs["best_epoch"]
        assert t.value == pytest.approx(t.intermediate_values[best_epoch])
        # val_accuracy (the monitor, min_delta 0.002) was not beaten by more than min_delta after the best epoch
        run_id = t.user_attrs["mlflow_run_id"]
        history = {m.step: m.value for m in client.get_metric_history(run_id, "val_accuracy")}
        assert all(v <= history[best_epoch] + 0.002 for e, v in history.items() if e > best_epoch)
        assert all(v < history[best_epoch] for e, v in history.items() if e < best_epoch)
        checkpoint = torch.load(t.user_attrs["checkpoint"], weights_only=True)
        assert checkpoint["epoch"] == best_epoch
        assert checkpoint["metrics"]["val_accuracy"] == pytest.approx(t.value)


def test_mlflow_layout_matches_optuna(quickstart: dict) -> None:
    client, study = quickstart["client"], quickstart["study"]
    _, runs = _runs(quickstart)
    parents = [r for r in runs if r.data.tags.get("hpo.role") == "study"]
    assert len(parents) == 1, "one parent run shared by every `hpo run` of the study"
    parent = parents[0]
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert parent.info.status == "FINISHED"
    children_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    # RUNNING from the first `hpo run` until the last one ended (reopened by the resumes): its duration is the study's
    assert parent.info.start_time <= min(r.info.start_time for r in children_runs)
    assert parent.info.end_time >= max(r.info.end_time for r in children_runs)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's model-training view
    assert parent.data.params["pruner"].startswith('{"name":"median"')
    assert 0.5 < parent.data.metrics["best_test_accuracy"] <= 1.0
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    children = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(children) == len(study.trials) == len(runs) - 1
    for t in study.trials:
        run = children[t.user_attrs["mlflow_run_id"]]
        assert run.info.run_name == f"trial-{t.number}"
        assert run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.data.tags["optuna.state"] == t.state.name
        assert run.data.tags["early_stopped"] == str(t.user_attrs["early_stopped"]).lower()
        assert run.info.status == "FINISHED"
        assert set(t.params) <= set(run.data.params)
        assert run.data.params["config.dataset"] == "digits"
        for key in ("train_loss", "val_loss", "val_accuracy", "lr", "epoch_seconds", "images_per_second"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(t.user_attrs["epochs_run"])), key
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
        if t.state == TrialState.COMPLETE:
            assert artifacts == ["checkpoints/best.pt"]
            assert run.data.metrics["best_val_accuracy"] == pytest.approx(t.value)
            assert run.data.metrics["best_epoch"] == t.user_attrs["best_epoch"]
            local = client.download_artifacts(run.info.run_id, "checkpoints/best.pt", str(quickstart["work"]))
            ckpt = torch.load(local, weights_only=True)
            assert {"model_spec", "state_dict", "settings"} <= set(ckpt)
        else:
            assert artifacts == []


def test_run_prints_where_results_are_and_how_to_open_them(quickstart: dict) -> None:
    out = quickstart["first"].stdout
    root = quickstart["root"]
    assert f"sqlite:///{root / 'optuna.db'}" in out
    assert f"sqlite:///{root / 'mlflow.db'}" in out
    assert f"hpo dashboard {QUICKSTART}" in out
    assert f"hpo ui {QUICKSTART}" in out
    assert f"hpo export {QUICKSTART} --out best-model" in out  # a model was logged: it can be exported
    assert "best trial #" in out and "test_accuracy" in out
    assert "trial   0" in quickstart["first"].stderr  # progress lines
    assert "\r" not in quickstart["first"].stderr and "\x1b" not in quickstart["first"].stderr  # no bars in a pipe


def test_status_and_best_read_the_same_study(quickstart: dict) -> None:
    import json

    status = hpo("status", str(QUICKSTART), "--json", cwd=quickstart["work"])
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    study = quickstart["study"]
    assert [t["number"] for t in data["trials"]] == [t.number for t in study.trials]
    assert data["counts"]["PRUNED"] == sum(t.state == TrialState.PRUNED for t in study.trials)
    assert data["best"]["number"] == study.best_trial.number
    by_name = hpo("status", "--study", "quickstart", cwd=quickstart["work"])
    assert by_name.returncode == 0 and "PRUNED" in by_name.stdout
    best = hpo("best", str(QUICKSTART), "--json", cwd=quickstart["work"])
    info = json.loads(best.stdout)
    assert info["number"] == study.best_trial.number
    assert info["value"] == pytest.approx(study.best_value)
    assert Path(info["checkpoint"]).is_file()
    assert 0.5 < info["test_metrics"]["test_accuracy"] <= 1.0


def test_status_and_best_read_a_study_without_importing_torch_or_mlflow(quickstart: dict) -> None:
    """They validate the study file through the objective's spec (search/plugins.py ``load_spec``), not the
    objective, whose module imports torch and MLflow: about 1.8 s of each command's 2.4-3.3 s before."""
    code = ("import json, sys\nfrom search.cli import main\n"
            f"codes = [main(['status', {str(QUICKSTART)!r}]), main(['best', {str(QUICKSTART)!r}])]\n"
            "print(json.dumps([codes, [m for m in ('torch', 'mlflow') if m in sys.modules]]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=quickstart["work"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    codes, loaded = json.loads(done.stdout.splitlines()[-1])
    assert codes == [0, 0] and loaded == []
