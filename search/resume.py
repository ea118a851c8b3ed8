"""A trial's resume checkpoint (``checkpoints/trial-N/last.pt``): written during training, read by its retry.

A retried trial (after a crash, Ctrl-C or a stale heartbeat) carries Optuna's retry history; the newest
readable ``last.pt`` of the trials it retries holds the training state, the early-stopping state and the best
weights so far, so it goes on from the next epoch instead of starting again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from search.checkpoint import load_checkpoint, save_atomic
from search.errors import HpoError

log = logging.getLogger("hpo")
LAST = "last.pt"


def trial_dir(checkpoint_root: Path, trial_number: int) -> Path:
    """``checkpoints/trial-N``: a trial's best.pt and last.pt."""
    return checkpoint_root / f"trial-{trial_number}"


def last_path(checkpoint_root: Path, trial_number: int) -> Path:
    return trial_dir(checkpoint_root, trial_number) / LAST


def retried_trials(trial: FrozenTrial) -> list[int]:
    """The numbers of the earlier attempts ``trial`` retries, oldest first (empty for a fresh trial); ``trial`` is
    the storage's record of it (``stored_trial``: a live trial does not show its system attrs)."""
    return list(optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial))


def find_resume(trial_number: int, earlier: list[int], checkpoint_root: Path,
                remote: Callable[[int], Path | None] | None = None) -> dict[str, Any] | None:
    """The newest readable last.pt of the ``earlier`` attempts trial ``trial_number`` retries (``retried_trials``,
    newest predecessor first), with the number of the trial it came from under ``_from_trial`` and where it was
    read under ``_source``; None for a fresh trial. For each predecessor the local file comes first (the fast
    path on one machine), then ``remote(number)``: that attempt's checkpoint fetched from the artifact store (it
    ran on another machine)."""
    for number in reversed(earlier):
        candidates = [last_path(checkpoint_root, number)]
        if not candidates[0].exists():
            fetched = remote(number) if remote is not None else None
            candidates = [fetched] if fetched is not None else []
        for path in candidates:
            try:
                state = load_checkpoint(path, key="training")
            except HpoError as exc:
                log.warning("trial %s: not resuming from %s: %s", trial_number, path, exc)
                continue
            state["_from_trial"] = number
            state["_source"] = str(path)
            return state
    return None


def save_resume(path: Path, *, epoch: int, training: dict[str, Any], stopper: dict[str, Any],
                best_state: dict[str, Any] | None, best_metrics: dict[str, float], trial: int, run_id: str) -> None:
    """One dict, written atomically: a reader (the retry) never sees half of it."""
    save_atomic({"training": training, "stopper": stopper, "best_state": best_state, "best_metrics": best_metrics,
                 "epoch": epoch, "trial": trial, "mlflow_run_id": run_id}, path)
