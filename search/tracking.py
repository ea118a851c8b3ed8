"""The one place that talks to MLflow.

Layout: one experiment per study, one parent run for the study (tag ``hpo.role=study``) shared by every
worker, one nested child run per trial named ``trial-<number>``. Everything goes through ``MlflowClient``
with explicit run ids, never the global "active run", so several trials or workers cannot cross wires.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search import records
from search.cache import cache_home
from search.errors import TrackingError, first_line
from search.metric_queue import MAX_PER_CALL, MetricQueue, in_calls
from search.stores import sqlite_path, sqlite_url

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# MLflow prints "View run ... at URL" to stdout for every run ended on a server: two lines per trial between the
# run's summary lines; the study note and `hpo status` carry each trial's link instead.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

from mlflow.entities import Metric, Param, Run, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient as MlflowClient  # noqa: E402  (re-exported for replay)

PARENT_TAG = "hpo.role"
LATEST_TAG = "hpo.latest."  # + a parent run's param key: the value of the study's latest run, where it differs
MAX_PARAM_LENGTH = 6000
# MLflow 3's UI opens an experiment in its GenAI view unless told it is for model training. Two ways, both used:
# the experiment tag below (name and value are the UI's own, ExperimentKind.CUSTOM_MODEL_DEVELOPMENT in
# mlflow/server/js), which UIs up to about 3.5 follow; and, since the UI's global GenAI / Model training switch
# (3.17 ignores the tag), the query parameter on every link hpo prints.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"
TRAINING_VIEW = "workflowType=machine_learning"


def probe_server(uri: str, seconds: float = 10) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when a tracking server does not answer, and before
    anything is created when what answers is not MLflow (another service's port, such as optuna-dashboard's):
    MLflow's client would only fail at its first call, after the study's storage was made."""
    import urllib.error
    import urllib.request

    api = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(api, timeout=seconds) as response:
            kind = response.headers.get_content_type()
            if kind == "application/json":
                return
            got = f"an answer of type {kind}"
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return  # an MLflow server behind authentication: MLflow's client sends the credentials
        got = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"the MLflow tracking server {uri} does not answer ({reason}). Start it (for example "
            f"`mlflow server --backend-store-uri postgresql://... --host 0.0.0.0 --port 5000`), check the "
            "address and port, or leave --tracking-uri out to use the run directory's mlflow.db."
        ) from exc
    raise TrackingError(
        f"{uri} answers but is not an MLflow tracking server: MLflow's API there gave {got}. Check the port "
        "(`mlflow server` listens on 5000 unless told otherwise; optuna-dashboard's port is not MLflow's) and "
        "any path prefix, or leave --tracking-uri out to use the run directory's mlflow.db."
    )


def _params(values: Mapping[str, Any], prefix: str = "") -> list[Param]:
    return [Param(f"{prefix}{k}", str(v)[:MAX_PARAM_LENGTH]) for k, v in values.items()]


