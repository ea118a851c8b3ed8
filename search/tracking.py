"""The one place that talks to MLflow.

Layout: one experiment per study, one parent run for the study (tag ``hpo.role=study``) shared by every
worker, one nested child run per trial named ``trial-<number>``. Everything goes through ``MlflowClient``
with explicit run ids, never the global "active run", so several trials or workers cannot cross wires.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from search.errors import TrackingError

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

PARENT_TAG = "hpo.role"
MAX_PARAM_LENGTH = 6000


def _params(values: Mapping[str, Any], prefix: str = "") -> list[Param]:
    return [Param(f"{prefix}{k}", str(v)[:MAX_PARAM_LENGTH]) for k, v in values.items()]


class Tracker:
    """An MLflow experiment for one study, reached through one client."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_root: Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        try:
            experiment = self.client.get_experiment_by_name(experiment_name)
            if experiment is None:
                location = artifact_root.resolve().as_uri() if artifact_root else None
                try:
                    experiment_id = self.client.create_experiment(experiment_name, artifact_location=location)
                except MlflowException:  # another worker created it first
                    experiment = self.client.get_experiment_by_name(experiment_name)
                    if experiment is None:
                        raise
                    experiment_id = experiment.experiment_id
            else:
                experiment_id = experiment.experiment_id
        except (MlflowException, OSError) as exc:
            raise TrackingError(
                f"could not open the MLflow tracking store {tracking_uri!r}: {str(exc).splitlines()[0]}. "
                "Check that the URI is right and, for an http:// server, that `mlflow server` is running "
                "and reachable; or leave --tracking-uri out to use the run directory's mlflow.db."
            ) from exc
        self.experiment_id = experiment_id

    def parent_run(self, study_name: str, params: Mapping[str, Any], known_id: str | None = None) -> str:
        """The study's parent run: the one recorded on the study, or found by tag, or a new one."""
        if known_id:
            try:
                self.client.get_run(known_id)
                return known_id
            except MlflowException:
                pass
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = 'study'", max_results=1
        )
        if found:
            return found[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=study_name, tags={PARENT_TAG: "study"})
        self.client.log_batch(run.info.run_id, params=_params(params))
        # The parent is a container: it stays FINISHED so no crash can leave it RUNNING; workers still log to it.
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def log_summary(self, run_id: str, metrics: Mapping[str, float], tags: Mapping[str, Any]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )

    def start_trial(
        self, parent_id: str, trial_number: int, params: Mapping[str, Any], resolved: Mapping[str, Any]
    ) -> TrialRun:
        tags = {"mlflow.parentRunId": parent_id, "optuna.trial_number": str(trial_number), "optuna.state": "RUNNING"}
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial_number}", tags=tags)
        extra = {k: v for k, v in resolved.items() if k not in params or params[k] != v}
        self.client.log_batch(run.info.run_id, params=_params(params) + _params(extra, "config."))
        return TrialRun(self.client, run.info.run_id)


class TrialRun:
    """One trial's child run: per-epoch metrics in one call each, a checkpoint, a final state."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])

    def log_artifact(self, path: Path, artifact_path: str = "checkpoints") -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(
        self, state: str, tags: Mapping[str, Any], metrics: Mapping[str, float] | None = None, killed: bool = False
    ) -> None:
        """Record the final Optuna state; FINISHED for COMPLETE and PRUNED, FAILED (or KILLED) otherwise."""
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
            tags=[RunTag("optuna.state", state)] + [RunTag(k, str(v)) for k, v in tags.items()],
        )
        status = "KILLED" if killed else {"COMPLETE": "FINISHED", "PRUNED": "FINISHED"}.get(state, "FAILED")
        self.client.set_terminated(self.run_id, status)
