"""Create or load a study, open its stores, and run trials until the budget is met.

The budget counts finished trials (COMPLETE + PRUNED) in the storage, not trials started by this
process: running `hpo run` again resumes the study and only tops it up. Failed trials do not count; the
study goes on after one, and stops after ``max_failures`` failures in a row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import interrupts, records
from search.config import Settings
from search.errors import StorageError
from search.failures import TrialFailed, TrialTakenOver
from search.optuna_adapter import fail_stale, heartbeat_enabled, refused_tell, stored_trial
from search.plugins import ObjectivePlugin, data_identity, load_objective
from search.progress import Progress
from search.pruning import build_pruner
from search.publish import on_study_end
from search.records import best_trial
from search.run_dir import check_before_creating, check_folder, claim_folder, stored_id
from search.samplers import build_sampler, seed_next_trial
from search.session import StudyContext
from search.storage_retry import StorageUnavailable
from search.stores import RunPaths, open_storage, sqlite_path
from search.summary import counts, state_counts
from search.tracking import Tracker, mark_killed
from search.workers import BudgetLock, budget_lock, recover_local_orphans, retry


def load_or_create_study(settings: Settings, storage: optuna.storages.BaseStorage,
                         data: dict[str, Any] | None = None) -> optuna.Study:
    """Create the study, or load it after checking it was made by a compatible study file and, given the
    objective's ``data`` identity (``data_identity``), on the same data. A study made before a part of the
    fingerprint existed gets that part now, so later runs are checked on it."""
    name = settings.study.name
    fingerprint = {**settings.fingerprint(), **({"data": data} if data else {})}
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if name in existing:
        study = optuna.load_study(study_name=name, storage=storage, sampler=build_sampler(settings.sampler,
                                  settings.space, settings.study.pack),
                                  pruner=build_pruner(settings.pruner, settings.study.max_epochs))
        stored = {"direction": study.direction.name.lower(), **(study.user_attrs.get(records.FINGERPRINT) or {})}
        diffs = differences(stored, fingerprint)
        if diffs:
            raise StorageError(
                f"a study named {name!r} already exists in this storage with a different {' and '.join(diffs)}; its "
                "trials would not be comparable with new ones. Run the changed settings as a new study (--study-name "
                "NEW or --set study.name=NEW, or another storage), or set them back to the values 'there' to resume it."
            )
        stored = study.user_attrs.get(records.FINGERPRINT) or {}
        if set(fingerprint) - {"direction"} - set(stored):
            study.set_user_attr(records.FINGERPRINT, {**fingerprint, **stored})
        return study
    study = optuna.create_study(
        study_name=name, storage=storage, direction=settings.study.direction, load_if_exists=True,
        sampler=build_sampler(settings.sampler, settings.space, settings.study.pack),
        pruner=build_pruner(settings.pruner, settings.study.max_epochs),
    )
    if records.FINGERPRINT not in study.user_attrs:
        study.set_user_attr(records.FINGERPRINT, fingerprint)
        study.set_user_attr(records.SETTINGS, json.loads(settings.model_dump_json(exclude={"objective"})))
        study.set_user_attr(records.OBJECTIVE, settings.objective.model_dump(mode="json"))
    return study


def stored_settings(study: optuna.Study) -> Settings:
    """The settings a study was created with, from its user attrs: what `hpo export --study NAME` needs
    when no study file is given."""
    from search.config import settings_from_dict

    data, objective = study.user_attrs.get(records.SETTINGS), study.user_attrs.get(records.OBJECTIVE)
    if not isinstance(data, dict) or not isinstance(objective, dict):
        raise StorageError(f"study {study.study_name!r} has no stored settings (it was not created by `hpo run`); "
                           "pass its study FILE instead of --study.")
    data = dict(data)
    name = data.pop("objective_name", "cnn")
    source = f"study {study.study_name!r} (settings stored in its storage)"
    data.pop("source", None)
    return settings_from_dict({**data, "objective": {"name": name, **objective}}, source=source)


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between a stored fingerprint and the file's, in words; only keys the stored one has count, so
    a study made before a key was added to the fingerprint still resumes."""
    parts = []
    for key in [k for k in new if k in old and old[k] != new[k]]:
        if key == "space":
            changed = sorted(set(old[key]) ^ set(new[key]) | {p for p in new[key] if old[key].get(p) != new[key][p]})
            parts.append(f"search space (parameters {', '.join(changed)})")
        elif key == "data":
            parts.append(f"data (its images changed: {_images(old[key], new[key])}; the old trials were scored on "
                         "other validation images)")
        elif key == "objective":  # a key only one side has is tuned or unread there: the space or dataset says so
            changed = [k for k in new[key] if k in old[key] and old[key][k] != new[key][k]]
            if changed:
                words = "; ".join(f"{k} {old[key][k]!r} there, {new[key][k]!r} in the file" for k in changed)
                parts.append(f"objective ({words})")
        else:
            parts.append(f"{key} ({old[key]!r} there, {new[key]!r} in the file)")
    return parts