class Tracker:
    """An MLflow experiment for one study, reached through one client."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_root: Path | None = None,
                 writing: bool = True) -> None:
        """``writing``: refuse an experiment in MLflow's trash (runs cannot be written there), not only read."""
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        prepare_local_store(tracking_uri)
        if tracking_uri.startswith(("http://", "https://")):
            probe_server(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        try:
            experiment = self.client.get_experiment_by_name(experiment_name)
            if experiment is None:
                # On a server, artifacts go where it says (proxied: ``mlflow-artifacts:/``), so every machine
                # reads what another wrote; a local folder only for a local store.
                local = artifact_root is not None and not self.is_server
                location = artifact_root.resolve().as_uri() if local and artifact_root else None
                try:
                    experiment_id = self.client.create_experiment(
                        experiment_name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT})
                except MlflowException:  # another worker created it first
                    experiment = self.client.get_experiment_by_name(experiment_name)
                    if experiment is None:
                        raise
                    experiment_id = experiment.experiment_id
            else:
                experiment_id = experiment.experiment_id
        except (MlflowException, OSError) as exc:
            raise TrackingError(
                f"could not open the MLflow tracking store {tracking_uri!r}: {first_line(exc)}. "
                "Check that the URI is right and, for an http:// server, that `mlflow server` is running "
                "and reachable; or leave --tracking-uri out to use the run directory's mlflow.db."
            ) from exc
        self.experiment_id = experiment_id
        if writing and experiment is not None and experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"the MLflow experiment {experiment_name!r} in {tracking_uri} was deleted (it is in MLflow's trash, "
                f"id {experiment_id}), so no run can be recorded in it, and MLflow keeps its name taken. Restore it "
                f"(`MLFLOW_TRACKING_URI={tracking_uri} mlflow experiments restore --experiment-id {experiment_id}`, or "
                "in the MLflow UI) and run again; or give this study another name (--study-name NEW). `mlflow gc "
                f"--experiment-ids {experiment_id}` frees the name for good, dropping its runs."
            )

    def check_owner(self, read_id: Callable[[], str | None]) -> None:
        """Refuse (TrackingError) an experiment that another study of the same name records into (the experiment's
        ``hpo.study_id`` tag, set by ``claim``): two studies' trial runs, each named ``trial-N``, would mix under one
        parent run. ``read_id`` reads this study's id (None: a new study, or one in memory, which never claims
        one) after the tag is read: a worker of the same study may give it its id and tag the experiment meanwhile,
        and the id is set before the tag."""
        owner = self._owner()
        if owner is not None:
            self._refuse_other(owner, read_id())

    def claim(self, study_id: str) -> None:
        """Tag the experiment with the study's id (one made before the tag is adopted), then read it back: of two
        studies that tag it at once, the last write wins and the other is refused."""
        owner = self._owner()
        if owner is None:
            self.client.set_experiment_tag(self.experiment_id, records.STUDY_ID, study_id)
            owner = self._owner()
        self._refuse_other(owner, study_id)

    def _owner(self) -> str | None:
        return self.client.get_experiment(self.experiment_id).tags.get(records.STUDY_ID)

    def _refuse_other(self, owner: str | None, study_id: str | None) -> None:
        if owner != study_id:
            raise TrackingError(
                f"the MLflow experiment {self.experiment_name!r} in {self.tracking_uri} holds the runs of another "
                f"study named {self.experiment_name!r} (study id {owner}; this one is "
                f"{f'id {study_id}' if study_id else 'new'}, in another storage or made again), and their trials' "
                "runs would mix. Give this study its own name (--study-name NEW, or study.name in the file), or "
                "use another --tracking-uri."
            )

    @property
    def is_server(self) -> bool:
        """An MLflow tracking server (http/https): its artifact store is shared by every machine."""
        return self.tracking_uri.startswith(("http://", "https://"))

    def parent_run(self, study_name: str, params: Mapping[str, Any], known_id: str | None = None) -> str:
        """The study's parent run, RUNNING: the one recorded on the study (reopened), or found by tag, or a new one.

        It stays RUNNING while trials run and is ended by ``end_run`` when the run of the study ends, so its
        status and duration in the UI say what happened (see search/study.py ``end_parent`` for who ends it).
        """
        self._mark_model_development()
        run: Run | None = None
        if known_id:
            try:
                run = self.client.get_run(known_id)
            except MlflowException:  # gone for good (`mlflow gc`): a new parent run
                run = None
            if run is not None and run.info.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"the MLflow run of study {study_name!r} (run {known_id}, the parent of its trials' runs) was "
                    f"deleted, so the trials cannot be recorded under it. Restore it (`MLFLOW_TRACKING_URI="
                    f"{self.tracking_uri} mlflow runs restore --run-id {known_id}`, or in the MLflow UI) and run "
                    "again; or start another study (--study-name NEW)."
                )
        if run is None:
            found = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = 'study'", max_results=1
            )
            run = found[0] if found else None
        if run is None:
            created = self.client.create_run(self.experiment_id, run_name=study_name, tags={PARENT_TAG: "study"})
            self.client.log_batch(created.info.run_id, params=_params(params))
            return str(created.info.run_id)
        self._set_running(run)
        self._note_changed_params(run, params)
        return str(run.info.run_id)

    def _note_changed_params(self, run: Run, params: Mapping[str, Any]) -> None:
        """MLflow keeps a run's params as first logged: they cannot change. A later run of the study with other
        settings (a bigger budget, another pruner) says so in tags, ``hpo.latest.KEY`` with its value for each key
        whose value differs from the param's; a tag whose key matches again is removed; a key the run has no
        param for yet (logged by an older hpo) becomes a param. ``run`` as read just now (its params and tags)."""
        data, run_id = run.data, run.info.run_id
        values = _params(params)
        new = [p for p in values if p.key not in data.params]
        changed = [RunTag(f"{LATEST_TAG}{v.key}", v.value) for v in values
                   if v.key in data.params and data.params[v.key] != v.value]
        kept = {t.key for t in changed}
        if new or any(data.tags.get(t.key) != t.value for t in changed):
            self.client.log_batch(run_id, params=new, tags=changed)
        for key in data.tags:
            if key.startswith(LATEST_TAG) and key not in kept:
                with contextlib.suppress(MlflowException):  # gone already: another worker of the study removed it
                    self.client.delete_tag(run_id, key)

    def _mark_model_development(self) -> None:
        """Tag an experiment made before hpo set the tag (or by hand), so the UI opens it on its runs."""
        experiment = self.client.get_experiment(self.experiment_id)
        if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)

    def reopen(self, run_id: str) -> None:
        """Set a run RUNNING again (a resumed study, or a worker that starts a trial after another ended it)."""
        self._set_running(self.client.get_run(run_id))

    def _set_running(self, run: Run) -> None:
        if run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")

    def end_run(self, run_id: str, status: str) -> None:
        """End a run with FINISHED, FAILED or KILLED (end time now)."""
        self.client.set_terminated(run_id, status)

    def log_data(self, run_id: str, info: Mapping[str, Any]) -> None:
        """What the study trains on (classes, sizes, normalisation, placement): `data.json` on the study's run,
        and the facts worth a column as `hpo.data.*` tags (tags, not params: a resumed study may differ)."""
        self.client.log_dict(run_id, dict(info), "data.json")
        shown = ("dataset", "num_classes", "image_size", "in_channels", "train_images", "placement")
        tags = [RunTag(f"hpo.data.{k}", str(info[k])[:5000]) for k in shown if k in info]
        if info.get("class_names"):
            tags.append(RunTag("hpo.data.class_names", ",".join(map(str, info["class_names"]))[:5000]))
        self.client.log_batch(run_id, tags=tags)

    def log_summary(self, run_id: str, metrics: Mapping[str, float], tags: Mapping[str, Any]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )

    def end_orphan(self, run_id: str, reason: str = "worker_died") -> None:
        """End the run of a trial whose worker died (it would otherwise stay RUNNING forever)."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return
        if run.info.status == "RUNNING":
            self.client.log_batch(run_id, tags=[RunTag("optuna.state", "FAIL"), RunTag("hpo.reason", reason)])
            self.client.set_terminated(run_id, "KILLED")

    def mark_taken_over(self, run_id: str) -> None:
        """A trial this worker finished that another worker had already failed and retried: KILLED, not its result."""
        self.client.log_batch(run_id, tags=[RunTag("optuna.state", "FAIL"), RunTag("hpo.reason", "taken_over")])
        self.client.set_terminated(run_id, "KILLED")

    def start_trial(
        self, parent_id: str, trial_number: int, params: Mapping[str, Any], resolved: Mapping[str, Any]
    ) -> TrialRun:
        tags = {"mlflow.parentRunId": parent_id, "optuna.trial_number": str(trial_number), "optuna.state": "RUNNING"}
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial_number}", tags=tags)
        extra = {k: v for k, v in resolved.items() if k not in params or params[k] != v}
        self.client.log_batch(run.info.run_id, params=_params(params) + _params(extra, "config."))
        return TrialRun(self.client, run.info.run_id)


def empty_store() -> Path:
    """An empty, fully migrated MLflow SQLite store, made once per MLflow schema in the user's cache
    (``search.cache.cache_home``): MLflow makes a store by running its alembic migrations,
    3 to 6 s for every new run directory (BENCHMARKS.md section 8), where a copy of this one takes milliseconds.
    It has no experiment: MLflow adds its Default one when it opens a copy, as it does in a store it made."""
    import mlflow

    migrations = sorted(os.listdir(Path(mlflow.__file__).parent / "store" / "db_migrations" / "versions"))
    schema = hashlib.sha256("\n".join(migrations).encode()).hexdigest()[:12]
    path = cache_home() / f"mlflow-{mlflow.__version__}-{schema}.db"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        made = Path(tmp) / "empty.db"
        MlflowClient(tracking_uri=sqlite_url(made)).search_experiments()  # MLflow creates and migrates it
        with contextlib.closing(sqlite3.connect(made)) as conn, conn:
            conn.execute("DELETE FROM experiments WHERE experiment_id = 0")  # MLflow adds it again where a copy opens
        os.replace(made, path)  # whole or not at all: processes making it at once each replace it with a good one
    return path


def copy_empty_store(db: Path) -> None:
    """Create a missing SQLite tracking store ``db`` as a copy of ``empty_store()``. Never raises: where the
    cache cannot be written or the copy fails, ``db`` stays missing and MLflow creates it the slow way."""
    if db.exists():
        return
    part = db.with_name(f".{db.name}.{os.getpid()}.part")
    try:
        shutil.copyfile(empty_store(), part)
        os.link(part, db)  # never over a store another process created meanwhile (FileExistsError)
    except Exception as exc:  # noqa: BLE001 - MLflow makes the store itself
        logging.getLogger(__name__).debug("no copy of an empty MLflow store for %s: %s", db, exc)
    finally:
        part.unlink(missing_ok=True)


def prepare_local_store(tracking_uri: str) -> None:
    """A local SQLite tracking store's folder, and its file as a copy of ``empty_store()`` if it is missing;
    nothing for other URIs. No connection is opened (`hpo run --workers` calls it before it forks)."""
    db = sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        copy_empty_store(db)


def import_store_code(tracking_uri: str) -> None:
    """Import MLflow's SQL tracking store now if ``tracking_uri`` is one of the databases MLflow serves with it
    (about 0.7 s, paid by the first client). `hpo run --workers` calls it before it forks, so its workers share
    one import, not one each."""
    from mlflow.store.db.db_types import DATABASE_ENGINES

    if tracking_uri.partition(":")[0].partition("+")[0] in DATABASE_ENGINES:
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


class _BackgroundWriter:
    """One daemon thread per process that makes queued MLflow calls in order (resume checkpoint uploads), so
    training never waits for the artifact store. For epoch metrics, MLflow's own asynchronous logging
    (``log_batch(synchronous=False)``) was tried first: it starts a queue per run and ``set_terminated`` joins
    its threads, about 1 s per trial (BENCHMARKS section 2), more than the logging it takes off short trials;
    they go through a ``MetricQueue``."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Callable[..., object], tuple[Any, ...]]] = queue.Queue()
        self._errors: list[BaseException] = []
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, call: Callable[..., object], *args: Any) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="hpo-mlflow-writer", daemon=True)
                self._thread.start()
        self._queue.put((call, args))

    def flush(self) -> list[BaseException]:
        """Wait until every queued call is made; the errors they raised since the last flush."""
        self._queue.join()
        errors, self._errors = self._errors, []
        return errors

    def _work(self) -> None:
        while True:
            call, args = self._queue.get()
            try:
                call(*args)
            except Exception as exc:  # kept for flush(): a logging failure must not kill the writer
                self._errors.append(exc)
            finally:
                self._queue.task_done()


