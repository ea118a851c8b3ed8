"""The per-epoch decision: what one epoch's metrics mean for a trial, in one function.

A live trial (``search/session.py``) and a replayed one (``search/replay.py``) both call ``decide_epoch``,
so a replay makes exactly the decisions a real run would; trial packing will be its third caller. The order
is the contract: a non-finite loss prunes at once; then early stopping sees the monitored value; then the
study metric is reported to Optuna and the pruner asked; only a trial the pruner keeps may stop early.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

from search.early_stopping import EarlyStopping

Action = Literal["continue", "stop", "prune"]


class ReportingTrial(Protocol):
    """The two calls the decision makes on an Optuna trial (``optuna.Trial`` has both)."""

    def report(self, value: float, step: int) -> None: ...

    def should_prune(self) -> bool: ...


@dataclass(frozen=True)
class EpochOutcome:
    """``action``: go on, stop (early stopping, or the last epoch), or prune. ``reason`` is what a trial that
    ends here records ("nan_loss", "pruned", "early_stopped:<why>", or "" to keep its current one);
    ``improved``: this epoch is the best so far by the monitor (keep its weights)."""

    action: Action
    reason: str = ""
    improved: bool = False
    early_stopped: bool = False


def finite(metrics: dict[str, float], metric: str) -> bool:
    """Every loss and the study metric are finite numbers."""
    values = [v for k, v in metrics.items() if k.endswith("loss")] + [metrics[metric]]
    return all(math.isfinite(v) for v in values)


def decide_epoch(epoch: int, metrics: dict[str, float], metric: str, stopper: EarlyStopping,
                 trial: ReportingTrial, max_epochs: int) -> EpochOutcome:
    """Feed epoch ``epoch``'s ``metrics`` to the stopper and the trial and say what happens next."""
    if not finite(metrics, metric):
        return EpochOutcome("prune", "nan_loss")
    stop = stopper.update(stopper.value_from(metrics))
    improved = stopper.improved
    trial.report(metrics[metric], epoch)
    if trial.should_prune():
        return EpochOutcome("prune", "pruned", improved)
    if not stop:
        return EpochOutcome("continue", "", improved)
    early = epoch + 1 < max_epochs
    return EpochOutcome("stop", f"early_stopped:{stopper.reason}" if early else "", improved, early)
