"""What a run leaves for people to look at: dashboard notes and artifacts, fit diagnoses, the logged best model.

Two hooks, each one line at its call site: ``on_trial_end`` (from the trial session, while the Optuna
trial can still take attributes) and ``on_study_end`` (from ``run_study``, after the final test score).
Neither may fail a trial or a study: what goes wrong here is logged as a warning and the run goes on.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from search import records
from search.config import Settings
from search.curves_png import trial_curves_png
from search.diagnosis import diagnose
from search.notes import study_note, trial_note
from search.plugins import ExportUnsupported, ObjectivePlugin
from search.records import best_trial
from search.tracking import Tracker, log_model, metric_histories, run_url, set_tags

ARTIFACT_DIR = "optuna-artifacts"
CURVES = ["train_loss", "val_loss", "val_accuracy"]
log = logging.getLogger(__name__)


@functools.cache
def note_writer() -> Callable[[Any, str], None]:
    """optuna-dashboard's ``save_note`` (the dashboard's own note format), without its web app.

    ``import optuna_dashboard`` imports the app, the app ``optuna.importance``, and that scikit-learn: about 1 s
    of every run's start-up, for a function that needs only optuna. Unless the package is loaded already, its
    ``_note`` module is loaded on its own (``_note_module_alone``). Where this version of optuna-dashboard has no
    such module, or it cannot load alone, the package is imported as before."""
    if "optuna_dashboard" not in sys.modules:
        save = getattr(_note_module_alone(), "save_note", None)
        if callable(save):
            return save  # type: ignore[no-any-return]
    from optuna_dashboard import save_note

    return cast(Callable[[Any, str], None], save_note)


def _note_module_alone() -> ModuleType | None:
    """optuna-dashboard's ``_note.py`` run without its package: the same file under the same name, which a later
    ``import optuna_dashboard`` (`hpo dashboard`, `hpo report`) then reuses. None where it cannot be."""
    name = "optuna_dashboard._note"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("optuna_dashboard")  # finds the package without importing it
    if package is None or not package.origin:
        return None
    path = Path(package.origin).with_name("_note.py")
    spec = importlib.util.spec_from_file_location(name, path) if path.is_file() else None
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 - a version whose note module needs its package: the caller imports that
        del sys.modules[name]
        return None
    return module


def artifact_store(root: Path) -> FileSystemArtifactStore:
    """optuna-dashboard's artifact store for one study: ``<run dir>/<study>/optuna-artifacts``."""
    path = root / ARTIFACT_DIR
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


def fit_of(tracker: Tracker, run_id: str, max_epochs: int | None) -> tuple[dict[str, list[float]], Any]:
    """The run's curves from MLflow and the diagnosis they give."""
    history = metric_histories(tracker, run_id, CURVES)
    return history, diagnose(history, max_epochs)


def on_trial_end(session: Any, state: str) -> None:
    """Curves PNG and checkpoint as dashboard artifacts, fit diagnosis (user attr and MLflow tag), trial note."""
    try:
        _trial_end(session, state)
    except Exception as exc:  # a plot or note must never fail the trial
        log.warning("trial %s: could not publish dashboard artifacts/note: %s", session.trial.number, exc)


