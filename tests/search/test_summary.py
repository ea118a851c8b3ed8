"""The run's summary line and `hpo status`: failed trials, why, and which were retried (so not a result lost)."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from search import records
from search.optuna_adapter import stored_trial
from search.summary import failed_text
from search.watch import status_text
from search.workers import retry


def test_failed_trials_say_how_many_were_retried() -> None:
    study = optuna.create_study(direction="maximize")
    assert failed_text(study.trials) == "0 failed"
    done = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(done, 0.5)
    interrupted = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(interrupted, state=TrialState.FAIL)
    retry(study, stored_trial(interrupted))  # as Ctrl-C does: the same params re-enqueued, to resume
    broken = study.ask()  # the retry (WAITING) is asked first
    assert optuna.storages.RetryFailedTrialCallback.retried_trial_number(stored_trial(broken)) == interrupted.number
    study.tell(broken, state=TrialState.FAIL)  # the retry fails for good: nobody retries it
    assert failed_text(study.trials) == "2 failed, 1 of them retried"


def test_status_says_why_a_trial_failed_and_which_trial_retries_it() -> None:
    study = optuna.create_study(direction="maximize")
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    broken = study.ask(x)
    broken.set_user_attr(records.REASON, "error: ModelError: model 'mine' returns a value of type tuple in "
                                         "training mode; the training loop needs the logits tensor only")
    study.tell(broken, state=TrialState.FAIL)
    interrupted = study.ask(x)
    interrupted.set_user_attr(records.REASON, "interrupted")
    study.tell(interrupted, state=TrialState.FAIL)
    retry(study, stored_trial(interrupted))  # re-enqueued as trial 2, WAITING
    rows = status_text(study).splitlines()
    assert "  ModelError: model 'mine' returns a value of type tuple in...  x=" in rows[2]  # 60 characters
    assert "error:" not in rows[2]
    assert "  interrupted (retried as #2)  " in rows[3]
    assert rows[4].startswith("2       WAITING")
    assert rows[-1] == "0 complete, 0 pruned, 2 failed, 1 of them retried, 0 running, 1 waiting"


def test_the_table_shows_values_as_the_progress_lines_do() -> None:
    study = optuna.create_study(direction="maximize")
    for value in (1.0, 0.993, 0.0):
        study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=value))
    values = [row.split()[2] for row in status_text(study).splitlines()[2:5]]
    assert values == ["1.0000", "0.9930", "0.0000"]


def test_a_running_trial_whose_worker_is_gone_says_so() -> None:
    """After a kill -9 the storage says RUNNING until the next run retries it; the table says why it will."""
    import subprocess
    import sys

    from search.workers import identity

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # exited and reaped: its pid names no process
    study = optuna.create_study(direction="maximize")
    dead, alive = study.ask(), study.ask()
    dead.set_user_attr("host", identity()["host"])
    dead.set_user_attr("pid", gone.pid)
    for key, value in identity().items():  # this process: alive
        alive.set_user_attr(key, value)
    rows = status_text(study).splitlines()
    assert "RUNNING" in rows[2] and "worker gone; the next run retries it" in rows[2]
    assert "RUNNING" in rows[3] and "worker gone" not in rows[3]
