"""`hpo export`: the best trial's model as an MLflow model directory, loadable without this project.

The model is saved in MLflow's default ``pt2`` format (``torch.export``: a graph and weights, no pickled
Python classes), so ``mlflow.pyfunc.load_model(DIR)`` and ``mlflow.pytorch.load_model(DIR)`` work in any
environment with torch and mlflow. It takes raw images (float32, NCHW, the data set's pixel scale) and
returns class indices; normalisation is part of the model.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import optuna

from search import records
from search.config import Settings
from search.errors import HpoError, SettingsError, first_line
from search.plugins import load_objective
from search.records import best_trial
from search.stores import redact
from search.tracking import probe_server, save_model

BEST_ARTIFACT = "checkpoints/best.pt"  # where a completed trial's MLflow run holds its best.pt


@dataclass(frozen=True)
class Exported:
    trial: int
    value: float
    out: Path
    input_shape: tuple[int, ...]
    input_info: dict[str, str]  # the model's words on its input (pixel scale; how image files are prepared)


def export_best(study: optuna.Study, settings: Settings, out: Path, tracking_uri: str | None = None) -> Exported:
    """Write the best trial's model to ``out`` (which must be new or empty). Its checkpoint is the local
    ``best.pt`` or, where the trial ran on another machine, the copy logged on its MLflow run in ``tracking_uri``."""
    best = best_trial(study)
    if best is None:
        raise HpoError(f"study {study.study_name!r} has no completed trial yet, so there is no model to export. "
                       "Run `hpo run FILE` until a trial completes (see `hpo status FILE`).")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SettingsError(f"--out {out} already exists and is not an empty folder; an export never overwrites. "
                            "Choose a new folder or delete that one.")
    with tempfile.TemporaryDirectory(prefix="hpo-export-") as scratch:
        checkpoint = _checkpoint(best, tracking_uri, Path(scratch))
        objective = load_objective(settings.objective_name)(settings)
        model, example = objective.load_model(checkpoint)  # ExportUnsupported says what to do instead
    if out.exists():
        out.rmdir()  # MLflow writes a new directory
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, example, out)
    value = best.value if best.value is not None else float("nan")  # a COMPLETE trial always has one
    info = {str(k): str(v) for k, v in (getattr(model, "input_info", None) or {}).items()}
    return Exported(best.number, float(value), out, tuple(example.shape[1:]), info)


def _checkpoint(best: optuna.trial.FrozenTrial, tracking_uri: str | None, scratch: Path) -> str:
    """The best trial's ``best.pt`` here: the local file, else the copy on its MLflow run (workers on several
    machines each keep the checkpoints of their own trials; every completed trial logs its ``best.pt``)."""
    local = best.user_attrs.get(records.CHECKPOINT)
    if local and Path(local).is_file():
        return str(local)
    run_id = best.user_attrs.get(records.MLFLOW_RUN_ID)
    if tracking_uri and run_id:
        from mlflow.tracking import MlflowClient

        try:
            if tracking_uri.startswith(("http://", "https://")):
                probe_server(tracking_uri)  # seconds, where MLflow's client retries for minutes
            return str(MlflowClient(tracking_uri).download_artifacts(run_id, BEST_ARTIFACT, str(scratch)))
        except Exception as exc:  # noqa: BLE001 - MLflow raises its own errors and OSErrors alike
            why = first_line(exc)[:200]
            fetched = f"nor could it be fetched from its MLflow run {run_id} in {redact(tracking_uri)} ({why})"
    else:
        fetched = "and it has no MLflow run to fetch it from"
    host = best.user_attrs.get("host")
    raise HpoError(f"the best trial #{best.number}'s checkpoint {local!r} is not on this machine"
                   f"{f' (trial run on {host})' if host else ''}, {fetched}. Run the export on the machine that ran "
                   "the trial, copy its checkpoints folder here, or pass the --tracking-uri the study logged to.")
