"""Progress while a study runs: live bars on a terminal, one plain line per finished trial elsewhere.

On a terminal (stderr is a TTY) two tqdm bars stay at the bottom: the study (trials finished of the budget,
pruned, early-stopped and failed counts, best value so far, elapsed and estimated remaining time) and the
current trial (epoch of max_epochs, the metric, the loss); each finished trial's line scrolls above them.
In CI and logs (not a TTY) the per-trial lines are written, with no control characters, and while a trial runs
long (a CPU run of a large model, a batch job's log) an epoch line at most once every ``EPOCH_LINE_EVERY_S``
seconds, so a log never goes quiet for the length of a trial.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import records
from search.records import best_trial
from search.summary import counts, failed_short, state_counts

# tqdm puts ", " before a postfix, so each postfix follows a field it can be joined to.
STUDY_BAR = "{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed} elapsed, ETA {remaining}{postfix}"
OPEN_BAR = "{desc} {n_fmt} finished, {elapsed} elapsed{postfix}"  # a timeout-only study has no trial budget
EPOCH_BAR = "{desc} |{bar}| {n_fmt}/{total_fmt}{postfix}"
EPOCH_LINE_EVERY_S = 60.0  # logs: an epoch line only once this long has passed without any line


def finished_by(trials: list[FrozenTrial], trial: FrozenTrial) -> list[FrozenTrial]:
    """The trials that had finished when ``trial`` did (all finished ones if it has no end time)."""
    end = trial.datetime_complete
    return [t for t in trials if t.state.is_finished()
            and (end is None or (t.datetime_complete is not None and t.datetime_complete <= end))]


def best_of(trials: list[FrozenTrial], direction: optuna.study.StudyDirection) -> FrozenTrial | None:
    """The best complete trial among ``trials`` (the earliest of equals, as the study's best is)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    sign = -1.0 if direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return min(complete, key=lambda t: (sign * float(t.value or 0.0), t.number), default=None)


def _early_stopped(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
               if t.user_attrs.get(records.EARLY_STOPPED))


class Progress:
    """Prints to stderr so stdout stays clean for --json and pipes. ``live`` forces the terminal mode."""

    def __init__(self, budget: int | None, metric: str, stream: TextIO | None = None, max_epochs: int | None = None,
                 live: bool | None = None) -> None:
        self.budget = budget
        self.metric = metric
        self.max_epochs = max_epochs
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.started = time.monotonic()
        self._last_line = self.started  # when a plain line was last written (logs)
        self._study: Any = None
        self._epochs: Any = None
        self._trial: int | None = None

    # --- the live bars ------------------------------------------------------------------------------------------

    def start(self, study: optuna.Study) -> None:
        """Open the study bar at the trials already finished (a resumed study starts part-way)."""
        if not self.live or self._study is not None:
            return
        from tqdm import tqdm

        c = counts(study)
        self._study = tqdm(total=self.budget, initial=c["COMPLETE"] + c["PRUNED"], file=self.stream, position=0,
                           desc="trials finished", bar_format=STUDY_BAR if self.budget else OPEN_BAR, leave=True,
                           dynamic_ncols=True, mininterval=0)
        self._summary(study)

    def _summary(self, study: optuna.Study) -> None:
        """Counts and best value on the study bar, which then moves to the trials finished in the storage."""
        c = counts(study)
        best = best_trial(study)
        best_text = f"best {best.value:.4f} (#{best.number})" if best else "best -"
        self._study.set_postfix_str(f"pruned {c['PRUNED']}, early-stopped {_early_stopped(study)}, "
                                    f"{failed_short(study.get_trials(deepcopy=False))}, {best_text}", refresh=False)
        done = c["COMPLETE"] + c["PRUNED"]
        if done > self._study.n:
            self._study.update(done - self._study.n)  # also refreshes; other workers' trials count too
        else:
            self._study.refresh()

    def on_epoch(self, trial_number: int, epoch: int, metrics: dict[str, float]) -> None:
        if not self.live:
            if self._quiet_for_long():
                self._write(self.epoch_line(trial_number, epoch, metrics))
            return
        from tqdm import tqdm

        if self._epochs is None:
            self._epochs = tqdm(total=self.max_epochs, file=self.stream, position=1, leave=False,
                                bar_format=EPOCH_BAR, dynamic_ncols=True, mininterval=0)
        if trial_number != self._trial:
            self._trial = trial_number
            self._epochs.reset(total=self.max_epochs)
        self._epochs.set_description_str(f"trial {trial_number} epochs", refresh=False)
        self._epochs.n = epoch + 1
        shown = metrics.get(self.metric, float("nan"))
        self._epochs.set_postfix_str(f"{self.metric} {shown:.4f}, loss {metrics.get('train_loss', float('nan')):.4f}",
                                     refresh=True)
        if self._study is not None:
            self._study.refresh()  # elapsed time moves on between trials too

    def close(self) -> None:
        """Leave the study bar on screen, drop the epoch bar; safe to call twice or without bars."""
        if self._epochs is not None:
            self._epochs.close()
            self._epochs = None
        if self._study is not None:
            self._study.close()
            self._study = None

    # --- plain lines: one per finished trial (an Optuna callback), an epoch line now and then in logs -----------

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last_line = time.monotonic()

    def _quiet_for_long(self) -> bool:
        """Whether the log has had no line for ``EPOCH_LINE_EVERY_S``: time for a line about the running trials."""
        return time.monotonic() - self._last_line >= EPOCH_LINE_EVERY_S

    def _of_max(self) -> str:
        return f"/{self.max_epochs}" if self.max_epochs else ""

    def _elapsed(self) -> str:
        return f"[{time.monotonic() - self.started:.0f}s]"

    def workers_running(self, study: optuna.Study) -> None:
        """For `hpo run --workers` (its workers train quietly): in logs, once ``EPOCH_LINE_EVERY_S`` has passed
        without a line, one line with each running trial's last reported epoch and value, from the storage."""
        if self.live or not self._quiet_for_long():
            return
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.intermediate_values]
        if not running:
            return
        parts = []
        for t in sorted(running, key=lambda t: t.number):
            reached = records.steps_reached(t)
            parts.append(f"trial {t.number} epoch {reached}{self._of_max()} {self.metric} "
                         f"{t.intermediate_values[reached - 1]:.4f}")
        self._write(f"running: {'; '.join(parts)}  {self._elapsed()}")

    def epoch_line(self, trial_number: int, epoch: int, metrics: dict[str, float]) -> str:
        shown = metrics.get(self.metric, float("nan"))
        return (f"trial {trial_number:>3} running  epoch {epoch + 1}{self._of_max()}  {self.metric} {shown:.4f}  loss "
                f"{metrics.get('train_loss', float('nan')):.4f}  {self._elapsed()}")

    def line(self, study: optuna.Study, trial: FrozenTrial) -> str:
        """The trial's line, with the study's counts and best as they stood when it ended (a launcher following
        its workers writes it up to a second later, when other trials may have finished since)."""
        trials = study.get_trials(deepcopy=False)
        then = finished_by(trials, trial)
        c = state_counts(then)
        finished = c["COMPLETE"] + c["PRUNED"]
        budget = f"/{self.budget}" if self.budget else ""
        value = "" if trial.value is None else f"{self.metric} {trial.value:.4f}  "
        best = best_of(then, study.direction)
        best_text = f"best {best.value:.4f} (#{best.number})" if best else "best -"
        how = trial.user_attrs.get(records.REASON, "")
        failed = failed_short(then, trials)
        return (f"trial {trial.number:>3} {trial.state.name:<8} {value}epochs {records.epochs_run(trial)}"
                f" ({how})  | finished {finished}{budget} pruned {c['PRUNED']} {failed}  {best_text}"
                f"  {self._elapsed()}")

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        text = self.line(study, trial)
        if not self.live:
            self._write(text)
            return
        self.start(study)
        from tqdm import tqdm

        tqdm.write(text, file=self.stream)
        self._summary(study)
