"""`hpo export`: the best trial's model as an MLflow model directory, loadable without this project.

The model is saved in MLflow's default ``pt2`` format (``torch.export``: a graph and weights, no pickled
Python classes), so ``mlflow.pyfunc.load_model(DIR)`` and ``mlflow.pytorch.load_model(DIR)`` work in any
environment with torch and mlflow. It takes raw images (float32, NCHW, the data set's pixel scale) and
returns class indices; normalisation is part of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna

from search import records
from search.config import Settings
from search.errors import HpoError, SettingsError
from search.plugins import load_objective
from search.records import best_trial
from search.tracking import save_model


@dataclass(frozen=True)
class Exported:
    trial: int
    value: float
    out: Path
    input_shape: tuple[int, ...]


def export_best(study: optuna.Study, settings: Settings, out: Path) -> Exported:
    """Write the best trial's model to ``out`` (which must be new or empty)."""
    best = best_trial(study)
    if best is None:
        raise HpoError(f"study {study.study_name!r} has no completed trial yet, so there is no model to export. "
                       "Run `hpo run FILE` until a trial completes (see `hpo status FILE`).")
    checkpoint = best.user_attrs.get(records.CHECKPOINT)
    if not checkpoint or not Path(checkpoint).is_file():
        raise HpoError(f"the best trial #{best.number}'s checkpoint {checkpoint!r} is missing on this machine. "
                       "Run the export where the study ran, or copy the checkpoints folder back.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SettingsError(f"--out {out} already exists and is not an empty folder; an export never overwrites. "
                            "Choose a new folder or delete that one.")
    objective = load_objective(settings.objective_name)(settings)
    model, example = objective.load_model(checkpoint)  # ExportUnsupported says what to do instead
    if out.exists():
        out.rmdir()  # MLflow writes a new directory
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, example, out)
    value = best.value if best.value is not None else float("nan")  # a COMPLETE trial always has one
    return Exported(best.number, float(value), out, tuple(example.shape[1:]))
