"""Replay recorded learning curves under another pruning / early-stopping strategy, without training.

A finished study whose trials all ran every epoch (pruner ``none``, early stopping off: the ``none``
strategy of ``hpo compare``) holds, per trial, the study metric of every epoch (Optuna's intermediate
values) and every other per-epoch metric (the trial's MLflow child run). Replaying feeds those values,
epoch by epoch, through ``search/epoch_decision.decide_epoch``, the function a real trial's session calls,
in an in-memory study with ask/tell, so a
strategy costs milliseconds instead of a study's worth of training.

How a replay differs from a real run:

* the configurations are the source study's, in the source's order. In a real run the sampler (TPE)
  sees pruned trials and shorter early-stopped curves and proposes different configurations; here it
  proposes nothing, so a replay measures only the stopping decisions, not their effect on the search;
* a replayed epoch is the recorded one: training is deterministic per seed on the CPU, so a trial that
  stops at epoch e has exactly the curve it would have had up to e, but on a GPU (non-deterministic
  kernels) a rerun would differ slightly;
* time is the sum of the recorded ``epoch_seconds`` of the epochs replayed: it leaves out per-trial
  setup, logging and checkpointing, and contention on the machine at recording time is baked in;
* test accuracy of the best trial is known only when its best epoch (by the early-stopping monitor) is
  the one whose weights the source saved; otherwise it is reported as missing (NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from search import records
from search.config import Settings
from search.early_stopping import EarlyStopping
from search.epoch_decision import decide_epoch
from search.errors import HpoError
from search.pruning import build_pruner


class ReplayError(HpoError):
    """The source study cannot be replayed (missing or partial curves); the message says what to run."""

    exit_code = 2


@dataclass(frozen=True)
class RecordedTrial:
    """One source trial: its parameters and its per-epoch metrics, ready to replay."""

    number: int
    params: dict[str, Any]
    distributions: dict[str, BaseDistribution]
    epochs: list[dict[str, float]]
    best_epoch: int | None
    checkpoint: str | None


def needed_metrics(settings: Settings) -> list[str]:
    """Per-epoch metrics the decisions read: the study metric, the monitor(s) and epoch_seconds for time."""
    monitor = settings.monitor
    names = [settings.study.metric, *([monitor] if isinstance(monitor, str) else list(monitor))]
    return list(dict.fromkeys([*names, "epoch_seconds"]))


def load_recorded(
    study: optuna.Study, tracking_uri: str | None, names: list[str], max_epochs: int
) -> list[RecordedTrial]:
    """The source study's finished trials with ``max_epochs`` epochs of each metric in ``names``.

    The study metric comes from Optuna's intermediate values; other metrics from the trial's MLflow run
    (user attr ``mlflow_run_id``). Failed trials are skipped (they have no curve to replay).
    """
    metric = names[0]
    client = None
    trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                    key=lambda t: t.number)
    if not trials:
        raise ReplayError(f"study {study.study_name!r} has no finished trials to replay.")
    out = []
    for t in trials:
        if len(t.intermediate_values) < max_epochs or sorted(t.intermediate_values)[:max_epochs] != list(
            range(max_epochs)
        ):
            raise ReplayError(
                f"trial {t.number} of study {study.study_name!r} reported {len(t.intermediate_values)} of "
                f"{max_epochs} epochs (it was pruned or stopped early). Replay needs every trial's full curve: "
                "replay a study run with pruner 'none' and early stopping off, such as the 'none' strategy "
                "of `hpo compare` (run `hpo compare FILE --strategies none` first)."
            )
        epochs: list[dict[str, float]] = [{metric: t.intermediate_values[e]} for e in range(max_epochs)]
        others = [n for n in names if n != metric]
        if others and tracking_uri and client is None:
            client = _client(tracking_uri)
        _fill_from_mlflow(client, t, others, epochs, study.study_name)
        out.append(RecordedTrial(t.number, dict(t.params), dict(t.distributions), epochs,
                                 t.user_attrs.get(records.BEST_EPOCH), t.user_attrs.get(records.CHECKPOINT)))
    return out


def _client(tracking_uri: str) -> Any:
    from search.tracking import MlflowClient  # the tracking module sets MLflow's quiet environment first

    return MlflowClient(tracking_uri=tracking_uri)


def _fill_from_mlflow(client: Any, t: FrozenTrial, names: list[str], epochs: list[dict[str, float]],
                      study_name: str) -> None:
    """Per-epoch ``names`` from the trial's MLflow run; without a run, only epoch_seconds can be estimated."""
    run_id = t.user_attrs.get(records.MLFLOW_RUN_ID)
    for name in names:
        history = {m.step: m.value for m in client.get_metric_history(run_id, name)} if run_id and client else {}
        missing = [e for e in range(len(epochs)) if e not in history]
        if missing and name == "epoch_seconds":
            seconds = _duration(t) / max(len(t.intermediate_values), 1)
            history.update(dict.fromkeys(missing, seconds))  # time only: fall back to the trial's mean epoch
        elif missing:
            where = f"MLflow run {run_id!r} has" if client and run_id else "no MLflow run was found with"
            raise ReplayError(
                f"trial {t.number} of study {study_name!r}: {where} no {name!r} for epochs {missing[:5]}, which "
                "the early-stopping monitor needs; pass the --tracking-uri the study was run with."
            )
        for e, row in enumerate(epochs):
            row[name] = history[e]