_METRICS = MetricQueue()
atexit.register(_METRICS.flush)


class TrialRun:
    """One trial's child run: per-epoch metrics, a checkpoint, a final state.

    Epoch metrics are queued for a background thread (``MetricQueue``: held up to 2 s and merged per run), so
    training does not wait for the tracking store. ``flush`` waits for everything queued; ``finish`` (every way
    a trial ends: complete, pruned, failed, interrupted) sends the run's queued epochs with its final state, so
    a short trial's epochs take no call of their own. A killed process can lose queued epochs of its run; its
    retry copies the resumed history anew.
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self._remote: RemoteResume | None = None
        self._epochs: dict[int, dict[str, float]] = {}

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items()]
        self._epochs.setdefault(epoch, {}).update((m.key, m.value) for m in batch)
        _METRICS.put(self.run_id, batch, self._write_metrics)

    def curves(self, keys: list[str]) -> dict[str, list[float]]:
        """Per-epoch values of ``keys`` as logged through this run, resumed epochs included: what
        ``metric_histories`` reads back from the store, without reading it (the trial's end draws them)."""
        return {key: [self._epochs[e][key] for e in sorted(self._epochs) if key in self._epochs[e]] for key in keys}

    def _write_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        self.client.log_batch(run_id, metrics=metrics)

    def flush(self) -> None:
        """Wait until every queued epoch is in the store; a failed write is a warning, not a failed trial."""
        for exc in _METRICS.flush():
            logging.getLogger(__name__).warning("run %s: an epoch's metrics were not logged: %s", self.run_id, exc)
        for exc in _UPLOADS.flush():
            logging.getLogger(__name__).warning("run %s: a resume checkpoint was not uploaded: %s", self.run_id, exc)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str = "checkpoints") -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def upload_resume(self, path: Path, epoch: int) -> bool:
        """Queue ``path`` (the local last.pt, just written) for the artifact store; see ``RemoteResume``.
        False, and nothing queued, while the previous upload of this run is still on its way."""
        if self._remote is None:
            self._remote = RemoteResume(self.client, self.run_id)
        return self._remote.submit(path, epoch)

    def log_text(self, text: str, name: str) -> None:
        """A text artifact on the run (a failed trial's traceback)."""
        self.client.log_text(self.run_id, text, name)

    def finish(
        self, state: str, tags: Mapping[str, Any], metrics: Mapping[str, float] | None = None, killed: bool = False
    ) -> None:
        """Record the final Optuna state; FINISHED for COMPLETE and PRUNED, FAILED (or KILLED) otherwise. The
        run's queued epochs go in the same call as the final metrics and tags when they fit in one."""
        epochs = _METRICS.take(self.run_id)
        self.flush()  # the run's epochs already on their way, and anything else queued
        now = int(time.time() * 1000)
        final = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
        labels = [RunTag("optuna.state", state)] + [RunTag(k, str(v)) for k, v in tags.items()]
        if len(epochs) + len(final) + len(labels) > MAX_PER_CALL:
            for part in in_calls(epochs, MAX_PER_CALL):
                self._write_metrics(self.run_id, part)
            epochs = []
        self.client.log_batch(self.run_id, metrics=epochs + final, tags=labels)
        status = "KILLED" if killed else {"COMPLETE": "FINISHED", "PRUNED": "FINISHED"}.get(state, "FAILED")
        self.client.set_terminated(self.run_id, status)


