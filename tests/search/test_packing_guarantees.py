"""Trial packing keeps the unpacked guarantees: Ctrl-C and SIGTERM, stale and taken-over trials, trial_timeout.

Each member of a pack must end as an unpacked trial ends: Ctrl-C or SIGTERM fail it (reason ``interrupted``), end
its MLflow run KILLED and re-enqueue it, and the next `hpo run` resumes it; a trial whose worker's heartbeat went
stale is failed and re-enqueued before a trial starts; a member another worker failed as stale while this one ran
it is dropped, its run KILLED; an epoch that runs past a member's trial_timeout is cut short by an alarm.
"""

from __future__ import annotations

import signal
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from search import optuna_adapter
from search.config import Settings, load_settings
from search.optuna_adapter import heartbeat
from search.stores import run_paths
from search.study import OpenStudy, open_study, run_trials
from search.tracking import mark_killed
from search.workers import fail_and_retry
from tests.search.failure_helpers import wait_for
from tests.search.test_packing import QUICKSTART
from tests.search.test_recovery import LONG, UNENDING, rerun_epochs
from tests.search.workers_helpers import child_runs, hpo, hpo_cmd, load

pytestmark = pytest.mark.slow

SMALL = ["study.pack=2", "objective.device='cpu'", "objective.widths=[8,16]", "pruner={name='none'}",
         "early_stopping.enabled=false", "study.checkpoint_every_seconds=0",
         "space.batch_size={type='categorical', choices=[128]}"]  # one pack key: every trial joins one pack


def _open(tmp_path: Path, *overrides: str) -> tuple[Settings, OpenStudy]:
    settings = load_settings(QUICKSTART, [*SMALL, *overrides])
    return settings, open_study(settings, run_paths(str(tmp_path), settings.study.name, None, None), None)


def _both_have(epochs: int) -> Any:
    def ready(trials: list[FrozenTrial]) -> bool:
        held = [t for t in trials if t.state == TrialState.RUNNING and len(t.intermediate_values) >= epochs]
        return len(held) == 2
    return ready