def _images(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'26/3/7 train/val/test images of 3 classes there, 31/3/8 of 3 now', or that only the images per class moved."""
    def totals(data: dict[str, Any]) -> str:
        return "/".join(str(data.get(f"{s}_images", "?")) for s in ("train", "val", "test"))

    if totals(old) == totals(new) and old.get("classes") == new.get("classes"):
        return f"the same {totals(new)} train/val/test images of {new.get('classes')} classes, not of the same classes"
    return (f"{totals(old)} train/val/test images of {old.get('classes', '?')} classes there, {totals(new)} of "
            f"{new.get('classes', '?')} now")


class _FailureGuard:
    """Counts failed trials in a row, so a broken setup stops the study instead of looping forever."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.last_reason = ""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            self.in_a_row += 1
            self.last_reason = str(trial.user_attrs.get(records.REASON, "unknown"))
            if trial.user_attrs.get(records.ERROR_AT):
                self.last_reason += f" (at {trial.user_attrs[records.ERROR_AT]})"
        else:
            self.in_a_row = 0


@dataclass
class RunResult:
    study: optuna.Study
    paths: RunPaths
    parent_run_id: str
    new_trials: int
    stopped_by_failures: str | None  # the last reason, when max_failures trials failed in a row
    test_metrics: dict[str, float]
    workers_failed: dict[int, int] | None = None  # `hpo run --workers N`: worker processes that exited with an
    # error, by their number (0 to N-1), with their exit codes (negative: the signal that ended one)


@dataclass
class OpenStudy:
    """A study with its stores open and its objective ready: what a worker needs to run trials."""

    settings: Settings
    paths: RunPaths
    study: optuna.Study
    tracker: Tracker
    parent_run_id: str
    objective: ObjectivePlugin
    ctx: StudyContext | None = None  # what the objective was attached with (trial packing opens sessions in it)


def quiet_libraries() -> None:
    """Optuna's and alembic's info lines off: trial outcomes are ours to report (progress lines)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def open_study(settings: Settings, paths: RunPaths, n_trials: int | None = None,
               progress: Progress | None = None, describe: bool = True) -> OpenStudy:
    """Check the data and the run directory's stamp, open (or create) the Optuna study and the MLflow parent run,
    stamp the run directory (search/run_dir.py), attach the objective.
    ``describe``: print the objective's line (the data, where it lives, the model); off in a forked worker,
    whose launcher prints the same line."""
    quiet_libraries()
    objective = load_objective(settings.objective_name)(settings)
    objective.prepare()  # a missing data set fails here, before any store is created
    if describe:
        print(objective.describe(), file=sys.stderr)  # the data, where it lives, the model: the run's first lines
    holder: dict[str, Tracker] = {}

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
        if "tracker" in holder:
            mark_killed(holder["tracker"], trial, "stale_heartbeat")
        retry(study, trial)

    heartbeat = (settings.study.heartbeat_interval, settings.study.stale_after)
    check_before_creating(paths)
    storage = open_storage(paths.storage_url, heartbeat=heartbeat, on_stale=on_stale,
                           retry_seconds=settings.study.storage_retry_seconds)
    check_folder(paths, stored_id(storage, settings.study.name))  # another study's run directory: nothing written
    tracker = holder["tracker"] = Tracker(paths.tracking_uri, settings.study.name, paths.artifacts)
    tracker.check_owner(lambda: stored_id(storage, settings.study.name))  # another study's MLflow experiment
    study = load_or_create_study(settings, storage, data_identity(objective))  # once both stores answer
    paths.root.mkdir(parents=True, exist_ok=True)
    lock = _budget_lock(settings, paths)
    lock.acquire()  # workers starting together must find, not each create, the parent run (and agree on an id)
    try:
        study_id = claim_folder(paths, study)
        if study_id is None:
            tracker.check_owner(lambda: None)
        else:
            tracker.claim(study_id)
        parent = tracker.parent_run(settings.study.name, _study_params(settings, n_trials),
                                    known_id=study.user_attrs.get(records.PARENT_RUN_ID))
        if study.user_attrs.get(records.PARENT_RUN_ID) != parent:
            study.set_user_attr(records.PARENT_RUN_ID, parent)
        if study.user_attrs.get(records.BUDGET, "unset") != n_trials:
            study.set_user_attr(records.BUDGET, n_trials)
        if study.user_attrs.get(records.MAX_EPOCHS) != settings.study.max_epochs:
            study.set_user_attr(records.MAX_EPOCHS, settings.study.max_epochs)
    finally:
        lock.release()
    if progress is not None:
        progress.start(study)
    ctx = StudyContext(settings, tracker, parent, paths.checkpoints, progress)
    objective.attach(ctx)
    return OpenStudy(settings, paths, study, tracker, parent, objective, ctx)


def _budget_lock(settings: Settings, paths: RunPaths) -> BudgetLock:
    return budget_lock(paths.storage_url, settings.study.name, paths.root, settings.study.storage_retry_seconds)


Step = Literal["start", "wait", "stop"]


def claim_slot(opened: OpenStudy, n_trials: int | None) -> Step:
    """What a worker holding the budget lock does next, before it starts a trial (both trial loops ask here).

    The trials of dead or cut-off workers are failed and re-enqueued first: orphans of this machine's dead
    workers (reason ``worker_died``) and trials whose heartbeat went stale (``stale_heartbeat``). Then "start"
    only if ``finished + running < n_trials``; "wait" while the rest of the budget is running on other workers
    and heartbeats are on (to take a trial over if its worker dies or is cut off, instead of leaving it to
    nobody); else "stop". On "start" the study's sampler is seeded for the trial about to be asked
    (``search.samplers.seed_next_trial``).
    """
    study, settings = opened.study, opened.settings
    trials = study.get_trials(deepcopy=False)  # one read for the orphans and the counts, unless a trial is retried
    retried = recover_local_orphans(study, on_fail=lambda t: mark_killed(opened.tracker, t), trials=trials)
    retried += fail_stale(study, "stale_heartbeat")
    c = counts(study) if retried else state_counts(trials)
    finished = c["COMPLETE"] + c["PRUNED"]
    if n_trials is not None and finished + c["RUNNING"] >= n_trials:
        return "stop" if finished >= n_trials or not heartbeat_enabled(study) else "wait"
    opened.tracker.reopen(opened.parent_run_id)  # another worker may have ended it while this one waited
    seed_next_trial(study, settings.sampler, settings.space, settings.study.pack, number=sum(c.values()))
    return "start"


def wait_to_take_over(opened: OpenStudy) -> None:
    """After ``claim_slot`` said "wait": look again soon, not a whole heartbeat interval, so that this worker exits
    soon after the last trial ends (``take_over_poll_seconds``)."""
    time.sleep(take_over_poll_seconds(opened.paths.storage_url))


def take_over_poll_seconds(storage_url: str) -> float:
    """How often a waiting worker reads the study: 0.2 s on an SQLite file, whose workers share one machine (the
    read is a local file's, on a core the waiting worker leaves idle; at 1 s the last worker out exited 0.5 s
    after the last trial on average, 4% of a 30-trial `hpo run --workers 2` of the quickstart); 1 s on a
    database server, which the waiting workers of many machines would read at once."""
    return 0.2 if sqlite_path(storage_url) is not None else 1.0


def run_trials(opened: OpenStudy, n_trials: int | None, timeout: float | None,
               progress: Progress | None = None) -> tuple[int, str | None]:
    """Run trials until ``n_trials`` are finished in the storage (all workers together) or time is up.

    Each trial is started under the budget lock (see search/workers.py) once ``claim_slot`` says so. Returns
    (trials this worker ran, last failure reason if the study stopped after ``max_failures`` failures in a row).
    """
    from search.packing import PackRunner, can_pack  # packing builds on this module (claim_slot, taken_over...)

    study, settings = opened.study, opened.settings
    lock = _budget_lock(opened.settings, opened.paths)
    guard = _FailureGuard(settings.study.max_failures)
    callbacks: list[Any] = [guard] + ([progress] if progress is not None else [])
    started = time.monotonic()
    ran = 0
    if settings.study.pack > 1:
        if can_pack(opened.objective):
            runner = PackRunner(opened, n_trials, timeout, settings.study.pack, lock, callbacks,
                                should_stop=lambda: guard.in_a_row >= guard.limit)
            try:
                ran = runner.run()
            finally:
                interrupts.release()  # after a member's end that its tell did not release (taken over, an error)
            return ran, guard.last_reason if guard.in_a_row >= guard.limit else None
        print(f"note: study.pack = {settings.study.pack}, but objective {settings.objective_name!r} cannot pack "
              "trials; running them one at a time", file=sys.stderr)

    current: list[optuna.Trial] = []

    def objective(trial: optuna.Trial) -> float:
        lock.release()  # the trial is RUNNING now, so other workers count it
        current[:] = [trial]
        try:
            return float(opened.objective(trial))
        except KeyboardInterrupt:
            if records.REASON not in trial.user_attrs:  # before its session began (sampling): Optuna fails it
                with contextlib.suppress(Exception):  # with no reason; it trained nothing, so no retry is due
                    trial.set_user_attr(records.REASON, "interrupted")
            raise

    while guard.in_a_row < guard.limit:
        if timeout is not None and time.monotonic() - started >= timeout:
            break
        lock.acquire()
        try:
            step = claim_slot(opened, n_trials)
            if step == "stop":
                break
            if step == "wait":
                lock.release()
                wait_to_take_over(opened)
                continue
            study.optimize(objective, n_trials=1, catch=(TrialFailed,), callbacks=callbacks)
            ran += 1
        except TrialTakenOver:
            continue  # logged by the session; the trial's retry belongs to whoever took it over
        except Exception as exc:
            lost = _storage_lost(exc)
            if lost is not None:  # Optuna's tell after a failed trial hit it again and raised something else
                raise lost from None
            if not (current and isinstance(exc, (ValueError, AssertionError)) and refused_tell(exc)):
                raise
            taken_over_at_the_end(opened, current[0])
        finally:
            lock.release()
            interrupts.release()  # a Ctrl-C held while the trial's end was recorded and told stops the run now
    stopped = guard.last_reason if guard.in_a_row >= guard.limit else None
    return ran, stopped


def _storage_lost(exc: BaseException) -> StorageUnavailable | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, StorageUnavailable):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def taken_over_at_the_end(opened: OpenStudy, trial: optuna.Trial) -> None:
    """The trial ran to its end here, but another worker failed it as stale (this worker was cut off after its
    last update) before Optuna could record the result: keep the other worker's decision, end the run KILLED."""
    logging.getLogger("hpo").warning(
        "trial %s was failed and retried by another worker while this one finished it (its heartbeat was missing "
        "for longer than study.grace_period, e.g. a network partition); its result is dropped and its MLflow run "
        "ended KILLED", trial.number)
    run_id = stored_trial(trial).user_attrs.get(records.MLFLOW_RUN_ID)
    if run_id:
        opened.tracker.mark_taken_over(str(run_id))


def run_study(settings: Settings, paths: RunPaths, n_trials: int | None = None, timeout: float | None = None,
              progress: Progress | None = None, finish: bool = True, register_model: bool = True,
              describe: bool = True) -> RunResult:
    """Open the stores, top the study up to its budget, then (unless ``finish`` is off) finish it and end the
    parent run. ``finish`` is off for the workers of `hpo run --workers`, whose parent process does both."""
    n_trials = n_trials if n_trials is not None else settings.study.n_trials
    timeout = timeout if timeout is not None else settings.study.timeout
    opened = open_study(settings, paths, n_trials, progress, describe)
    with parent_lifetime(opened, own=finish) as outcome:
        ran, stopped = run_trials(opened, n_trials, timeout, progress)
        test_metrics = finish_study(opened, n_trials, register_model) if finish else {}
        outcome["status"] = "FAILED" if stopped else "FINISHED"
    return RunResult(opened.study, paths, opened.parent_run_id, ran, stopped, test_metrics)


def finish_study(opened: OpenStudy, n_trials: int | None, register_model: bool = True) -> dict[str, float]:
    """Score the best trial on the test set and write the study's summaries, once, under the budget lock
    (several workers may finish at the same moment). A Ctrl-C meanwhile waits for the end: cut short, the best
    model's MLflow run was left FAILED (search/interrupts.py)."""
    lock = _budget_lock(opened.settings, opened.paths)
    lock.acquire()
    try:
        with interrupts.held():
            test_metrics = score_best(opened.study, opened.objective, opened.tracker, opened.parent_run_id)
            on_study_end(opened.study, opened.settings, opened.tracker, opened.objective, n_trials,  # note, model
                         register_model=register_model)
    finally:
        lock.release()
    return test_metrics


@contextlib.contextmanager
def parent_lifetime(opened: OpenStudy, own: bool) -> Iterator[dict[str, str]]:
    """End the parent run when the block ends, if ``own``: KILLED on Ctrl-C or SIGTERM, FAILED on an error,
    else the status the block leaves in the yielded dict (FINISHED, or FAILED after ``max_failures``)."""
    outcome = {"status": "FINISHED"}
    try:
        yield outcome
    except KeyboardInterrupt:
        outcome["status"] = "KILLED"
        raise
    except StorageUnavailable:
        own = False  # ending it needs the storage (a count of running trials): the other workers end it
        raise
    except BaseException:
        outcome["status"] = "FAILED"
        raise
    finally:
        if own:
            end_parent(opened, outcome["status"])


def end_parent(opened: OpenStudy, status: str) -> bool:
    """End the study's parent run with ``status``, unless a trial of the study is still RUNNING.

    The rule for several workers: each process that runs trials of the study (`hpo run`, `hpo worker`) tries
    this when it stops; while another worker is still in a trial, the parent stays RUNNING and that worker
    ends it later. A worker that starts a trial sets it RUNNING again (``Tracker.reopen``), so the last one to
    stop decides the status. Returns whether it was ended. Never raises: the run's own outcome matters more.
    """
    lock = _budget_lock(opened.settings, opened.paths)
    try:
        lock.acquire()
        try:
            if counts(opened.study)["RUNNING"]:
                return False
            opened.tracker.end_run(opened.parent_run_id, status)
            return True
        finally:
            lock.release()
    except Exception as exc:  # noqa: BLE001 - a lost connection at the very end must not hide the result
        logging.getLogger("hpo").warning("could not end the study's MLflow run %s: %s", opened.parent_run_id, exc)
        return False


def _study_params(settings: Settings, n_trials: int | None) -> dict[str, Any]:
    es = settings.early_stopping
    return {
        "direction": settings.study.direction,
        "metric": settings.study.metric,
        "n_trials": n_trials,
        "timeout": settings.study.timeout,
        "max_epochs": settings.study.max_epochs,
        "sampler": settings.sampler.model_dump_json(exclude_none=True),
        "pruner": settings.pruner.model_dump_json(exclude_none=True),
        "early_stopping": es.model_dump_json(exclude_none=True),
        "space": json.dumps({k: v.model_dump(exclude_none=True) for k, v in settings.space.params.items()}),
        "lr_scaling": settings.space.lr_scaling,
        "study_file": settings.source,
    }


def score_best(study: optuna.Study, objective: ObjectivePlugin, tracker: Tracker, parent: str) -> dict[str, float]:
    """Score the best trial on the held-out test set, once per best trial, and log it on the parent run."""
    best = best_trial(study)
    if best is None or records.CHECKPOINT not in best.user_attrs:
        return {}
    if study.user_attrs.get(records.TEST_SCORED_TRIAL) == best.number:
        return records.test_metrics(study, best)
    metrics = {k: float(v) for k, v in objective.test_score(best.user_attrs[records.CHECKPOINT]).items()}
    study.set_user_attr(records.TEST_SCORED_TRIAL, best.number)
    study.set_user_attr(records.TEST_METRICS, metrics)
    tags = {"best_trial": best.number, "best_mlflow_run_id": best.user_attrs.get(records.MLFLOW_RUN_ID, "")}
    tags.update({f"best_param.{k}": v for k, v in best.params.items()})
    summary = {f"best_{k}": v for k, v in metrics.items()}
    if best.value is not None:
        summary["best_value"] = best.value
    tracker.log_summary(parent, summary, tags)
    return metrics