# --- Resume checkpoints in the artifact store: a retry on another machine, no shared filesystem -----------------

RESUME_DIR = "resume"
RESUME_POINTER = "latest.json"
_UPLOADS = _BackgroundWriter()  # a thread of its own: a checkpoint upload must not hold up the epochs' metrics
atexit.register(_UPLOADS.flush)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _artifact_repo(client: MlflowClient, run_id: str) -> Any:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(client.get_run(run_id).info.artifact_uri, tracking_uri=client.tracking_uri)


class RemoteResume:
    """A trial's resume checkpoint in its own MLflow run's artifacts (``resume/``), for a retry elsewhere.

    A reader never loads half a checkpoint, whatever the artifact store guarantees (a proxied server's local
    folder copies in place; an upload cut off by ``kill -9`` may leave a short file): every upload gets a new
    name, ``resume/last-e<epoch>-<id>.pt``, never overwritten; only once it is stored is the small pointer
    ``resume/latest.json`` (file, epoch, size, sha256) replaced, and then the older versions are deleted. The
    reader follows the pointer and checks size and hash, so a cut-off upload or a torn pointer reads as "no
    checkpoint here". Uploads run on their own background thread from a hard link of the local ``last.pt``
    (``save_atomic`` replaces that file by rename, so the link stays the epoch it was); at most one is pending
    per run, so they are never more frequent than the local checkpoints and never pile up.
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self._pending = threading.Event()
        self._stored: list[str] = []

    def submit(self, path: Path, epoch: int) -> bool:
        if self._pending.is_set():
            return False
        folder = Path(tempfile.mkdtemp(prefix="hpo-resume-"))
        snapshot = folder / f"last-e{epoch:04d}-{uuid.uuid4().hex[:8]}.pt"
        try:
            os.link(path, snapshot)
        except OSError:  # no hard links here (another filesystem): copy
            shutil.copyfile(path, snapshot)
        self._pending.set()
        _UPLOADS.submit(self._upload, snapshot, epoch)
        return True

    def _upload(self, snapshot: Path, epoch: int) -> None:
        try:
            pointer = {"file": snapshot.name, "epoch": epoch, "size": snapshot.stat().st_size,
                       "sha256": _sha256(snapshot)}
            self.client.log_artifact(self.run_id, str(snapshot), RESUME_DIR)
            self.client.log_dict(self.run_id, pointer, f"{RESUME_DIR}/{RESUME_POINTER}")  # written last
            repo = _artifact_repo(self.client, self.run_id)
            for old in self._stored:
                repo.delete_artifacts(f"{RESUME_DIR}/{old}")
            self._stored = [snapshot.name]
        finally:
            shutil.rmtree(snapshot.parent, ignore_errors=True)
            self._pending.clear()


def fetch_resume(tracker: Tracker, run_id: str, dest: Path) -> Path | None:
    """The run's resume checkpoint downloaded into ``dest``, or None when it has none, or none that is whole."""
    log = logging.getLogger(__name__)
    try:
        pointer_file = tracker.client.download_artifacts(run_id, f"{RESUME_DIR}/{RESUME_POINTER}", str(dest))
        pointer = json.loads(Path(pointer_file).read_text())
        name = str(pointer["file"])
    except Exception as exc:  # noqa: BLE001 - no pointer (never uploaded, or removed) or a torn one: no checkpoint
        log.debug("run %s: no resume checkpoint in the artifact store: %s", run_id, exc)
        return None
    try:
        path = Path(tracker.client.download_artifacts(run_id, f"{RESUME_DIR}/{name}", str(dest)))
    except Exception as exc:  # noqa: BLE001
        log.warning("run %s: the resume checkpoint %s could not be downloaded: %s", run_id, name, exc)
        return None
    if path.stat().st_size != pointer.get("size") or _sha256(path) != pointer.get("sha256"):
        log.warning("run %s: the resume checkpoint %s is incomplete (size or sha256 differ); not used", run_id, name)
        return None
    return path


