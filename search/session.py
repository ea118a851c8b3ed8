"""One trial's life: epochs wired to early stopping, pruning and tracking; its end mapped to a state.

An objective opens a ``TrialSession`` around its training call and passes ``session.on_epoch`` as the
training loop's hook. The session is generic: it needs only a metrics dict per epoch and an object with a
``.model`` (for the best weights). How the trial ends decides everything recorded:

* returns normally -> COMPLETE (``early_stopped`` says whether early stopping ended it),
* ``optuna.TrialPruned`` -> PRUNED (by the pruner, or by a non-finite loss: reason ``nan_loss``),
* out of memory or any other error -> FAIL, re-raised as ``TrialFailed`` so the study goes on,
* KeyboardInterrupt -> FAIL in Optuna, KILLED in MLflow, re-enqueued, re-raised so the run stops
  (``TrialInterrupted``: the same with its own reason, and the run goes on).
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import optuna

from search import interrupts, records
from search.checkpoint import save_atomic
from search.config import Settings
from search.early_stopping import EarlyStopping
from search.epoch_decision import decide_epoch
from search.failures import (
    TrialDeadline,
    TrialFailed,
    TrialInterrupted,
    TrialTakenOver,
    drop_frames,
    error_site,
    failure_reason,
    is_out_of_memory,
    release_memory,
    show_first_traceback,
)
from search.optuna_adapter import PruningTrial, set_user_attrs, stored_trial
from search.progress import Progress
from search.publish import on_trial_end
from search.resume import find_resume, last_path, retried_trials, save_resume, trial_dir
from search.storage_retry import StorageUnavailable
from search.tracking import Tracker, TrialRun, delete_resume, fetch_resume, run_url
from search.workers import identity, retry

log = logging.getLogger("hpo")


class Weights(Protocol):
    """A model, as far as a session needs one: its weights (an ``nn.Module``)."""

    def state_dict(self) -> Mapping[str, Any]: ...


class EpochState(Protocol):
    """What the training loop hands ``on_epoch`` besides the metrics: the model, for the best weights."""

    @property
    def model(self) -> Weights | None: ...


@runtime_checkable
class Resumable(Protocol):
    """An epoch state that can be saved and resumed (``objectives.train.TrainingState``); a custom loop's is not."""

    def state_dict(self) -> dict[str, Any]: ...


# A write that raises one of these found the trial no longer this worker's to record (see TrialSession.__exit__).
OWNERSHIP_LOST = (StorageUnavailable, optuna.exceptions.UpdateFinishedTrialError)


def build_stopper(settings: Settings) -> EarlyStopping:
    return EarlyStopping(**settings.early_stopping_kwargs())


@dataclass
class StudyContext:
    """What every trial of one `hpo run` shares."""

    settings: Settings
    tracker: Tracker
    parent_run_id: str
    checkpoint_root: Path
    progress: Progress | None = None

    def trial(self, trial: optuna.Trial, params: dict[str, Any], resolved: dict[str, Any]) -> TrialSession:
        return TrialSession(self, trial, params, resolved)


