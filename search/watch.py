"""`hpo status --watch`: the status table, refreshed until the study is done.

"Done" is read from the storage alone, so it works for a study run by workers on other machines: the trial
budget of the latest `hpo run` (the study's ``hpo.n_trials`` attribute) is met and no trial is RUNNING. A
study with only a timeout is done when no trial is RUNNING. A study that stopped short of its budget (Ctrl-C,
``max_failures``) is not done: the table keeps refreshing until the study runs again or you press Ctrl-C.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

import optuna

from search import records
from search.records import best_trial
from search.summary import counts, failed_text, state_counts, study_table

CLEAR = "\033[H\033[2J"


def status_text(study: optuna.Study) -> str:
    """What `hpo status` prints: the trials table, the counts and the best trial."""
    trials = study.get_trials(deepcopy=False)
    c = state_counts(trials)
    waiting = f", {c['WAITING']} waiting" if c["WAITING"] else ""  # retries and enqueued trials, not yet started
    lines = [study_table(study), "",
             f"{c['COMPLETE']} complete, {c['PRUNED']} pruned, {failed_text(trials)}, {c['RUNNING']} running{waiting}"]
    best = best_trial(study)
    if best:
        lines.append(f"best trial #{best.number}: value {best.value:.4f} params {best.params}")
    return "\n".join(lines)


def budget(study: optuna.Study) -> int | None:
    """The trial budget the study was last run with (older studies: the study file's n_trials)."""
    attrs = study.user_attrs
    value = attrs[records.BUDGET] if records.BUDGET in attrs else \
        (attrs.get(records.SETTINGS) or {}).get("study", {}).get("n_trials")
    return None if value is None else int(value)


def is_done(study: optuna.Study) -> bool:
    c = counts(study)
    if c["RUNNING"]:
        return False
    n = budget(study)
    return n is None or c["COMPLETE"] + c["PRUNED"] >= n


def watch(study: optuna.Study, interval: float, stream: TextIO | None = None,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Print the table every ``interval`` seconds (the screen cleared on a terminal, a time stamp between
    tables elsewhere) until ``is_done``; 0 when done, 130 after Ctrl-C."""
    out = stream or sys.stdout
    live = out.isatty()
    try:
        while True:
            done = is_done(study)
            n = budget(study)
            c = counts(study)
            head = (f"study {study.study_name!r}: {c['COMPLETE'] + c['PRUNED']}{'/' + str(n) if n else ''} "
                    f"finished at {time.strftime('%H:%M:%S')}"
                    + ("; done" if done else f"; refreshing every {interval:g} s, Ctrl-C stops"))
            out.write((CLEAR if live else "") + head + "\n" + status_text(study) + "\n" + ("" if live else "\n"))
            out.flush()
            if done:
                return 0
            sleep(interval)
    except KeyboardInterrupt:
        out.write("\n")
        return 130