def delete_resume(tracker: Tracker, run_ids: list[str]) -> None:
    """Remove the runs' resume checkpoints (their trial finished: nothing will resume from them). Never raises."""
    for run_id in run_ids:
        try:
            _artifact_repo(tracker.client, run_id).delete_artifacts(RESUME_DIR)
        except Exception as exc:  # noqa: BLE001 - a leftover file must not fail a finished trial
            logging.getLogger(__name__).warning("run %s: resume checkpoints not removed: %s", run_id, exc)


# --- What users look at: UI links, metric curves, tags, files and models ----------------- ---------------------------

DEFAULT_UI_URL = "http://127.0.0.1:5000"
UI_URL_ENV = "HPO_MLFLOW_UI_URL"


def ui_base_url(tracking_uri: str) -> str:
    """The MLflow UI for this store: $HPO_MLFLOW_UI_URL, else the tracking server itself, else `hpo ui`'s default."""
    if os.environ.get(UI_URL_ENV):
        return os.environ[UI_URL_ENV].rstrip("/")
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return DEFAULT_UI_URL


def existing_tracker(tracking_uri: str, experiment_name: str) -> Tracker | None:
    """A Tracker for reading: None when the store or the experiment does not exist (nothing is created)."""
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        return None
    try:
        if MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment_name) is None:
            return None
    except MlflowException:
        return None
    return Tracker(tracking_uri, experiment_name, writing=False)