def _trial_end(session: Any, state: str) -> None:
    trial, ctx, run = session.trial, session.ctx, session.run
    if run is None:
        return
    max_epochs = session.settings.study.max_epochs
    if session.reason == "interrupted":  # Ctrl-C: stop now, only the note (one write) says what happened to it
        attrs = {**trial.user_attrs, "mlflow_run_url": run_url(ctx.tracker, run.run_id)}
        note_writer()(trial, trial_note(trial.number, state, attrs, max_epochs))
        return
    store = artifact_store(ctx.checkpoint_root.parent)
    history = run.curves(CURVES)  # what this process logged; the store holds the same
    diagnosis = diagnose(history, max_epochs)
    label = None
    if state == "COMPLETE":
        label = f"{diagnosis.label}: {diagnosis.reason}"
        trial.set_user_attr(records.FIT_DIAGNOSIS, diagnosis.label)
        set_tags(ctx.tracker, run.run_id, {"fit_diagnosis": diagnosis.label, "fit_diagnosis_reason": diagnosis.reason})
        checkpoint = trial.user_attrs.get(records.CHECKPOINT)
        if checkpoint and Path(checkpoint).is_file():
            upload_artifact(artifact_store=store, file_path=checkpoint, study_or_trial=trial)
    with tempfile.TemporaryDirectory() as tmp:
        png = trial_curves_png(history, f"trial {trial.number} ({state.lower()})",
                               Path(tmp) / f"trial-{trial.number}-curves.png")
        upload_artifact(artifact_store=store, file_path=str(png), study_or_trial=trial)
    attrs = {**trial.user_attrs, "mlflow_run_url": run_url(ctx.tracker, run.run_id)}
    note_writer()(trial, trial_note(trial.number, state, attrs, max_epochs, label))


STORE_OPTIONS = ("--run-dir", "--storage", "--tracking-uri", "--set", "--study-name")


def run_command(settings: Any) -> tuple[str, str]:
    """The `hpo run` command line that made this run, and its options that locate the study's results."""
    args = sys.argv[1:]
    if args[:1] != ["run"]:
        return f"hpo run {shlex.quote(settings.source or 'STUDY_FILE')}", ""
    options = []
    for i, arg in enumerate(args[:-1]):
        if arg in STORE_OPTIONS:
            options += [arg, args[i + 1]]
    options += [a for a in args if a.split("=", 1)[0] in STORE_OPTIONS and "=" in a]
    quoted = " ".join(shlex.quote(a) for a in options)
    return " ".join(shlex.quote(a) for a in ["hpo", *args]), f" {quoted}" if quoted else ""


def on_study_end(study: optuna.Study, settings: Settings, tracker: Tracker, objective: ObjectivePlugin,
                 n_trials: int | None, register_model: bool = True) -> None:
    """The study note; the best trial's model logged (and, if ``register_model``, registered) in MLflow when the
    best trial changed. `hpo compare` turns registration off: its many studies would flood the registry."""
    try:
        write_study_note(study, settings.model_dump(mode="json", exclude={"objective"}), n_trials,
                         *run_command(settings))
    except Exception as exc:
        log.warning("could not write the study note: %s", exc)
    try:
        log_best_model(study, tracker, objective, register=register_model)
    except Exception as exc:
        log.warning("could not log the best model in MLflow: %s", exc)


def write_study_note(study: optuna.Study, settings: dict[str, Any], n_trials: int | None, command: str,
                     options: str = "") -> str:
    best = best_trial(study)
    scored = study.user_attrs.get(records.TEST_SCORED_TRIAL)
    test = dict(study.user_attrs.get(records.TEST_METRICS, {})) if best and scored == best.number else {}
    body = study_note(study.study_name, study.get_trials(deepcopy=False), settings, best, test, n_trials, command,
                      options)
    note_writer()(study, body)
    return body


def log_best_model(study: optuna.Study, tracker: Tracker, objective: ObjectivePlugin,
                   register: bool = True) -> dict[str, str] | None:
    """Log the best trial's model on its MLflow run and (if ``register``) register it under the study name,
    once per best trial."""
    best = best_trial(study)
    if best is None or records.CHECKPOINT not in best.user_attrs:
        return None
    if study.user_attrs.get(records.MODEL_TRIAL) == best.number:
        return None
    try:
        model, example = objective.load_model(best.user_attrs[records.CHECKPOINT])
    except ExportUnsupported:
        return None  # a custom loop's model: its checkpoint is logged on its run, there is no model to log
    logged = log_model(tracker, best.user_attrs[records.MLFLOW_RUN_ID], model, example,
                       register_as=study.study_name if register else None)
    parent = study.user_attrs.get(records.PARENT_RUN_ID)
    if parent:
        set_tags(tracker, parent, {"best_model_uri": logged["model_uri"], "best_model_version": logged["version"]})
    study.set_user_attr(records.MODEL_TRIAL, best.number)
    return logged
