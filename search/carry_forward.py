"""Median pruning that keeps early-stopped trials in the comparison after they stopped.

Optuna's ``MedianPruner`` compares a trial at step ``s`` with the completed trials that *reported* step
``s``. A trial that early stopping ended at epoch 3 reported no epoch 4, so from epoch 4 on the median is
taken over the survivors only (optuna#2441, optuna#2506): with early stopping on, the late-epoch median
is decided by whichever trials happened to keep running. ``MedianCarryForwardPruner`` treats a completed
trial that stopped before ``s`` as still holding its best reported value at ``s`` (what it would score if
asked, since the study keeps its best weights), so every completed trial counts at every step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState


def _best(values: Iterable[float], direction: StudyDirection) -> float:
    """Best finite-or-NaN value over steps (NaNs ignored; NaN when all are NaN), like Optuna's pruners."""
    array = np.asarray(list(values), dtype=float)
    if array.size == 0 or np.all(np.isnan(array)):
        return math.nan
    return float(np.nanmax(array) if direction == StudyDirection.MAXIMIZE else np.nanmin(array))


def value_at_step(trial: FrozenTrial, step: int, direction: StudyDirection) -> float | None:
    """The trial's value at ``step``: the reported one, else its best value if it stopped before ``step``.

    None when the trial neither reported ``step`` nor ended before it (it skipped the step, for example
    with ``interval_steps`` reporting), so it is left out exactly as Optuna leaves it out.
    """
    if step in trial.intermediate_values:
        return trial.intermediate_values[step]
    last = trial.last_step
    if last is None or last >= step:
        return None
    return _best(trial.intermediate_values.values(), direction)


class MedianCarryForwardPruner(BasePruner):
    """Prune if the trial's best intermediate value is worse than the median, over completed trials, of
    their values at the same step, where a trial that stopped before that step holds its best value.

    Args:
        n_startup_trials: Pruning is disabled until this many trials have completed in the study.
        n_warmup_steps: Pruning is disabled while the current step is less than this.
        interval_steps: Interval in steps between pruning checks, offset by the warmup steps.
        n_min_trials: Minimum number of completed trials with a value at the current step (reported or
            carried forward) needed to judge.

    Everything else follows ``optuna.pruners.MedianPruner``: only COMPLETE trials form the median, NaNs
    are ignored in it, and a trial whose intermediate values are all NaN is pruned.
    """

    def __init__(
        self, n_startup_trials: int = 5, n_warmup_steps: int = 0, interval_steps: int = 1, *, n_min_trials: int = 1
    ) -> None:
        if n_startup_trials < 0:
            raise ValueError(f"Number of startup trials cannot be negative, but got {n_startup_trials=}.")
        if n_warmup_steps < 0:
            raise ValueError(f"Number of warmup steps cannot be negative, but got {n_warmup_steps=}.")
        if interval_steps < 1:
            raise ValueError(f"Pruning interval steps must be at least 1, but got {interval_steps=}.")
        if n_min_trials < 1:
            raise ValueError(f"Number of trials for pruning must be at least 1, but got {n_min_trials=}.")
        self._n_startup_trials = n_startup_trials
        self._n_warmup_steps = n_warmup_steps
        self._interval_steps = interval_steps
        self._n_min_trials = n_min_trials

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not completed or len(completed) < self._n_startup_trials:
            return False
        step = trial.last_step
        if step is None or step < self._n_warmup_steps:
            return False
        if not self._first_in_interval(step, trial.intermediate_values.keys()):
            return False
        direction = study.direction
        best = _best(trial.intermediate_values.values(), direction)
        if math.isnan(best):
            return True
        median = self.median_at(completed, step, direction)
        if math.isnan(median):
            return False
        return best < median if direction == StudyDirection.MAXIMIZE else best > median

    def median_at(self, completed: list[FrozenTrial], step: int, direction: StudyDirection) -> float:
        """Median of the completed trials' values at ``step`` with early stoppers carried forward."""
        values = [v for t in completed if (v := value_at_step(t, step, direction)) is not None]
        if len(values) < self._n_min_trials or all(math.isnan(v) for v in values):
            return math.nan
        return float(np.nanmedian(np.asarray(values, dtype=float)))

    def _first_in_interval(self, step: int, steps: Iterable[int]) -> bool:
        """True at the first report within the current checking interval (Optuna's rule, reimplemented here
        rather than imported from a private module)."""
        nearest = (step - self._n_warmup_steps) // self._interval_steps * self._interval_steps + self._n_warmup_steps
        previous = max((s for s in steps if s != step), default=-1)
        return previous < nearest
