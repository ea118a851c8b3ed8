"""Every use of Optuna's private API, in one module, so an Optuna upgrade means reading one file.

Checked against Optuna 5.0.0 (``CHECKED_AGAINST``; ``tests/search/test_optuna_adapter.py`` covers each
function on a real SQLite storage). Public API is used wherever it exists: ``study.tell(...,
skip_if_finished=True)``, ``optuna.storages.fail_stale_trials``, ``RetryHeartbeatStaleTrialCallback``.
What is left needs the storage itself: a live trial's stored record (to see which trials it retries) and
an atomic "fail this RUNNING trial unless someone else finished it" with a reason attached first.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

CHECKED_AGAINST = "5.0.0"


def stored_trial(trial: optuna.Trial) -> FrozenTrial:
    """The storage's record of a live trial (system attrs included, which ``optuna.Trial`` does not expose)."""
    return trial.study._storage.get_trial(trial._trial_id)


def heartbeat_enabled(study: optuna.Study) -> bool:
    """Whether the study's storage runs Optuna's heartbeat (RDB storages opened with heartbeat_interval)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def fail_running(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Record ``reason`` and move a RUNNING trial to FAIL; False when another worker finished it first.

    ``study.tell`` cannot do this: it sets no attribute, and with ``skip_if_finished`` it does not say
    whether this call or another one ended the trial, which decides who enqueues the retry.
    """
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "reason", reason)
        return bool(storage.set_trial_state_values(trial._trial_id, TrialState.FAIL))
    except RuntimeError:  # "has already finished and can not be updated"
        return False
