"""search/publish.py's note writer: optuna-dashboard's own note format, without importing its web app."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
import optuna
from search.publish import note_writer

optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(storage="sqlite:///{db}", study_name="s")
trial = study.ask()
save = note_writer()
save(study, "# study note\\n" + "x" * 5000)  # longer than one system attr: the dashboard splits it
save(trial, "trial note, first")
save(trial, "trial note, second")
study.tell(trial, 1.0)
light = [m for m in ("optuna_dashboard", "optuna_dashboard._app", "sklearn") if m in sys.modules]
assert not light, f"the note writer imported {{light}}"

import optuna_dashboard  # the real package, as `hpo dashboard` imports it later in a process
from optuna_dashboard import get_note

assert optuna_dashboard.save_note is save, "the package did not reuse the note module already loaded"
again = optuna.load_study(storage="sqlite:///{db}", study_name="s")
assert get_note(again) == "# study note\\n" + "x" * 5000, get_note(again)
trial = optuna.trial.Trial(again, again.trials[0]._trial_id)
assert get_note(trial) == "trial note, second", get_note(trial)
"""


def test_notes_written_without_the_dashboard_package_are_the_dashboard_s_own(tmp_path: Path) -> None:
    """The note writer loads optuna-dashboard's note module alone (no web app, no scikit-learn, about 1 s of a
    run's start-up); the notes it writes, a study note longer than one attribute and a trial note saved twice,
    read back through the real package's ``get_note``, which reuses that same module once imported."""
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(db=tmp_path / "optuna.db")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr


def test_once_the_dashboard_package_is_loaded_its_own_save_note_is_used() -> None:
    """In a process that imported optuna-dashboard already (this test session does, through other tests), the
    writer is the package's function itself."""
    import optuna_dashboard

    from search.publish import note_writer

    note_writer.cache_clear()
    try:
        assert note_writer() is optuna_dashboard.save_note
    finally:
        note_writer.cache_clear()
