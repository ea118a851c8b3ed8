"""Markdown notes for optuna-dashboard: one per study (budget, epochs, best trial, how to reproduce), one per trial.

Pure text from plain data (frozen trials, settings dicts), so what the dashboard shows is unit-tested; the
one function that writes them to the storage lives in ``search/publish.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from search.records import (
    BEST_EPOCH,
    EARLY_STOPPED,
    EPOCHS_RUN,
    ERROR_AT,
    MLFLOW_RUN_URL,
    PRUNED_EPOCH,
    REASON,
    RESUMED_AT_EPOCH,
    RESUMED_FROM_TRIAL,
    RETRY_OF,
    STOPPED_EPOCH,
    TRIAL_MAX_EPOCHS,
    epochs_run,
    epochs_trained,
    fmt,
    is_error,
    outcome,
)


@dataclass(frozen=True)
class EpochAccount:
    """Where the epoch budget went: ``full`` is what every ended trial would have cost without stopping early; it
    is ``spent`` + the savings + ``unused_by_failures`` + ``resumed`` (epochs a retry took from its predecessor's
    checkpoint instead of training them again)."""

    trials: int
    spent: int
    full: int
    saved_by_pruning: int
    saved_by_early_stopping: int
    pruned: int
    early_stopped: int
    unused_by_failures: int
    resumed: int = 0
    budgets: tuple[int, ...] = ()  # the distinct epoch budgets of the ended trials, ascending (else the given one)

    @property
    def per_trial(self) -> str:
        """How ``full`` is made: "12 trials x 20 epochs", or with budgets that differ "12 trials of 10 to 20 epochs"."""
        if len(self.budgets) > 1:
            return f"{self.trials} trials of {self.budgets[0]} to {self.budgets[-1]} epochs"
        return f"{self.trials} trials x {self.budgets[0]} epochs"


def epoch_account(trials: Sequence[FrozenTrial], max_epochs: int) -> EpochAccount:
    """Count epochs of ended trials (running ones are left out: their budget is not decided yet). Each trial is
    counted against the epoch budget it trained under (``TRIAL_MAX_EPOCHS``: a resumed study may have changed it),
    ``max_epochs`` where it has none (trials of an older hpo, replays)."""
    ended = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]

    run = epochs_run

    def budget(t: FrozenTrial) -> int:
        return int(t.user_attrs.get(TRIAL_MAX_EPOCHS) or max_epochs)

    def left(ts: list[FrozenTrial]) -> int:
        return sum(max(budget(t) - run(t), 0) for t in ts)

    pruned = [t for t in ended if t.state == TrialState.PRUNED]
    stopped = [t for t in ended if outcome(t) == "early stopped"]
    failed = [t for t in ended if t.state == TrialState.FAIL]
    return EpochAccount(
        trials=len(ended), spent=sum(epochs_trained(t) for t in ended), full=sum(budget(t) for t in ended),
        saved_by_pruning=left(pruned), saved_by_early_stopping=left(stopped),
        pruned=len(pruned), early_stopped=len(stopped), unused_by_failures=left(failed),
        resumed=sum(run(t) - epochs_trained(t) for t in ended),
        budgets=tuple(sorted({budget(t) for t in ended})) or (max_epochs,),
    )


def _pct(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "n/a"


def study_note(
    study_name: str,
    trials: Sequence[FrozenTrial],
    settings: Mapping[str, Any],
    best: FrozenTrial | None,
    test_metrics: Mapping[str, float],
    n_trials: int | None,
    command: str,
    options: str = "",
) -> str:
    """The study's note: budget used, epochs against the full budget, savings, best trial, how to reproduce."""
    study, es = settings.get("study", {}), settings.get("early_stopping", {})
    max_epochs = int(study.get("max_epochs", 0))
    acc = epoch_account(trials, max_epochs)
    states = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    finished = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
    budget = f"{finished} of {n_trials} trials" if n_trials else f"{finished} trials (timeout budget)"
    timeout = study.get("timeout")
    monitor = es.get("monitor") or study.get("metric")
    stopping = (f"on (monitor {monitor}, patience {es.get('patience')}, min_delta {es.get('min_delta')})"
                if es.get("enabled", True) else "off")
    lines = [
        f"## Study {study_name}",
        "",
        f"**Budget used:** {budget} finished ({states[TrialState.COMPLETE]} complete, "
        f"{states[TrialState.PRUNED]} pruned, {states[TrialState.FAIL]} failed)"
        f"{f'; timeout {timeout:g} s' if timeout else ''}. Sampler {settings.get('sampler', {}).get('name')}, "
        f"pruner {settings.get('pruner', {}).get('name')}, early stopping {stopping}.",
        "",
        f"**Epochs:** {acc.spent} spent of {acc.full} ({_pct(acc.spent, acc.full)}) that {acc.per_trial} would "
        "cost without pruning or early stopping.",
        "",
        f"* saved by pruning: **{acc.saved_by_pruning}** epochs ({acc.pruned} trials pruned)",
        f"* saved by early stopping: **{acc.saved_by_early_stopping}** epochs ({acc.early_stopped} trials stopped)",
    ]
    if acc.unused_by_failures:
        lines.append(f"* not run because trials failed: {acc.unused_by_failures} epochs")
    if acc.resumed:
        lines.append(f"* resumed from failed trials' checkpoints, not trained again: {acc.resumed} epochs")
    lines.append("")
    if best is None:
        lines.append("**Best trial:** none yet (no trial has completed).")
    else:
        metric = study.get("metric", "value")
        test = ", ".join(f"{k} {fmt(v)}" for k, v in test_metrics.items())
        params = ", ".join(f"`{k}={fmt(v)}`" for k, v in best.params.items())
        url = best.user_attrs.get(MLFLOW_RUN_URL)
        lines += [
            f"**Best trial:** #{best.number}, {metric} {fmt(best.value)} at epoch {best.user_attrs.get(BEST_EPOCH)} "
            f"of {best.user_attrs.get(EPOCHS_RUN)}{f'; test set: {test}' if test else ''}.",
            "",
            f"Params: {params}.",
        ]
        if url:
            lines += ["", f"[Best trial's MLflow run]({url})"]
    source = settings.get("source") or "STUDY_FILE"
    seed = settings.get("sampler", {}).get("seed")
    lines += [
        "",
        "**Reproduce:**",
        "",
        "```",
        command,
        f"hpo best {source}{options} --json        # the best trial's params, checkpoint and test metrics",
        f"hpo export {source}{options} --out DIR   # the best model as an MLflow model",
        "```",
        "",
        f"Study file `{source}`, sampler seed {seed}. The best trial's resolved training settings are stored in "
        "its checkpoint (`settings`) and as `config.*` params of its MLflow run.",
    ]
    return "\n".join(lines)


