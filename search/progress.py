"""Progress while a study runs: one line per finished trial, a live epoch line on a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import optuna
from optuna.trial import FrozenTrial

from search.summary import best_trial, counts


class Progress:
    """Prints to stderr so stdout stays clean for --json and pipes."""

    def __init__(self, budget: int | None, metric: str, stream: TextIO | None = None) -> None:
        self.budget = budget
        self.metric = metric
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.started = time.monotonic()

    def _write(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        self.stream.write(text)
        self.stream.flush()

    def on_epoch(self, trial_number: int, epoch: int, metrics: dict[str, float]) -> None:
        if self.live:
            shown = metrics.get(self.metric, float("nan"))
            self._write(f"  trial {trial_number}  epoch {epoch}  {self.metric} {shown:.4f}  "
                        f"loss {metrics.get('train_loss', float('nan')):.4f}")

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        c = counts(study)
        finished = c["COMPLETE"] + c["PRUNED"]
        budget = f"/{self.budget}" if self.budget else ""
        value = "" if trial.value is None else f"{self.metric} {trial.value:.4f}  "
        best = best_trial(study)
        best_text = f"best {best.value:.4f} (#{best.number})" if best else "best -"
        how = trial.user_attrs.get("reason", "")
        self._write(
            f"trial {trial.number:>3} {trial.state.name:<8} {value}epochs {trial.user_attrs.get('epochs_run', 0)}"
            f" ({how})  | finished {finished}{budget} pruned {c['PRUNED']} failed {c['FAIL']}  {best_text}"
            f"  [{time.monotonic() - self.started:.0f}s]\n"
        )
