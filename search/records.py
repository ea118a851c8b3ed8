"""What hpo stores on Optuna trials and studies (user attributes), and the readers every view shares.

The keys are the interface between the run that writes them (``session.py``, ``study.py``, ``publish.py``)
and everything that reads them later (status, best, report, notes, compare, the dashboard), possibly from
another machine or version, so they are spelled once, here. Readers answer the questions the views ask:
how a trial ended, how many epochs it ran, the test metrics of the best trial, how a value is shown.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.failures import ERROR_PREFIX

# --- trial attributes ---------------------------------------------------------------------------------------
MLFLOW_RUN_ID = "mlflow_run_id"
MLFLOW_RUN_URL = "mlflow_run_url"
CHECKPOINT = "checkpoint"  # the best (or last) weights: checkpoints/trial-N/best.pt, absolute
BEST_EPOCH = "best_epoch"  # the epoch whose weights and value the trial keeps
EPOCHS_RUN = "epochs_run"
TRIAL_MAX_EPOCHS = "max_epochs"  # the epoch budget this attempt trained under (a later run may set another)
PRUNED_EPOCH = "pruned_epoch"
STOPPED_EPOCH = "stopped_epoch"
EARLY_STOPPED = "early_stopped"
REASON = "reason"  # completed | pruned | nan_loss | early_stopped:<why> | out_of_memory | trial_timeout | interrupted
#   | pack_interrupted (trial packing: another member's trial_timeout cut the pack's epoch short) | worker_died
#   | stale_heartbeat | stale_recovered | error: ...  (MLflow hpo.reason also: taken_over, storage_lost)
RESUMED_FROM_TRIAL = "resumed_from_trial"
RESUMED_AT_EPOCH = "resumed_at_epoch"
RETRY_OF = "retry_of"  # a retry (of an interrupted or dead attempt): the attempt it retries, resumed or not
OOM_BATCH_SIZE = "oom_batch_size"
PACKED_WITH = "packed_with"  # trial packing: the trial numbers in its pack when it joined, itself included
OOM_PACK_SIZE = "oom_pack_size"  # trial packing: the pack ran out of memory at this size; retried in a smaller one
FIT_DIAGNOSIS = "fit_diagnosis"
REPLAYED_FROM = "replayed_from"  # replays (hpo compare --replay): the source trial
REPLAY_SECONDS = "replay_seconds"  # replays: the recorded seconds of the epochs replayed
ERROR_AT = "error_at"  # a trial failed by an error: where it was raised (failures.error_site)
# One attempt's own record: a retry starts without these (search/workers.py ``retry``) and writes its own.
PER_ATTEMPT = (MLFLOW_RUN_ID, MLFLOW_RUN_URL, CHECKPOINT, BEST_EPOCH, EPOCHS_RUN, PRUNED_EPOCH, STOPPED_EPOCH,
               EARLY_STOPPED, REASON, RESUMED_FROM_TRIAL, RESUMED_AT_EPOCH, OOM_BATCH_SIZE, PACKED_WITH, OOM_PACK_SIZE,
               FIT_DIAGNOSIS, ERROR_AT, RETRY_OF, TRIAL_MAX_EPOCHS)

# --- study attributes ---------------------------------------------------------------------------------------
PARENT_RUN_ID = "mlflow_parent_run_id"  # the study's MLflow parent run
STUDY_ID = "hpo.study_id"  # set once; the run directory's stamp names it (search/run_dir.py)
FINGERPRINT = "hpo.fingerprint"  # direction, metric, space, objective settings, data: what a resume must keep
SETTINGS = "hpo.settings"  # the study file's settings but [objective], as JSON
OBJECTIVE = "hpo.objective"  # the [objective] section, as JSON
BUDGET = "hpo.n_trials"  # the trial budget of the latest run; `hpo status --watch` stops when it is met
MAX_EPOCHS = "hpo.max_epochs"  # the per-trial epoch budget of the latest run (a resume may change it): the report's
#   epoch account and fit rules use it, as the study note does
TEST_METRICS = "hpo.test_metrics"  # the best trial's test metrics ...
TEST_SCORED_TRIAL = "hpo.test_scored_trial"  # ... valid while this is still the best trial's number
MODEL_TRIAL = "hpo.model_trial"  # the trial whose model was logged and registered


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


def epochs_run(t: FrozenTrial) -> int:
    """The epochs the trial reached, resumed ones included (what its curves and checkpoints span)."""
    return int(t.user_attrs.get(EPOCHS_RUN) or 0)


def steps_reached(t: FrozenTrial) -> int:
    """The epochs a trial's reported steps reach (a step is an epoch, from 0); 0 before its first report."""
    return max(t.intermediate_values) + 1 if t.intermediate_values else 0