def trial_note(
    number: int,
    state: str,
    attrs: Mapping[str, Any],
    max_epochs: int,
    diagnosis: str | None = None,
) -> str:
    """A trial's note: how it ended and why, its fit, and a link to its MLflow run."""
    epochs, reason = attrs.get(EPOCHS_RUN), str(attrs.get(REASON, ""))
    ended = "ran the full budget" if state == "COMPLETE" else state.lower()
    if attrs.get(PRUNED_EPOCH) is not None:
        ended = f"pruned at epoch {attrs[PRUNED_EPOCH]}"
    elif attrs.get(EARLY_STOPPED):
        ended = f"early stopped at epoch {attrs.get(STOPPED_EPOCH)}"
    elif reason == "interrupted":
        ended = "interrupted (Ctrl-C or SIGTERM)"
    elif is_error(reason):
        ended = "failed with an error"
    lines = [
        f"## Trial {number}: {state}",
        "",
        f"**Ended:** {ended}: {epochs} of {max_epochs} epochs; reason `{reason}`.",
    ]
    if attrs.get(RESUMED_FROM_TRIAL) is not None:
        lines.append(f"\n**Retry of trial #{attrs[RESUMED_FROM_TRIAL]}**: resumed from its checkpoint, training from "
                     f"epoch {attrs.get(RESUMED_AT_EPOCH)} on (the earlier epochs are that trial's).")
    elif attrs.get(RETRY_OF) is not None:
        lines.append(f"\n**Retry of trial #{attrs[RETRY_OF]}**: with its params, trained from epoch 0 (it left no "
                     "checkpoint this retry could read).")
    if reason == "interrupted":
        lines.append("\nThe next `hpo run` of the study retries it as a new trial with the same params, from its "
                     "last checkpoint where it saved one.")
    if is_error(reason):
        where = f" at `{attrs[ERROR_AT]}`" if attrs.get(ERROR_AT) else ""
        lines.append(f"\n**Raised{where}**; the traceback is `error.txt` in its MLflow run.")
    if attrs.get(BEST_EPOCH) is not None:
        lines.append(f"\n**Kept weights of epoch** {attrs[BEST_EPOCH]}.")
    if diagnosis:
        lines.append(f"\n**Fit:** {diagnosis}")
    if attrs.get(MLFLOW_RUN_URL):
        lines.append(f"\n[MLflow run trial-{number}]({attrs[MLFLOW_RUN_URL]}) (for a local MLflow store, "
                     "`hpo ui STUDY_FILE` serves it)")
    return "\n".join(lines)
