"""The resume checkpoint through `hpo run` on digits: how often last.pt is written (checkpoint_every) decides where an
interrupted trial's retry goes on, and an unreadable last.pt is reported and the retry starts again from epoch 0.

The trial is interrupted at a known epoch without timing: the model (tests/search/faulty_model.py) sends SIGTERM to
its own process at the start of epoch 3, as a scheduler stopping the job would, so epochs 0, 1 and 2 are done."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from optuna_dashboard import get_note

from tests.search.failure_helpers import faulty_study
from tests.search.workers_helpers import child_runs, hpo, load

pytestmark = pytest.mark.slow

EPOCHS = 5


def _interrupt(tmp_path: Path, name: str, checkpoint_every: int) -> Path:
    """Run the study until its model stops it at epoch 3; return the study file."""
    study_file = faulty_study(tmp_path, name, ["sigterm"], n_trials=1, max_epochs=EPOCHS,
                              checkpoint_every=checkpoint_every, at_epoch=3)
    out = hpo("run", str(study_file), "--quiet", cwd=tmp_path)
    assert out.returncode == 130, out.stderr
    study, _ = load(tmp_path / "runs" / name, name)
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL and first.user_attrs["reason"] == "interrupted"
    assert sorted(first.intermediate_values) == [0, 1, 2]
    assert retry.state == TrialState.WAITING
    return study_file


def test_checkpoint_every_0_writes_no_resume_checkpoint(tmp_path: Path) -> None:
    # Its retry would start from epoch 0, as after a corrupt last.pt (tested below).
    _interrupt(tmp_path, "every0", 0)
    assert not (tmp_path / "runs" / "every0" / "checkpoints" / "trial-0" / "last.pt").exists()


def test_checkpoint_every_2_resumes_from_the_last_epoch_it_saved(tmp_path: Path) -> None:
    # last.pt is written after epoch e when (e + 1) % 2 == 0: after epochs 0-2 it holds epoch 1, not 2, and the
    # retry goes on at epoch 2.
    study_file = _interrupt(tmp_path, "every2", 2)
    last = tmp_path / "runs" / "every2" / "checkpoints" / "trial-0" / "last.pt"
    assert torch.load(last, weights_only=False)["epoch"] == 1
    again = hpo("run", str(study_file), "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    study, client = load(tmp_path / "runs" / "every2", "every2")
    _assert_retry_ran_every_epoch_once(study, client, 2)
    assert study.get_trials()[1].user_attrs["retry_of"] == 0
    note = get_note(optuna.trial.Trial(study, study.get_trials()[1]._trial_id))
    assert "## Trial 1: COMPLETE" in note
    assert "**Retry of trial #0**: resumed from its checkpoint, training from epoch 2 on" in note


def test_a_corrupt_last_checkpoint_is_reported_and_the_retry_starts_from_epoch_0(tmp_path: Path) -> None:
    study_file = _interrupt(tmp_path, "corrupt", 1)
    last = tmp_path / "runs" / "corrupt" / "checkpoints" / "trial-0" / "last.pt"
    assert torch.load(last, weights_only=False)["epoch"] == 2
    last.write_bytes(b"not a checkpoint: the disk filled up while it was written")
    again = hpo("run", str(study_file), "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"not resuming from {last}" in again.stderr
    study, client = load(tmp_path / "runs" / "corrupt", "corrupt")
    _assert_retry_ran_every_epoch_once(study, client, None)
    retry = study.get_trials()[1]
    assert retry.user_attrs["retry_of"] == 0
    note = get_note(optuna.trial.Trial(study, retry._trial_id))
    assert "**Retry of trial #0**: with its params, trained from epoch 0" in note


def _assert_retry_ran_every_epoch_once(study, client, resumed_at: int | None) -> None:  # noqa: ANN001
    """The retry completed with the interrupted trial's params; it went on at ``resumed_at`` (None: from epoch 0),
    and each epoch is in Optuna and in the retry's MLflow run exactly once: nothing lost, nothing twice."""
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL and sorted(first.intermediate_values) == [0, 1, 2]  # kept as it was
    assert retry.state == TrialState.COMPLETE and retry.params == first.params
    assert retry.user_attrs.get("resumed_at_epoch") == resumed_at
    assert retry.user_attrs.get("resumed_from_trial") == (None if resumed_at is None else 0)
    assert retry.user_attrs["epochs_run"] == EPOCHS and sorted(retry.intermediate_values) == list(range(EPOCHS))
    runs = {r.info.run_id: r for r in child_runs(client, study.study_name)}
    assert runs[first.user_attrs["mlflow_run_id"]].info.status == "KILLED"
    assert runs[retry.user_attrs["mlflow_run_id"]].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(retry.user_attrs["mlflow_run_id"], "val_accuracy")]
    assert sorted(steps) == list(range(EPOCHS))


def test_an_interrupted_trial_has_a_dashboard_note_with_its_mlflow_link(tmp_path: Path) -> None:
    """Ctrl-C publishes no curves, but the trial's page must not be blank: its note says it was interrupted, that
    the next run retries it, and links its (KILLED) MLflow run."""
    _interrupt(tmp_path, "noted", 1)
    study, _ = load(tmp_path / "runs" / "noted", "noted")
    first = study.get_trials()[0]
    note = get_note(optuna.trial.Trial(study, first._trial_id))
    assert "## Trial 0: FAIL" in note
    assert f"**Ended:** interrupted (Ctrl-C or SIGTERM): 3 of {EPOCHS} epochs; reason `interrupted`." in note
    assert "The next `hpo run` of the study retries it" in note
    assert f"[MLflow run trial-0]({first.user_attrs['mlflow_run_url']})" in note
