"""The run's summary line: failed trials, and how many of them were retried (so not a result lost)."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from search.optuna_adapter import stored_trial
from search.summary import failed_text
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