def epochs_shown(t: FrozenTrial) -> int | None:
    """What the tables show as a trial's epochs: its recorded count, or for a running trial (it records its
    count at its end) how far its reported steps reach, a resumed retry's with its predecessor's; None if
    neither is known (a waiting trial)."""
    if t.user_attrs.get(EPOCHS_RUN) is not None:
        return int(t.user_attrs[EPOCHS_RUN])
    if t.state == TrialState.RUNNING and t.intermediate_values:
        return steps_reached(t)
    return None


def epochs_trained(t: FrozenTrial) -> int:
    """The epochs this attempt trained itself: those it reached less those it resumed from an earlier attempt's
    checkpoint, which that attempt counts. Summed over a study's trials, every trained epoch counts once."""
    return max(epochs_run(t) - int(t.user_attrs.get(RESUMED_AT_EPOCH) or 0), 0)


def outcome(t: FrozenTrial) -> str:
    """One word for how a trial ended: completed, early stopped, pruned, failed, running."""
    if t.state == TrialState.COMPLETE:
        return "early stopped" if t.user_attrs.get(EARLY_STOPPED) else "completed"
    return {TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}.get(t.state, t.state.name.lower())


REASON_SHOWN = 60  # characters of a failed trial's reason in the tables; `--json` has all of it


def is_error(reason: str) -> bool:
    """Whether a recorded reason is an error raised in the trial (its record has ``error_at``, its run error.txt)."""
    return reason.startswith(ERROR_PREFIX)


def reason_text(reason: str) -> str:
    """A recorded reason as words: without the "error: " that failures.failure_reason puts before an error."""
    return reason.removeprefix(ERROR_PREFIX)


def ended_at(t: FrozenTrial) -> str:
    """"pruned at E" or "stopped at E" (epochs count from 0), a failed trial's reason (so the table says why
    without --json), or "" for a trial that ran its course."""
    attrs = t.user_attrs
    if t.state == TrialState.FAIL:
        reason = reason_text(str(attrs.get(REASON) or "failed"))
        return reason if len(reason) <= REASON_SHOWN else reason[:REASON_SHOWN - 3] + "..."
    if attrs.get(PRUNED_EPOCH) is not None:
        return f"pruned at {attrs[PRUNED_EPOCH]}"
    if attrs.get(EARLY_STOPPED):
        return f"stopped at {attrs.get(STOPPED_EPOCH)}"
    return ""


def test_metrics(study: optuna.Study, best: FrozenTrial | None = None) -> dict[str, float]:
    """The best trial's test metrics, or {} when none were scored for the trial that is best now."""
    best = best if best is not None else best_trial(study)
    attrs: Mapping[str, Any] = study.user_attrs
    if best is None or attrs.get(TEST_SCORED_TRIAL) != best.number:
        return {}
    return {k: float(v) for k, v in attrs.get(TEST_METRICS, {}).items()}


def fmt(value: Any) -> str:
    """A value as the tables show it: floats to 4 significant digits, None as nothing."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
