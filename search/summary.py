"""Tables of trials for `hpo status`, `hpo best` and the end-of-run summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import records
from search.records import fmt
from search.workers import is_local_orphan


def trial_row(t: FrozenTrial) -> dict[str, Any]:
    attrs = t.user_attrs
    return {
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "epochs": records.epochs_shown(t),
        "ended": records.ended_at(t),
        "reason": attrs.get(records.REASON, ""),
        "params": dict(t.params),
        "mlflow_run_id": attrs.get(records.MLFLOW_RUN_ID),
    }


def counts(study: optuna.Study) -> dict[str, int]:
    return state_counts(study.get_trials(deepcopy=False))


def state_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Trials per state name, every state present (a progress line counts a part of the study)."""
    out = {s.name: 0 for s in TrialState}
    for t in trials:
        out[t.state.name] += 1
    return out


def retries_of(trials: Sequence[FrozenTrial]) -> dict[int | None, int]:
    """Failed trial number -> the number of the trial that retries it (Optuna's retry history)."""
    return {optuna.storages.RetryFailedTrialCallback.retried_trial_number(t): t.number for t in trials}


def failed_counts(trials: Sequence[FrozenTrial], everything: Sequence[FrozenTrial] | None = None) -> tuple[int, int]:
    """(failed trials, how many of them were re-enqueued): a failed trial whose retry resumes it (Ctrl-C, a dead
    worker, an out-of-memory pack) is not a result lost, and a summary or progress line that said only "1 failed"
    after a Ctrl-C read as one. Takes the study's trials, read once by the caller; ``everything`` (default:
    ``trials``) is where the retries are looked for when ``trials`` is a part of the study."""
    retried = retries_of(everything or trials)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    return len(failed), sum(t.number in retried for t in failed)


def failed_text(trials: Sequence[FrozenTrial]) -> str:
    """'2 failed', or '2 failed, 1 of them retried' (the run's summary line)."""
    failed, again = failed_counts(trials)
    return f"{failed} failed" + (f", {again} of them retried" if again else "")


def failed_short(trials: Sequence[FrozenTrial], everything: Sequence[FrozenTrial] | None = None) -> str:
    """'failed 2', or 'failed 2 (1 retried)' (the progress lines)."""
    failed, again = failed_counts(trials, everything)
    return f"failed {failed}" + (f" ({again} retried)" if again else "")


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


def value_text(value: float | None) -> str:
    """A trial's value as the progress lines and the best-trial line show it (0.9930, not 0.993 or 1)."""
    if value is None:
        return ""
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.4g}"


def study_table(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    retries = retries_of(trials)
    rows = []
    for t in trials:
        row = trial_row(t)
        row["params"] = " ".join(f"{k}={fmt(v)}" for k, v in row["params"].items())
        row["value"] = value_text(row["value"])
        if t.state == TrialState.FAIL and t.number in retries:
            row["ended"] += f" (retried as #{retries[t.number]})"
        if is_local_orphan(t):  # killed (kill -9, a crash): the storage still says RUNNING until a run retries it
            row["ended"] = "worker gone; the next run retries it"
        rows.append(row)
    return format_table(rows, ["number", "state", "value", "epochs", "ended", "params"])