def _rerun_runs_exactly_the_retries(args: tuple[str, ...], tmp_path: Path, root: Path, name: str,
                                    retried: list[int]) -> tuple[optuna.Study, Any, list[FrozenTrial]]:
    """The same command again, after the trials ``retried`` (numbers 0..n-1) were interrupted: it completes
    exactly their n retries and nothing new, each resumed (past epoch 0) with the params of the trial it
    retries. Returns the study, the MLflow client and the completed trials."""
    again = hpo(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    study, client = load(root, name)
    trials = {t.number: t for t in study.get_trials()}
    done = [t for t in trials.values() if t.state == TrialState.COMPLETE]
    assert len(done) == len(retried) and len(trials) == 2 * len(retried)  # exactly the budget, nothing new
    assert sorted(t.user_attrs["resumed_from_trial"] for t in done) == retried
    for t in done:
        assert t.params == trials[t.user_attrs["resumed_from_trial"]].params
        assert t.user_attrs["resumed_at_epoch"] >= 1
    return study, client, done


@pytest.mark.parametrize(("how", "resume"), [("sigterm", False), ("ctrl-c", True)])
def test_stopping_hpo_run_pack_fails_requeues_every_member_and_the_next_run_resumes_them(
        tmp_path: Path, how: str, resume: bool) -> None:
    name = how.replace("-", "")
    args = ("run", str(QUICKSTART), "--set", f"study.name='{name}'", *LONG, "--pack", "2",
            "--set", "space.batch_size={type='categorical', choices=[128]}")
    proc = subprocess.Popen(hpo_cmd(*args, "--set", f"study.max_epochs={UNENDING}", "--quiet"), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = tmp_path / "runs" / name
    while not (root / "mlflow.db").exists() and proc.poll() is None:  # opened after the Optuna storage is made:
        time.sleep(0.05)  # polling sooner would race the run at creating its tables
    # two epochs reported: the last.pt of epoch 0 is written (epoch 1 is reported after it)
    held = wait_for(proc, root / "optuna.db", name, _both_have(2))
    proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err
    study, client = load(root, name)
    trials = {t.number: t for t in study.get_trials()}
    assert sorted(t.number for t in held) == [0, 1]
    assert sorted(trials[0].user_attrs["packed_with"] + trials[1].user_attrs["packed_with"]) == [0, 0, 1]
    runs = {r.info.run_id: r for r in child_runs(client, name)}
    for number in (0, 1):
        stopped = trials[number]
        assert stopped.state == TrialState.FAIL and stopped.user_attrs["reason"] == "interrupted"
        run = runs[stopped.user_attrs["mlflow_run_id"]]
        assert run.info.status == "KILLED" and run.data.tags["hpo.reason"] == "interrupted"
        assert (root / "checkpoints" / f"trial-{number}" / "last.pt").exists()
    waiting = [t for t in trials.values() if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == [0, 1] and len(trials) == 4
    for t in waiting:
        assert t.params == trials[t.system_attrs["failed_trial"]].params
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "KILLED"
    if not resume:
        return

    epochs = rerun_epochs([trials[0], trials[1]])
    study, client, done = _rerun_runs_exactly_the_retries((*args, "--set", f"study.max_epochs={epochs}"), tmp_path,
                                                          root, name, retried=[0, 1])
    assert sorted(done[0].user_attrs["packed_with"] + done[1].user_attrs["packed_with"]) == [2, 2, 3]  # one pack
    for t in done:
        assert sorted(t.intermediate_values) == list(range(epochs)) and t.user_attrs["epochs_run"] == epochs
        steps = [m.step for m in client.get_metric_history(t.user_attrs["mlflow_run_id"], "val_accuracy")]
        assert sorted(steps) == list(range(epochs))
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "FINISHED"


def test_ctrl_c_to_hpo_run_workers_2_pack_2_fails_and_requeues_every_member_of_both_workers_and_a_rerun_resumes(
        tmp_path: Path) -> None:
    """`--workers 2 --pack 2`: two worker processes each hold a pack of two trials. Ctrl-C to `hpo run` (it
    passes SIGTERM on to its workers) ends all four as one worker ends its pack; the command again (with a
    max_epochs a few epochs past where they stopped, so that the rerun is short) runs exactly the four retries,
    each resumed from its own last.pt, and nothing new."""
    name = "workerspack"
    common = ("run", str(QUICKSTART), "--set", f"study.name='{name}'", *LONG[:-2], "--trials", "4",
              "--workers", "2", "--pack", "2", "--set", "space.batch_size={type='categorical', choices=[128]}")
    proc = subprocess.Popen(hpo_cmd(*common, "--set", f"study.max_epochs={UNENDING}", "--quiet"), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = tmp_path / "runs" / name

    def all_four_have_two_epochs(trials: list[FrozenTrial]) -> bool:
        return sum(t.state == TrialState.RUNNING and len(t.intermediate_values) >= 2 for t in trials) == 4

    wait_for(proc, root / "optuna.db", name, all_four_have_two_epochs)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    study, client = load(root, name)
    trials = {t.number: t for t in study.get_trials()}
    stopped = [trials[n] for n in range(4)]
    ends = [(t.number, t.state, t.user_attrs.get("reason"), len(t.intermediate_values)) for t in stopped]
    assert all(t.state == TrialState.FAIL and t.user_attrs.get("reason") == "interrupted" for t in stopped), (ends, err)
    by_worker: dict[int, list[FrozenTrial]] = {}
    for t in stopped:
        by_worker.setdefault(t.user_attrs["pid"], []).append(t)
        assert client.get_run(t.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert [len(pair) for pair in by_worker.values()] == [2, 2]  # two workers, one pack of two each
    for pair in by_worker.values():  # "packed_with": the pack's members when each joined
        assert {n for t in pair for n in t.user_attrs["packed_with"]} == {t.number for t in pair}
    waiting = [t for t in trials.values() if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == [0, 1, 2, 3] and len(trials) == 8

    epochs = rerun_epochs(stopped)
    args = (*common, "--set", f"study.max_epochs={epochs}")
    _, _, done = _rerun_runs_exactly_the_retries(args, tmp_path, root, name, retried=[0, 1, 2, 3])
    assert all(t.user_attrs["epochs_run"] == epochs for t in done)
    assert all(sorted(t.intermediate_values) == list(range(epochs)) for t in done)


def test_ctrl_c_while_a_member_saves_its_result_interrupts_it_too(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from search.session import TrialSession

    def complete(self: TrialSession, checkpoint: dict[str, Any], model: Any = None) -> float:
        raise KeyboardInterrupt  # as if Ctrl-C came while best.pt was written

    monkeypatch.setattr(TrialSession, "complete", complete)
    settings, opened = _open(tmp_path, "study.max_epochs=2")
    with pytest.raises(KeyboardInterrupt):
        run_trials(opened, 2, None)
    trials = opened.study.get_trials()
    assert [(t.state, t.user_attrs["reason"]) for t in trials[:2]] == [(TrialState.FAIL, "interrupted")] * 2
    assert sorted(t.system_attrs["failed_trial"] for t in trials[2:]) == [0, 1]
    assert {t.state for t in trials[2:]} == {TrialState.WAITING}
    client = opened.tracker.client
    assert {client.get_run(t.user_attrs["mlflow_run_id"]).info.status for t in trials[:2]} == {"KILLED"}


@pytest.mark.parametrize("where", ["suggest", "session"])
def test_ctrl_c_between_ask_and_joining_a_pack_fails_and_requeues_that_trial_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Trial 1 is asked while trial 0 already sits in the pack; Ctrl-C comes before trial 1 is a member (while
    its params are sampled, or while its session is made). Without a guard it stayed RUNNING for ever, holding
    a slot of the budget; now it ends as a member does: FAIL, reason interrupted, its retry enqueued."""
    import search.packing
    from search.session import StudyContext

    asked: list[int] = []
    if where == "suggest":
        real_suggest = search.packing.suggest

        def suggest(trial: optuna.Trial, space: Any) -> dict[str, Any]:
            asked.append(trial.number)
            if len(asked) == 2:
                raise KeyboardInterrupt
            return real_suggest(trial, space)

        monkeypatch.setattr(search.packing, "suggest", suggest)
    else:
        real_trial = StudyContext.trial

        def trial_session(self: StudyContext, trial: optuna.Trial, *args: Any) -> Any:
            asked.append(trial.number)
            if len(asked) == 2:
                raise KeyboardInterrupt
            return real_trial(self, trial, *args)

        monkeypatch.setattr(StudyContext, "trial", trial_session)
    settings, opened = _open(tmp_path, "study.max_epochs=2")
    with pytest.raises(KeyboardInterrupt):
        run_trials(opened, 2, None)
    assert asked == [0, 1]
    trials = opened.study.get_trials()
    assert [(t.number, t.state, t.user_attrs.get("reason")) for t in trials[:2]] == [
        (0, TrialState.FAIL, "interrupted"), (1, TrialState.FAIL, "interrupted")]
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert sorted(t.system_attrs["failed_trial"] for t in trials[2:]) == [0, 1]
    assert {t.state for t in trials[2:]} == {TrialState.WAITING}
    assert trials[2 + [t.system_attrs["failed_trial"] for t in trials[2:]].index(1)].params == trials[1].params


def test_a_packing_worker_waits_for_a_trial_running_elsewhere_and_takes_it_over_when_it_goes_stale(
        tmp_path: Path) -> None:
    """Another worker holds trial 0 and stops beating (cut off). Budget 2: this worker runs trial 1, then, the rest
    of the budget running elsewhere, stays instead of exiting; once trial 0 is stale it is failed with its reason
    and re-enqueued, and this worker runs the retry: the budget is met."""
    settings, opened = _open(tmp_path, "study.max_epochs=2", "study.heartbeat_interval=1", "study.grace_period=5")
    study = opened.study
    with warnings.catch_warnings():  # "heartbeat ... with Study.optimize": this trial's worker is the test
        warnings.simplefilter("ignore", UserWarning)
        lost = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True)})
    with heartbeat(lost):  # one heartbeat, then none: its worker was cut off
        pass
    run_trials(opened, 2, None)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["reason"] == "stale_heartbeat"
    assert trials[1].state == TrialState.COMPLETE and trials[1].user_attrs["packed_with"] == [1]
    retry = trials[2]
    assert retry.system_attrs["failed_trial"] == 0 and retry.state == TrialState.COMPLETE
    assert retry.params["lr"] == trials[0].params["lr"] and len(trials) == 3


@pytest.fixture
def patched_epochs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Calls to ``PackedFit._train_epoch`` go through the hooks the test appends (call number, the pack); a hook
    may return True to hang the epoch (until the pack's alarm interrupts it, 20 s at most)."""
    from objectives.packed import PackedFit

    real = PackedFit._train_epoch
    hooks: list[Any] = []
    calls = [0]

    def train_epoch(self: PackedFit) -> list[float]:
        calls[0] += 1
        if any(hook(calls[0], self) for hook in hooks):
            ends = time.monotonic() + 20
            while time.monotonic() < ends:
                time.sleep(0.05)
        return real(self)

    monkeypatch.setattr(PackedFit, "_train_epoch", train_epoch)
    yield hooks


def test_a_member_taken_over_by_another_worker_is_dropped_and_its_retry_resumes(
        tmp_path: Path, patched_epochs: list[Any]) -> None:
    settings, opened = _open(tmp_path, "study.max_epochs=3")
    url = opened.paths.storage_url

    def other_worker_fails_trial_0(call: int, pack: Any) -> bool:
        if call == 2:  # epoch 1 of both members: another worker, finding trial 0's heartbeat stale, fails it
            other = optuna.load_study(study_name=settings.study.name, storage=url)
            assert fail_and_retry(other, other.trials[0], "stale_heartbeat", lambda t: mark_killed(opened.tracker, t))
        return False

    patched_epochs.append(other_worker_fails_trial_0)
    ran, stopped = run_trials(opened, 2, None)
    trials = opened.study.get_trials()
    assert stopped is None and ran == 2  # trial 1 and the retry; trial 0 is the other worker's
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["reason"] == "stale_heartbeat"
    assert sorted(trials[0].intermediate_values) == [0]  # its epoch 1 was not recorded here
    assert trials[1].state == TrialState.COMPLETE and trials[1].user_attrs["epochs_run"] == 3
    retry = trials[2]
    assert retry.system_attrs["failed_trial"] == 0 and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from_trial"] == 0 and retry.user_attrs["resumed_at_epoch"] == 1
    assert len(trials) == 3
    client = opened.tracker.client
    run = client.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["hpo.reason"] == "taken_over"


def test_a_member_taken_over_after_it_recorded_its_result_keeps_the_other_workers_decision(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This worker finished trial 0 (its MLflow run COMPLETE) but, cut off, was failed as stale by another worker
    before it could tell Optuna: the other worker's FAIL and retry stand, and trial 0's run is ended KILLED."""
    from search.session import TrialSession

    settings, opened = _open(tmp_path, "study.max_epochs=2")
    real = TrialSession.__exit__

    def exit_then_taken_over(self: TrialSession, *exc: Any) -> None:
        real(self, *exc)
        if self.trial.number == 0 and exc[0] is None:
            other = optuna.load_study(study_name=settings.study.name, storage=opened.paths.storage_url)
            assert fail_and_retry(other, other.trials[0], "stale_heartbeat", lambda t: mark_killed(opened.tracker, t))

    monkeypatch.setattr(TrialSession, "__exit__", exit_then_taken_over)
    ran, stopped = run_trials(opened, 2, None)
    trials = opened.study.get_trials()
    assert ran == 2 and stopped is None and len(trials) == 3  # trial 1 and the retry; trial 0 is not counted
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["reason"] == "stale_heartbeat"
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 2 and trials[2].system_attrs["failed_trial"] == 0
    run = opened.tracker.client.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["hpo.reason"] == "taken_over"


def test_a_storage_that_stops_answering_stops_the_worker_and_ends_every_members_run_killed(
        tmp_path: Path, patched_epochs: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from search.storage_retry import StorageUnavailable

    def storage_goes_away(call: int, pack: Any) -> bool:
        if call == 2:  # epoch 1 of both members: writing its report finds the storage gone (its retries spent)
            def report_values(trial: optuna.Trial, values: Any) -> None:
                raise StorageUnavailable("the Optuna storage did not answer for 0 s")
            monkeypatch.setattr(optuna_adapter, "report_values", report_values)
        return False

    patched_epochs.append(storage_goes_away)
    settings, opened = _open(tmp_path, "study.max_epochs=3")
    with pytest.raises(StorageUnavailable):
        run_trials(opened, 2, None)
    monkeypatch.undo()
    trials = opened.study.get_trials()
    assert [t.state for t in trials] == [TrialState.RUNNING] * 2  # not this worker's to record: others fail them
    client = opened.tracker.client
    for t in trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["hpo.reason"] == "storage_lost"


def test_ctrl_c_then_an_epoch_past_a_members_trial_timeout_is_cut_short(
        tmp_path: Path, patched_epochs: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in epoch 1 of trials 0 and 1 re-enqueues both (as trials 2 and 3, resuming from epoch 1). The next run,
    with a trial_timeout, packs them again, trial 2 first (so its deadline comes first); their epoch hangs until the
    pack's alarm at trial 2's deadline ends it. Trial 2 fails (trial_timeout), trial 3 is interrupted and
    re-enqueued; two failures in a row stop that run (max_failures), and the next resumes trial 3's retry."""
    def ctrl_c(call: int, pack: Any) -> bool:
        if call == 2:
            raise KeyboardInterrupt
        return False

    patched_epochs.append(ctrl_c)
    settings, opened = _open(tmp_path, "study.max_epochs=3")
    with pytest.raises(KeyboardInterrupt):
        run_trials(opened, 2, None)
    trials = opened.study.get_trials()
    assert [(t.state, t.user_attrs["reason"]) for t in trials[:2]] == [(TrialState.FAIL, "interrupted")] * 2
    assert [(t.state, t.system_attrs["failed_trial"]) for t in trials[2:]] == [(TrialState.WAITING, 0),
                                                                              (TrialState.WAITING, 1)]
    client = opened.tracker.client
    assert {client.get_run(t.user_attrs["mlflow_run_id"]).info.status for t in trials[:2]} == {"KILLED"}

    patched_epochs[:] = [lambda call, pack: call == 3]  # the first epoch of this run hangs
    # Trial 3's session starts a second after trial 2's, so its deadline is a second later: the alarm at trial 2's
    # deadline is handled before it on a loaded machine too (one CI run, its sessions started a few ms apart,
    # handled the alarm after both deadlines and timed out both members).
    from search.failures import TrialDeadline

    made, real_init = [0], TrialDeadline.__init__

    def second_starts_later(self: TrialDeadline, seconds: float | None) -> None:
        made[0] += 1
        if made[0] == 2:
            time.sleep(1.0)
        real_init(self, seconds)

    monkeypatch.setattr(TrialDeadline, "__init__", second_starts_later)
    settings, opened = _open(tmp_path, "study.max_epochs=3", "study.trial_timeout=4", "study.max_failures=2")
    ran, stopped = run_trials(opened, 2, None)
    trials = opened.study.get_trials()
    seen = [(t.number, t.state.name, t.user_attrs.get("reason"), t.user_attrs.get("epochs_run")) for t in trials]
    assert stopped == "pack_interrupted" and ran == 2 and len(trials) == 5, seen
    assert sorted(trials[2].user_attrs["packed_with"] + trials[3].user_attrs["packed_with"]) == [2, 2, 3]
    assert trials[2].state == TrialState.FAIL and trials[2].user_attrs["reason"] == "trial_timeout", seen
    assert trials[3].state == TrialState.FAIL and trials[3].user_attrs["reason"] == "pack_interrupted", seen
    assert trials[2].user_attrs["epochs_run"] == trials[3].user_attrs["epochs_run"] == 1  # resumed, cut short
    assert trials[4].state == TrialState.WAITING  # trial 3's retry; trial 2 is not retried, as unpacked
    assert trials[4].system_attrs["retry_history"] == [1, 3]
    timed_out = client.get_run(trials[2].user_attrs["mlflow_run_id"])
    assert timed_out.info.status == "FAILED" and timed_out.data.tags["hpo.reason"] == "trial_timeout"
    interrupted = client.get_run(trials[3].user_attrs["mlflow_run_id"])
    assert interrupted.info.status == "KILLED" and interrupted.data.tags["hpo.reason"] == "pack_interrupted"

    patched_epochs.clear()
    settings, opened = _open(tmp_path, "study.max_epochs=3")
    run_trials(opened, 2, None)
    trials = opened.study.get_trials()
    assert [t.state for t in trials[4:]] == [TrialState.COMPLETE] * 2 and len(trials) == 6
    assert trials[4].user_attrs["resumed_from_trial"] == 1 and trials[4].user_attrs["resumed_at_epoch"] == 1
    assert sorted(trials[4].intermediate_values) == [0, 1, 2] and trials[4].params == trials[1].params