def run_url(tracker: Tracker, run_id: str) -> str:
    """A link to one run in the MLflow UI's model-training view (what optuna-dashboard shows next to a trial)."""
    return f"{ui_base_url(tracker.tracking_uri)}/#/experiments/{tracker.experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def experiments_url(base: str, experiment_id: str | None = None) -> str:
    """The UI's page of one experiment's runs (or of all experiments), in its model-training view."""
    return f"{base.rstrip('/')}/#/experiments{'/' + experiment_id if experiment_id else ''}?{TRAINING_VIEW}"


def metric_histories(tracker: Tracker, run_id: str, keys: list[str]) -> dict[str, list[float]]:
    """Per-epoch values of ``keys`` (ordered by step; the last value logged for a step wins)."""
    out: dict[str, list[float]] = {}
    for key in keys:
        by_step = {m.step: m.value for m in sorted(tracker.client.get_metric_history(run_id, key),
                                                   key=lambda m: (m.step, m.timestamp))}
        out[key] = [by_step[s] for s in sorted(by_step)]
    return out


def set_tags(tracker: Tracker, run_id: str, tags: Mapping[str, Any]) -> None:
    tracker.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def log_files(tracker: Tracker, run_id: str, paths: list[Path], artifact_path: str) -> None:
    for path in paths:
        tracker.client.log_artifact(run_id, str(path), artifact_path)


