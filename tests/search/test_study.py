"""The study's time budget through `hpo run` on digits: `study.timeout` alone (no trial budget) and `--timeout` over
the file's. A timeout stops the starting of new trials; the trial under way finishes. The assertions hold however
fast the machine is: the first trial always starts (no time has passed), and 50 trials never fit in one second."""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import TrialState

from search.study import differences
from tests.search.workers_helpers import QUICKSTART, hpo, load

pytestmark = pytest.mark.slow

SMALL = ["--set", "study.max_epochs=2", "--set", "objective.widths=[8,16]", "--quiet"]


def _finished(root: Path, name: str) -> int:
    study, _ = load(root / "runs" / name, name)
    states = [t.state for t in study.get_trials()]
    assert set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}  # none left RUNNING, none failed
    return len(states)


def test_a_study_whose_only_budget_is_a_timeout_runs_until_it_is_up(tmp_path: Path) -> None:
    text = QUICKSTART.read_text()
    assert "\nn_trials = 12 " in text
    study_file = tmp_path / "timed.toml"
    study_file.write_text(text.replace("\nn_trials = 12 ", "\ntimeout = 1 "))  # no n_trials: as many as fit
    out = hpo("run", str(study_file), "--set", "study.name='timed'", *SMALL, cwd=tmp_path)
    assert out.returncode == 0, out.stderr  # it ends at all: without the timeout it would never stop
    assert "budget trials of 2 epochs, started for 1 s" in out.stderr
    assert _finished(tmp_path, "timed") >= 1
    study, _ = load(tmp_path / "runs" / "timed", "timed")
    assert study.user_attrs["hpo.n_trials"] is None


def test_timeout_option_overrides_the_file_and_stops_before_the_trial_budget(tmp_path: Path) -> None:
    out = hpo("run", str(QUICKSTART), "--set", "study.name='cut'", "--set", "study.timeout=3600", "--trials", "50",
              "--timeout", "1", *SMALL, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "budget 50 trials x 2 epochs, started for 1 s" in out.stderr
    assert 1 <= _finished(tmp_path, "cut") < 50


def test_a_changed_data_set_is_named_in_words_in_the_study_s_differences() -> None:
    old = {"data": {"classes": 3, "train_images": 26, "val_images": 3, "test_images": 7, "digest": "a"}}
    grown = {"data": {**old["data"], "train_images": 31, "digest": "b"}}
    moved = {"data": {**old["data"], "digest": "c"}}
    assert differences(old, old) == []
    assert differences(old, grown) == ["data (its images changed: 26/3/7 train/val/test images of 3 classes there, "
                                       "31/3/7 of 3 now; the old trials were scored on other validation images)"]
    assert "the same 26/3/7 train/val/test images of 3 classes, not of the same classes" in differences(old, moved)[0]
