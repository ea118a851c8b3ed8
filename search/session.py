"""One trial's life: epochs wired to early stopping, pruning and tracking; its end mapped to a state.

An objective opens a ``TrialSession`` around its training call and passes ``session.on_epoch`` as the
training loop's hook. The session is generic: it needs only a metrics dict per epoch and an object with a
``.model`` (for the best weights). How the trial ends decides everything recorded:

* returns normally -> COMPLETE (``early_stopped`` says whether early stopping ended it),
* ``optuna.TrialPruned`` -> PRUNED (by the pruner, or by a non-finite loss: reason ``nan_loss``),
* out of memory or any other error -> FAIL, re-raised as ``TrialFailed`` so the study goes on,
* KeyboardInterrupt -> FAIL in Optuna, KILLED in MLflow, re-raised so the run stops.
"""

from __future__ import annotations

import gc
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import optuna

from search.checkpoint import save_atomic
from search.config import Settings
from search.early_stopping import EarlyStopping
from search.tracking import Tracker, TrialRun


class TrialFailed(Exception):
    """A trial failed for a reason recorded on it; the study continues with the next trial."""


def is_out_of_memory(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def build_stopper(settings: Settings) -> EarlyStopping:
    return EarlyStopping(**settings.early_stopping_kwargs())


@dataclass
class StudyContext:
    """What every trial of one `hpo run` shares."""

    settings: Settings
    tracker: Tracker
    parent_run_id: str
    checkpoint_root: Path
    progress: Any = None

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
    last_model: Any = None
    early_stopped: bool = False
    reason: str = "completed"

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def checkpoint_dir(self) -> Path:
        return self.ctx.checkpoint_root / f"trial-{self.trial.number}"

    def __enter__(self) -> TrialSession:
        self.stopper = build_stopper(self.settings)
        self.run = self.ctx.tracker.start_trial(self.ctx.parent_run_id, self.trial.number, self.params, self.resolved)
        for key, value in {"mlflow_run_id": self.run.run_id, "host": socket.gethostname(), "pid": os.getpid()}.items():
            self.trial.set_user_attr(key, value)
        return self

    def on_epoch(self, epoch: int, metrics: dict[str, float], state: Any) -> bool:
        """The training loop's hook: log, decide early stopping, report, maybe prune. True = stop."""
        assert self.run is not None and self.stopper is not None
        metric = self.settings.study.metric
        if metric not in metrics:
            raise KeyError(f"the objective reported no {metric!r} (it reported {', '.join(metrics)})")
        self.epochs_run = epoch + 1
        self.last_metrics = dict(metrics)
        self.last_model = getattr(state, "model", None)
        self.run.log_epoch(epoch, metrics)
        if self.ctx.progress is not None:
            self.ctx.progress.on_epoch(self.trial.number, epoch, metrics)
        losses = [v for k, v in metrics.items() if k.endswith("loss")]
        if not all(math.isfinite(v) for v in losses) or not math.isfinite(metrics[metric]):
            self.reason = "nan_loss"
            raise optuna.TrialPruned(f"non-finite loss at epoch {epoch}")
        stop = self.stopper.update(self.stopper.value_from(metrics))
        if self.stopper.improved:
            self.best_metrics = dict(metrics)
            if self.last_model is not None:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.last_model.state_dict().items()}
        self.trial.report(metrics[metric], epoch)
        if self.trial.should_prune():
            self.reason = "pruned"
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")
        if stop:
            self.early_stopped = epoch + 1 < self.settings.study.max_epochs
            if self.early_stopped:
                self.reason = f"early_stopped:{self.stopper.reason}"
        return stop

    def _final_metrics(self) -> dict[str, float]:
        restore = self.settings.early_stopping.restore_best and self.best_metrics
        return self.best_metrics if restore else self.last_metrics

    def complete(self, checkpoint: dict[str, Any]) -> float:
        """Save the best (or last) weights, record the trial, and return its value.

        ``checkpoint`` is the objective's dict without weights (model_spec, settings); the session adds
        the ``state_dict`` of the best epoch when restore_best is on, else of the last epoch.
        """
        assert self.stopper is not None
        if not self.last_metrics:
            raise RuntimeError("the objective finished without reporting a single epoch")
        restore = self.settings.early_stopping.restore_best and self.best_state is not None
        if restore:
            weights = self.best_state
        else:
            weights = {k: v.detach().to("cpu") for k, v in self.last_model.state_dict().items()}
        final = self._final_metrics()
        best_epoch = self.stopper.best_epoch if restore else self.epochs_run - 1
        path = save_atomic(
            {**checkpoint, "state_dict": weights, "epoch": best_epoch, "metrics": final},
            self.checkpoint_dir / "best.pt",
        )
        self.run.log_artifact(path)  # type: ignore[union-attr]
        self.trial.set_user_attr("checkpoint", str(path.resolve()))
        self.trial.set_user_attr("best_epoch", best_epoch)
        return float(final[self.settings.study.metric])

    def _record(self, state: str, killed: bool = False) -> None:
        stopped = self.epochs_run - 1 if self.epochs_run else None
        attrs = {"epochs_run": self.epochs_run, "reason": self.reason, "early_stopped": self.early_stopped}
        if state == "PRUNED":
            attrs["pruned_epoch"] = stopped
        if self.early_stopped:
            attrs["stopped_epoch"] = stopped
        for key, value in attrs.items():
            self.trial.set_user_attr(key, value)
        final = self._final_metrics() if state == "COMPLETE" else {}
        metrics = {"epochs_run": float(self.epochs_run)}
        if "val_accuracy" in final:
            metrics["best_val_accuracy"] = final["val_accuracy"]
        if state == "COMPLETE" and self.trial.user_attrs.get("best_epoch") is not None:
            metrics["best_epoch"] = float(self.trial.user_attrs["best_epoch"])
        tags = {
            "early_stopped": str(self.early_stopped).lower(),
            "stopped_epoch": "" if stopped is None else stopped,
            "hpo.reason": self.reason,
        }
        if self.run is not None:
            self.run.finish(state, tags, metrics, killed=killed)
        if self.ctx.progress is not None:
            self.ctx.progress.on_trial_state(self.trial.number, state, self.reason, self.epochs_run)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc is None:
            self._record("COMPLETE")
            return False
        if isinstance(exc, optuna.TrialPruned):
            self._record("PRUNED")
            return False
        if isinstance(exc, KeyboardInterrupt):
            self.reason = "interrupted"
            self._record("FAIL", killed=True)
            return False
        if is_out_of_memory(exc):
            self.reason = "out_of_memory"
            self.trial.set_user_attr("oom_batch_size", self.resolved.get("batch_size"))
            _release_memory()
        else:
            self.reason = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        self._record("FAIL")
        raise TrialFailed(f"trial {self.trial.number} failed ({self.reason})") from exc