def _signature(model: Any, example: Any) -> tuple[Any, Any]:
    """The input as numpy and a tensor signature with a free batch dimension (what MLflow's pt2 format needs)."""
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        output = model(example)
    x = example.numpy()
    return x, infer_signature(x, output.numpy())


def _metadata(model: Any) -> dict[str, Any] | None:
    """For the MLflow model's metadata: the class names a served model's outputs index into, and what its input
    must be (``input``; ``image_files`` for a folder study), which its signature alone does not say."""
    names = getattr(model, "class_names", None)
    meta: dict[str, Any] = {"class_names": list(names)} if names else {}
    meta.update(getattr(model, "input_info", None) or {})
    return meta or None


def _requirements() -> list[str]:
    import mlflow.pytorch

    return list(mlflow.pytorch.get_default_pip_requirements())


def log_model(tracker: Tracker, run_id: str, model: Any, example: Any, register_as: str | None) -> dict[str, str]:
    """Log ``model`` with ``mlflow.pytorch.log_model`` (input example, signature) on ``run_id`` and register it.

    The model flavour API works only through the global active run, so this resumes ``run_id`` for the one
    call and restores the previous tracking URI; it runs once, at the end of a study, in one thread.
    Registration is skipped, and ``version`` left empty, when the store has no model registry.
    """
    import contextlib
    import io

    import mlflow
    import mlflow.pytorch

    x, signature = _signature(model, example)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracker.tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(model, name="model", input_example=x, signature=signature,
                                            pip_requirements=_requirements(), metadata=_metadata(model))
        out = {"model_uri": info.model_uri, "version": ""}
        if register_as:
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints two lines per registration
                    version = mlflow.register_model(info.model_uri, register_as, await_registration_for=60)
                out["version"] = str(version.version)
            except MlflowException as exc:
                logging.getLogger(__name__).warning("model not registered (no registry here?): %s", exc)
        return out
    finally:
        mlflow.set_tracking_uri(previous)


def warm_model_logging() -> None:
    """Pay ahead, once per process, the set-up that logging a model pays on its first call: torch.export's
    (about 1 s in a process that has not traced anything yet; exercised here on a one-layer model) and MLflow's
    map of installed modules to distributions, which its requirements check builds by reading the file lists of
    every installed distribution (about 0.6 s; a private MLflow cache, so nothing happens if MLflow moves it).
    `hpo run --workers` calls it while its workers train, so the end of the study does not wait for it.
    Never raises: it only saves time."""
    try:
        import torch

        torch.export.export(torch.nn.Linear(1, 1), (torch.zeros(1, 1),))
        from mlflow.utils import requirements_utils

        requirements_utils._init_packages_to_modules_map()  # type: ignore[no-untyped-call]
    except Exception as exc:  # noqa: BLE001 - the real logging at the end pays it instead
        logging.getLogger(__name__).debug("model logging not warmed up: %s", exc)


def save_model(model: Any, example: Any, out: Path) -> None:
    """Write ``model`` as an MLflow model directory (pytorch and pyfunc flavours, signature, input example)."""
    import mlflow.pytorch

    x, signature = _signature(model, example)
    mlflow.pytorch.save_model(model, str(out), input_example=x, signature=signature,
                              pip_requirements=_requirements(), metadata=_metadata(model))


def mark_killed(tracker: Tracker, trial: FrozenTrial, reason: str = "worker_died") -> None:
    """An orphaned trial's MLflow run must not stay RUNNING: end it KILLED with the reason Optuna's record has
    (``worker_died``, ``stale_heartbeat``, ``stale_recovered``)."""
    run_id = trial.user_attrs.get(records.MLFLOW_RUN_ID)
    if run_id:
        tracker.end_orphan(run_id, reason)
