"""Tables of trials for `hpo status`, `hpo best` and the end-of-run summary."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def trial_row(t: FrozenTrial) -> dict[str, Any]:
    attrs = t.user_attrs
    ended = ""
    if attrs.get("pruned_epoch") is not None:
        ended = f"pruned at {attrs['pruned_epoch']}"
    elif attrs.get("early_stopped"):
        ended = f"stopped at {attrs.get('stopped_epoch')}"
    return {
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "epochs": attrs.get("epochs_run"),
        "ended": ended,
        "reason": attrs.get("reason", ""),
        "params": dict(t.params),
        "mlflow_run_id": attrs.get("mlflow_run_id"),
    }


def counts(study: optuna.Study) -> dict[str, int]:
    out = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] += 1
    return out


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


def study_table(study: optuna.Study) -> str:
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = trial_row(t)
        row["params"] = " ".join(f"{k}={_fmt(v)}" for k, v in row["params"].items())
        rows.append(row)
    return format_table(rows, ["number", "state", "value", "epochs", "ended", "params"])


def epochs_spent(study: optuna.Study) -> int:
    return sum(int(t.user_attrs.get("epochs_run", 0) or 0) for t in study.get_trials(deepcopy=False))