@dataclass
class TrialSession:
    ctx: StudyContext
    trial: optuna.Trial
    params: dict[str, Any]
    resolved: dict[str, Any]
    run: TrialRun | None = None
    stopper: EarlyStopping | None = None
    epochs_run: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    last_metrics: dict[str, float] = field(default_factory=dict)
    best_state: dict[str, Any] | None = None
    last_model: Weights | None = None
    early_stopped: bool = False
    reason: str = "completed"
    error: tuple[str, str] | None = None  # a trial failed by an error: where it was raised, its traceback
    resume_training: dict[str, Any] | None = None
    resumed_from: int | None = None
    _deadline: TrialDeadline | None = None
    _pruning: PruningTrial | None = None  # report/should_prune, no per-epoch storage read for the decision
    _last_saved: float = field(default_factory=time.monotonic)  # the trial's start, then the last last.pt
    _earlier_runs: dict[int, str] = field(default_factory=dict)  # MLflow runs of the attempts this one retries

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def checkpoint_dir(self) -> Path:
        return trial_dir(self.ctx.checkpoint_root, self.trial.number)

    @property
    def last_path(self) -> Path:
        return last_path(self.ctx.checkpoint_root, self.trial.number)

    def __enter__(self) -> TrialSession:
        stored = stored_trial(self.trial)  # one read: the pruner's view of the trial, and what it retries
        self._pruning = PruningTrial(self.trial, stored=stored)
        self.stopper = build_stopper(self.settings)
        earlier = retried_trials(stored)
        self._earlier_runs = self._runs_of(earlier)
        previous_run = self._earlier_runs.get(earlier[-1]) if earlier else None  # the attempt this one retries
        with tempfile.TemporaryDirectory(prefix="hpo-resume-") as fetched:
            remote = self._fetcher(Path(fetched)) if self.ctx.tracker.is_server else None
            resume = find_resume(self.trial.number, earlier, self.ctx.checkpoint_root, remote)
        self.run = self.ctx.tracker.start_trial(self.ctx.parent_run_id, self.trial.number, self.params, self.resolved)
        # A retry enqueued by an earlier version carries its predecessor's record; this attempt writes its own.
        inherited = {key: None for key in records.PER_ATTEMPT if key in self.trial.user_attrs}
        retry = {records.RETRY_OF: earlier[-1]} if earlier else {}
        set_user_attrs(self.trial, {**inherited, records.MLFLOW_RUN_ID: self.run.run_id, **identity(), **retry,
                                    records.MLFLOW_RUN_URL: run_url(self.ctx.tracker, self.run.run_id),
                                    records.TRIAL_MAX_EPOCHS: self.settings.study.max_epochs})
        if resume is not None:
            self._apply_resume(resume, previous_run)
        self._deadline = TrialDeadline(self.settings.study.trial_timeout)
        return self

    def take_deadline(self) -> float | None:
        """Turn this trial's process alarm off and return when its ``trial_timeout`` ends (``time.monotonic``;
        None without one): the caller times it instead. Trial packing does, with one alarm for a pack's members
        (one process alarm cannot time K trials). The check at the end of every epoch stays."""
        if self._deadline is None:
            return None
        self._deadline.disarm()
        return self._deadline.ends

    def _runs_of(self, numbers: list[int]) -> dict[int, str]:
        """The MLflow run ids of earlier attempts (by trial number), read from the storage once per retry."""
        if not numbers:
            return {}
        trials = self.trial.study.get_trials(deepcopy=False)
        return {t.number: str(t.user_attrs[records.MLFLOW_RUN_ID]) for t in trials
                if t.number in numbers and t.user_attrs.get(records.MLFLOW_RUN_ID)}

    def _fetcher(self, dest: Path) -> Callable[[int], Path | None]:
        """An earlier attempt's resume checkpoint from the artifact store, for a retry on another machine."""
        def fetch(number: int) -> Path | None:
            run_id = self._earlier_runs.get(number)
            return fetch_resume(self.ctx.tracker, run_id, dest / str(number)) if run_id else None
        return fetch

    def _apply_resume(self, state: dict[str, Any], previous_run: str | None) -> None:
        assert self.stopper is not None and self.run is not None
        self.resume_training = state["training"]
        self.resumed_from = int(state["_from_trial"])
        self.stopper.load_state_dict(state["stopper"])
        self.best_state = state.get("best_state")
        self.best_metrics = dict(state.get("best_metrics") or {})
        history = list(self.resume_training.get("history", []))
        self.epochs_run = len(history)
        self.last_metrics = dict(history[-1]) if history else {}
        epoch = self.epochs_run
        set_user_attrs(self.trial, {records.RESUMED_FROM_TRIAL: self.resumed_from, records.RESUMED_AT_EPOCH: epoch})
        for past, metrics in enumerate(history):
            self.run.log_epoch(past, metrics)
        local = Path(state["_source"]).is_relative_to(self.ctx.checkpoint_root)
        source = "local" if local else "artifact store"
        self.run.set_tags({"hpo.resumed_from_trial": self.resumed_from, "hpo.resumed_at_epoch": epoch,
                           "hpo.resumed_from_run": state.get("mlflow_run_id") or previous_run or "",
                           "hpo.resumed_from_checkpoint": source})
        log.warning("trial %s resumes trial %s at epoch %s (checkpoint: %s)", self.trial.number, self.resumed_from,
                    epoch, source)

    def _save_last(self, epoch: int, state: EpochState) -> None:
        """last.pt every ``checkpoint_every`` epochs, but no more often than ``checkpoint_every_seconds``: on a
        short epoch the write would cost more than the training a crash could lose."""
        study = self.settings.study
        every = study.checkpoint_every
        if not every or (epoch + 1) % every or not isinstance(state, Resumable):
            return
        if time.monotonic() - self._last_saved < study.checkpoint_every_seconds:
            return
        assert self.stopper is not None and self.run is not None and self._pruning is not None
        self._pruning.flush()  # the steps first: a retry inherits them with this file; a taken-over trial stops here
        save_resume(self.last_path, epoch=epoch, training=state.state_dict(), stopper=self.stopper.state_dict(),
                    best_state=self.best_state, best_metrics=self.best_metrics, trial=self.trial.number,
                    run_id=self.run.run_id)
        if self.ctx.tracker.is_server:  # no shared filesystem assumed: a retry elsewhere reads the artifact store
            self.run.upload_resume(self.last_path, epoch)
        self._last_saved = time.monotonic()

    def on_epoch(self, epoch: int, metrics: dict[str, float], state: EpochState) -> bool:
        """The training loop's hook: log, decide early stopping, report, maybe prune. True = stop."""
        assert self.run is not None and self.stopper is not None and self._pruning is not None
        interrupts.check()  # a Ctrl-C/SIGTERM whose KeyboardInterrupt was swallowed stops the trial now
        metric = self.settings.study.metric
        if metric not in metrics:
            raise KeyError(f"the objective reported no {metric!r} (it reported {', '.join(metrics)})")
        self.epochs_run = epoch + 1
        self.last_metrics = dict(metrics)
        self.last_model = state.model
        self.run.log_epoch(epoch, metrics)
        if self.ctx.progress is not None:
            self.ctx.progress.on_epoch(self.trial.number, epoch, metrics)
        if self._deadline is not None:
            self._deadline.check()  # off the main thread, no alarm can interrupt the trial: the epoch's end does
        outcome = decide_epoch(epoch, metrics, metric, self.stopper, self._pruning, self.settings.study.max_epochs)
        if outcome.improved:
            self.best_metrics = dict(metrics)
            if self.last_model is not None:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.last_model.state_dict().items()}
        if outcome.action == "prune":
            self.reason = outcome.reason
            what = "non-finite loss" if outcome.reason == "nan_loss" else "pruned"
            raise optuna.TrialPruned(f"{what} at epoch {epoch}")
        if outcome.action == "stop":
            self.early_stopped = outcome.early_stopped
            self.reason = outcome.reason or self.reason
            return True
        self._save_last(epoch, state)
        return False

    def _final_metrics(self) -> dict[str, float]:
        restore = self.settings.early_stopping.restore_best and self.best_metrics
        return self.best_metrics if restore else self.last_metrics

    def complete(self, checkpoint: dict[str, Any], model: Weights | None = None) -> float:
        """Save the best (or last) weights, record the trial, and return its value.

        ``checkpoint`` is the objective's dict without weights (model_spec, settings); the session adds
        the ``state_dict`` of the best epoch when restore_best is on, else of the last epoch (``model``,
        or the model the last epoch reported).
        """
        self.last_model = model if model is not None else self.last_model
        assert self.stopper is not None
        if not self.last_metrics:
            raise RuntimeError("the objective finished without reporting a single epoch")
        restore = self.settings.early_stopping.restore_best and self.best_state is not None
        if restore:
            weights = self.best_state
        elif self.last_model is not None:
            weights = {k: v.detach().to("cpu") for k, v in self.last_model.state_dict().items()}
        else:
            raise RuntimeError("the objective finished without a model: pass it to on_epoch or to complete()")
        final = self._final_metrics()
        best_epoch = self.stopper.best_epoch if restore else self.epochs_run - 1
        path = save_atomic(
            {**checkpoint, "state_dict": weights, "epoch": best_epoch, "metrics": final},
            self.checkpoint_dir / "best.pt",
        )
        self.run.log_artifact(path)  # type: ignore[union-attr]
        set_user_attrs(self.trial, {records.CHECKPOINT: str(path.resolve()), records.BEST_EPOCH: best_epoch})
        return float(final[self.settings.study.metric])

    def _record(self, state: str, killed: bool = False) -> None:
        if self._deadline is not None:
            self._deadline.disarm()
        if state in ("COMPLETE", "PRUNED"):
            self.last_path.unlink(missing_ok=True)  # only a trial that may be retried needs it
        stopped = self.epochs_run - 1 if self.epochs_run else None
        attrs = {records.EPOCHS_RUN: self.epochs_run, records.REASON: self.reason,
                 records.EARLY_STOPPED: self.early_stopped}
        if state == "PRUNED":
            attrs[records.PRUNED_EPOCH] = stopped
        if self.early_stopped:
            attrs[records.STOPPED_EPOCH] = stopped
        if self.error is not None and self.error[0]:
            attrs[records.ERROR_AT] = self.error[0]
        set_user_attrs(self.trial, attrs)
        final = self._final_metrics() if state == "COMPLETE" else {}
        metrics = {"epochs_run": float(self.epochs_run)}
        metric = self.settings.study.metric
        if metric in final:
            metrics[f"best_{metric}"] = final[metric]
        if state == "COMPLETE" and self.trial.user_attrs.get(records.BEST_EPOCH) is not None:
            metrics["best_epoch"] = float(self.trial.user_attrs[records.BEST_EPOCH])
        tags: dict[str, object] = {"early_stopped": str(self.early_stopped).lower(), "hpo.reason": self.reason}
        if self.early_stopped:  # a pruned or full-length run has no stopped_epoch: it would read as early-stopped
            tags["stopped_epoch"] = stopped
        if self.error is not None:
            tags["hpo.error_at"] = self.error[0]
        if self.run is not None:
            if self.error is not None:
                self.run.log_text(self.error[1], "error.txt")
            self.run.finish(state, tags, metrics, killed=killed)  # waits for a pending resume upload too
            if state in ("COMPLETE", "PRUNED") and self.ctx.tracker.is_server:
                delete_resume(self.ctx.tracker, [self.run.run_id, *self._earlier_runs.values()])
        on_trial_end(self, state)  # dashboard note and artifacts, fit diagnosis (never raises)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Exceptions propagate (None): the table maps each to a recorded state, never swallows one.

        Two ends are not this worker's to record: the storage stopped answering (``StorageUnavailable``), or
        another worker already failed the trial as stale and retried it (Optuna refuses to update a finished
        trial). Then only the MLflow run is ended, KILLED, and the Optuna trial is left as it is. A Ctrl-C hidden
        behind a writer's own error (``interrupts.cause``) is recorded and raised as the interrupt it was."""
        cause = None if exc is None else interrupts.cause(exc)
        cause = self._write_held(cause)
        self._close(cause)
        if cause is not None and cause is not exc:
            raise cause from None

    def _write_held(self, cause: BaseException | None) -> BaseException | None:
        """Write the reported steps still held (``PruningTrial.flush``) before the trial is recorded and told (a
        pruned trial's value is its last stored step), and return what the trial ends with. If the write fails:
        a Ctrl-C or SIGTERM still ends it as interrupted, and so does the trial's own error, unless the write
        found the trial not this worker's any more (storage lost, taken over); otherwise the write's error, as
        a failed report in ``on_epoch`` would have ended it. Nothing is written for a trial that is already
        not this worker's."""
        if self._pruning is None or isinstance(cause, OWNERSHIP_LOST):
            return cause
        try:
            self._pruning.flush()
        except Exception as error:  # noqa: BLE001 - the trial's end records it
            if cause is None or (isinstance(cause, Exception) and isinstance(error, OWNERSHIP_LOST)):
                return error
            return cause
        return cause

    def _close(self, exc: BaseException | None) -> None:
        if isinstance(exc, StorageUnavailable):
            self._abandon("storage_lost")
            return
        if exc is None or isinstance(exc, optuna.TrialPruned):
            interrupts.hold()  # a finished trial: Ctrl-C waits until its caller has told Optuna (interrupts.release)
        try:
            if isinstance(exc, optuna.exceptions.UpdateFinishedTrialError):
                raise exc
            self._exit(exc)
        except optuna.exceptions.UpdateFinishedTrialError as finished:
            self._abandon("taken_over")
            if isinstance(exc, KeyboardInterrupt):
                return
            raise TrialTakenOver(f"trial {self.trial.number} was taken over by another worker") from finished

    def _abandon(self, reason: str) -> None:
        """End the MLflow run KILLED without touching the Optuna trial (see ``__exit__``). Never raises."""
        if self._deadline is not None:
            self._deadline.disarm()
        if reason == "taken_over":
            log.warning("trial %s was failed and retried by another worker while this one ran it (its heartbeat was "
                        "missing for longer than study.grace_period, e.g. a network partition); this worker drops "
                        "its result and ends its MLflow run KILLED", self.trial.number)
        try:
            if self.run is not None:
                self.run.finish("FAIL", {"hpo.reason": reason}, killed=True)
        except Exception as error:  # noqa: BLE001 - the tracking server may be out of reach too
            log.warning("trial %s: could not end its MLflow run: %s", self.trial.number, error)

    def _exit(self, exc: BaseException | None) -> None:
        if exc is None:
            self._record("COMPLETE")
            return
        if isinstance(exc, optuna.TrialPruned):
            self._record("PRUNED")
            return
        if isinstance(exc, (KeyboardInterrupt, TrialInterrupted)):
            # FAIL in Optuna (it marks interrupted trials so), KILLED in MLflow, and re-enqueued with the
            # same params: the next `hpo run` resumes it from last.pt.
            self.reason = exc.reason if isinstance(exc, TrialInterrupted) else "interrupted"
            self._record("FAIL", killed=True)
            retry(self.trial.study, stored_trial(self.trial))
            return
        self.reason = failure_reason(exc)
        if records.is_error(self.reason):
            text = "".join(traceback.format_exception(exc))
            self.error = (error_site(exc), text)
            show_first_traceback(self.trial.number, exc, text)
        if is_out_of_memory(exc):
            self.trial.set_user_attr(records.OOM_BATCH_SIZE, self.resolved.get("batch_size"))
        self._record("FAIL")
        drop_frames(exc)  # the training frames' tensors go now, whoever keeps the exception
        if is_out_of_memory(exc):
            release_memory()
        raise TrialFailed(f"trial {self.trial.number} failed ({self.reason})") from exc