def _duration(t: FrozenTrial) -> float:
    if t.datetime_start and t.datetime_complete:
        return (t.datetime_complete - t.datetime_start).total_seconds()
    return 0.0


def replay(recorded: list[RecordedTrial], settings: Settings) -> optuna.Study:
    """An in-memory study of the recorded trials replayed under ``settings``' pruner and early stopping.

    Named after ``settings.study.name`` because some pruners (Hyperband) assign brackets from the study
    name and trial number, so a replay and a real run of the same strategy share the assignment.
    """
    max_epochs = settings.study.max_epochs
    metric = settings.study.metric
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=settings.study.name, direction=settings.study.direction,
        pruner=build_pruner(settings.pruner, max_epochs), sampler=optuna.samplers.RandomSampler(seed=0),
    )
    for rec in recorded:
        study.enqueue_trial(rec.params, skip_if_exists=False)
        trial = study.ask(rec.distributions)
        stopper = EarlyStopping(**settings.early_stopping_kwargs())
        best: dict[str, float] = {}
        best_epoch: int | None = None
        state, reason, early_stopped, seconds = TrialState.COMPLETE, "completed", False, 0.0
        epochs_run = 0
        for epoch, metrics in enumerate(rec.epochs[:max_epochs]):
            epochs_run = epoch + 1
            seconds += metrics.get("epoch_seconds", 0.0)
            outcome = decide_epoch(epoch, metrics, metric, stopper, trial, max_epochs)
            if outcome.improved:
                best, best_epoch = metrics, epoch
            if outcome.action == "prune":
                state, reason = TrialState.PRUNED, outcome.reason
                break
            if outcome.action == "stop":
                early_stopped, reason = outcome.early_stopped, outcome.reason or reason
                break
        restore = settings.early_stopping.restore_best and best
        final = best if restore else rec.epochs[epochs_run - 1]
        attrs = {records.EPOCHS_RUN: epochs_run, records.REASON: reason, records.EARLY_STOPPED: early_stopped,
                 records.REPLAYED_FROM: rec.number, records.REPLAY_SECONDS: seconds,
                 records.BEST_EPOCH: best_epoch if restore else epochs_run - 1}
        if state == TrialState.PRUNED:
            attrs[records.PRUNED_EPOCH] = epochs_run - 1
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if state == TrialState.PRUNED:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, float(final[metric]))
    return study


def replayed_test_accuracy(replayed: optuna.Study, recorded: list[RecordedTrial], settings: Settings) -> float:
    """Test accuracy of the replay's best trial when the source saved exactly its weights, else NaN.

    The source keeps the weights of its best epoch by the early-stopping monitor over all epochs; when the
    replayed trial's best epoch is that same epoch, those are the weights it would have kept.
    """
    try:
        best = replayed.best_trial
    except ValueError:
        return math.nan
    source = next(r for r in recorded if r.number == best.user_attrs[records.REPLAYED_FROM])
    if source.checkpoint is None or source.best_epoch != best.user_attrs.get(records.BEST_EPOCH):
        return math.nan
    from search.plugins import load_objective

    scores = load_objective(settings.objective_name)(settings).test_score(source.checkpoint)
    return float(scores.get("test_accuracy", math.nan))
