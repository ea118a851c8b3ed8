"""Optuna's private API as the adapter uses it, on a real SQLite storage: an Optuna upgrade that changes any
of it fails here first, by name."""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from search.optuna_adapter import (
    CHECKED_AGAINST,
    fail_running,
    fail_stale,
    heartbeat_enabled,
    set_user_attrs,
    stored_trial,
)

REPO = Path(__file__).resolve().parents[2]


def storage(tmp_path: Path, heartbeat: bool) -> optuna.storages.RDBStorage:
    kwargs = {"heartbeat_interval": 60, "grace_period": 120} if heartbeat else {}
    return optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}", **kwargs)


def test_stored_trial_is_the_live_trials_record(tmp_path: Path) -> None:
    study = optuna.create_study(storage=storage(tmp_path, heartbeat=False))
    study.ask()
    trial = study.ask()
    trial.set_user_attr("k", "v")
    frozen = stored_trial(trial)
    assert (frozen.number, frozen.state, frozen.user_attrs) == (1, TrialState.RUNNING, {"k": "v"})


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_set_user_attrs_is_set_user_attr_for_each_in_one_commit(kind: str, tmp_path: Path) -> None:
    """The same stored and cached attrs as one ``set_user_attr`` per key (an existing one overwritten), written in
    one transaction on an RDB storage; a finished trial is refused as ``set_user_attr`` refuses it."""
    store = storage(tmp_path, heartbeat=False) if kind == "sqlite" else optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=store)
    one_by_one, together = study.ask(), study.ask()
    attrs = {"mlflow_run_id": "abc", "pid": 41, "best_epoch": None, "nested": {"a": [1, 2]}}
    for trial in (one_by_one, together):
        trial.set_user_attr("pid", 7)  # inherited, overwritten below
    commits: list[int] = []
    if kind == "sqlite":
        import sqlalchemy.event

        sqlalchemy.event.listen(store.engine, "commit", lambda conn: commits.append(1))
    for key, value in attrs.items():
        one_by_one.set_user_attr(key, value)
    written_one_by_one = len(commits)
    set_user_attrs(together, attrs)
    if kind == "sqlite":
        assert (written_one_by_one, len(commits) - written_one_by_one) == (4, 1)
    assert together.user_attrs == one_by_one.user_attrs == attrs  # the trial's cached copy
    assert stored_trial(together).user_attrs == stored_trial(one_by_one).user_attrs == attrs
    study.tell(together, 1.0)
    with pytest.raises(RuntimeError, match="finished"):
        set_user_attrs(together, {"late": 1})
    assert "late" not in stored_trial(together).user_attrs


def test_heartbeat_enabled_follows_the_storage(tmp_path: Path) -> None:
    assert heartbeat_enabled(optuna.create_study(storage=storage(tmp_path, heartbeat=True)))
    assert not heartbeat_enabled(optuna.create_study(study_name="other", storage=storage(tmp_path, heartbeat=False)))
    assert not heartbeat_enabled(optuna.create_study())  # in memory


def test_fail_running_once_with_its_reason(tmp_path: Path) -> None:
    study = optuna.create_study(storage=storage(tmp_path, heartbeat=False))
    trial = study.ask()
    frozen = stored_trial(trial)
    assert fail_running(study, frozen, "worker_died") is True
    after = study.trials[0]
    assert after.state == TrialState.FAIL and after.user_attrs["reason"] == "worker_died"
    assert fail_running(study, frozen, "again") is False  # already finished: someone else's retry
    done = study.ask()
    study.tell(done, 1.0)
    assert fail_running(study, stored_trial(done), "late") is False and study.trials[1].state == TrialState.COMPLETE


def test_a_dead_first_attempt_s_epochs_are_its_reported_steps_and_a_dead_retry_s_none(tmp_path: Path) -> None:
    """Its worker died before recording epochs_run: the steps it reported say how far it got (0-3: 4 epochs).
    Its retry inherits those steps, so its own reports cannot be told apart from them: it counts none."""
    from search.workers import retry

    study = optuna.create_study(storage=storage(tmp_path, heartbeat=False))
    first = study.ask()
    for step in range(4):
        first.report(0.1 * step, step)
    assert fail_running(study, stored_trial(first), "worker_died")
    assert study.trials[0].user_attrs == {"reason": "worker_died", "epochs_run": 4}
    retry(study, study.trials[0])
    again = study.ask()  # the retry, with steps 0-3 inherited
    again.report(0.5, 4)
    assert fail_running(study, stored_trial(again), "worker_died")
    assert study.trials[1].user_attrs == {"reason": "worker_died"}
    recorded = study.ask()
    recorded.set_user_attr("epochs_run", 2)
    recorded.report(0.3, 0)
    assert fail_running(study, stored_trial(recorded), "stale_heartbeat")
    assert study.trials[2].user_attrs == {"epochs_run": 2, "reason": "stale_heartbeat"}  # its own record stands


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_fail_stale_records_its_reason_before_the_stale_trial_callback(tmp_path: Path) -> None:
    seen: list[tuple[int, TrialState, str]] = []
    beats = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=1, grace_period=1,
        heartbeat_stale_trial_callback=lambda _, t: seen.append((t.number, t.state, t.user_attrs["reason"])))
    study = optuna.create_study(storage=beats)
    stale, quiet = study.ask(), study.ask()
    beats.record_heartbeat(stale._trial_id)  # `quiet` never beat: Optuna leaves such a trial alone
    time.sleep(2.1)  # past the 1 s grace period in the storage's whole-second clock (waiting longer changes nothing)
    assert fail_stale(study, "stale_heartbeat") == [0]
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.RUNNING]
    assert study.trials[0].user_attrs["reason"] == "stale_heartbeat"
    assert seen == [(0, TrialState.FAIL, "stale_heartbeat")]  # the callback (the retry) sees the reason
    assert fail_stale(study, "again") == [] and len(seen) == 1  # failed once
    plain = optuna.create_study(study_name="plain", storage=storage(tmp_path, heartbeat=False))
    plain.ask()
    assert fail_stale(plain, "x") == [] and plain.trials[0].state == TrialState.RUNNING  # no heartbeat, no check
    assert quiet.number == 1


def test_checked_version_is_the_installed_one_and_no_other_module_reaches_in() -> None:
    installed, checked = optuna.__version__.split(".")[:2], CHECKED_AGAINST.split(".")[:2]
    assert installed == checked, "re-read search/optuna_adapter.py against this Optuna, then move the pin"
    hits = subprocess.run(["grep", "-rln", r"\._storage\|_trial_id\|storages\._", "search/"], cwd=REPO,
                          capture_output=True, text=True).stdout.split()
    assert [h for h in hits if not h.endswith(".pyc")] == ["search/optuna_adapter.py"]


def test_pruner_reads_finished_trials_once_per_ttl(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from search.optuna_adapter import FinishedTrialsCache, PruningTrial

    study = optuna.create_study(storage=storage(tmp_path, heartbeat=False), direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    done = study.ask()
    done.report(0.9, 0)
    study.tell(done, 0.9)
    reads: list[object] = []
    real = optuna.Study.get_trials

    def counting(self, deepcopy=True, states=None):  # noqa: ANN001, ANN202
        reads.append(states)
        return real(self, deepcopy=deepcopy, states=states)

    monkeypatch.setattr(optuna.Study, "get_trials", counting)
    live = PruningTrial(study.ask(), ttl=3600)
    live.report(0.1, 0)
    assert live.should_prune() is True  # below the finished trial's 0.9: the same answer Optuna gives
    live.flush()  # (Optuna's own decision reads the stored step)
    assert bool(live.trial.should_prune()) is True
    reads.clear()
    for epoch in range(1, 5):
        live.report(0.95, epoch)
        assert live.should_prune() is False
    assert reads == []  # four decisions, no storage read of the finished trials
    other = study.ask()
    study.tell(other, 0.5)
    cache = FinishedTrialsCache(study, ttl=0)  # a zero ttl reads every time and sees the new trial
    assert [t.number for t in cache.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))] == [0, 2]
    running = cache.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert [t.number for t in running] == [1]  # unfinished states always come from the storage
    assert cache.direction == study.direction  # everything else is the study's


# --- PruningTrial: the pruner's decision on the locally kept trial is Optuna's own, for every pruner ---------------

CURVES = [  # maximize; 8 epochs each, hand-made: improving, flat, declining, late blooming, a NaN
    [0.50, 0.60, 0.70, 0.75, 0.80, 0.82, 0.84, 0.85],
    [0.55, 0.58, 0.60, 0.62, 0.63, 0.64, 0.64, 0.65],
    [0.30, 0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65],
    [0.70, 0.72, 0.71, 0.70, 0.69, 0.68, 0.67, 0.66],
    [0.20, 0.25, 0.30, 0.85, 0.88, 0.90, 0.91, 0.92],
    [0.60, 0.65, 0.70, 0.74, 0.78, 0.81, 0.83, 0.86],
    [0.45, 0.44, 0.43, 0.42, 0.41, 0.40, 0.39, 0.38],
    [0.62, 0.66, math.nan, 0.75, 0.80, 0.83, 0.85, 0.87],
    [0.58, 0.64, 0.69, 0.73, 0.77, 0.80, 0.82, 0.84],
    [0.66, 0.71, 0.76, 0.80, 0.84, 0.87, 0.89, 0.90],
    [0.35, 0.50, 0.65, 0.70, 0.72, 0.74, 0.76, 0.78],
    [0.64, 0.70, 0.75, 0.79, 0.82, 0.86, 0.88, 0.91],
]
TWIN_PRUNERS: list[dict[str, Any]] = [
    {"name": "none"},
    {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
    {"name": "median_carry_forward", "n_startup_trials": 2},
    {"name": "percentile", "percentile": 40.0, "n_startup_trials": 2},
    {"name": "successive_halving", "min_resource": 1, "reduction_factor": 2},
    {"name": "successive_halving"},  # min_resource "auto": estimated from the completed trials
    {"name": "hyperband", "min_resource": 1, "reduction_factor": 2},
    {"name": "threshold", "lower": 0.42, "n_warmup_steps": 1},
    {"name": "patient", "patience": 1, "n_startup_trials": 2},
    {"name": "wilcoxon", "p_threshold": 0.2},
]


def test_every_pruner_the_project_offers_is_checked_against_optunas_own_decision() -> None:
    from search.pruning import PRUNERS

    assert {p["name"] for p in TWIN_PRUNERS} == set(PRUNERS)


@pytest.mark.usefixtures("quiet_optuna")
@pytest.mark.filterwarnings("ignore::UserWarning")  # Wilcoxon warns about the NaN curve, on both sides alike
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("options", TWIN_PRUNERS, ids=lambda o: "-".join(map(str, o.values())))
def test_local_decision_is_optunas_at_every_step(options: dict[str, Any], tmp_path: Path) -> None:
    """Two SQLite studies of the same name (Hyperband's brackets follow it) with the same pruner settings: one
    decides through PruningTrial, the twin through Optuna's own ``trial.should_prune()``; a trial ends PRUNED at
    its first True, else COMPLETE. Every decision, and every trial's stored record, must be the same."""
    from search.config import PrunerSection
    from search.optuna_adapter import PruningTrial
    from search.pruning import build_pruner

    studies = [optuna.create_study(study_name="twin", direction="maximize",
                                   storage=f"sqlite:///{tmp_path / f'{side}.db'}",
                                   pruner=build_pruner(PrunerSection(**options), len(CURVES[0])))
               for side in ("local", "optuna")]
    decisions: dict[str, list[list[bool]]] = {"local": [], "optuna": []}
    for curve in CURVES:
        local, twin = PruningTrial(studies[0].ask()), studies[1].ask()
        for side in decisions.values():
            side.append([])
        for step, value in enumerate(curve):
            local.report(value, step)
            twin.report(value, step)
            decisions["local"][-1].append(local.should_prune())
            decisions["optuna"][-1].append(bool(twin.should_prune()))
            if decisions["optuna"][-1][-1]:
                break
        local.flush()  # as the session does before the trial is told (a pruned trial's value is its last step)
        for study, trial in zip(studies, (local.trial, twin), strict=True):
            if decisions["optuna"][-1][-1]:
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, curve[-1])
    assert decisions["local"] == decisions["optuna"]
    pruned = [i for i, d in enumerate(decisions["optuna"]) if d[-1]]
    assert (pruned == []) == (options["name"] == "none"), pruned  # the comparison covers pruned trials
    records = [[(t.state, t.intermediate_values, t.system_attrs) for t in s.trials] for s in studies]
    assert repr(records[0]) == repr(records[1])  # the same values (NaN too) and rung attrs stored on both sides
    if options["name"] in ("successive_halving", "hyperband"):
        assert any("completed_rung_1" in t.system_attrs for t in studies[0].trials)  # past the first rung


def test_pruning_trial_reads_the_running_trial_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trial is read from the storage when the session starts (values reported before it included), never
    again; what it reports lands in the storage when it is flushed."""
    from search.optuna_adapter import PruningTrial

    study = optuna.create_study(storage=storage(tmp_path, heartbeat=False), direction="maximize",
                                pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2))
    first = study.ask()
    for step, value in enumerate([0.5, 0.6, 0.7]):
        first.report(value, step)
        assert not first.should_prune()  # writes its completed_rung_0 (0.6) and _1 (0.7)
    study.tell(first, 0.7)
    trial = study.ask()
    trial.report(0.25, 0)  # e.g. inherited by a retry: in the storage before the session starts
    live = PruningTrial(trial)
    reads: list[str] = []
    cls = type(study._storage)

    def counted(name: str) -> Any:
        real = getattr(cls, name)
        return lambda self, *args: reads.append(name) or real(self, *args)

    for name in ("get_trial", "get_trial_system_attrs"):
        monkeypatch.setattr(cls, name, counted(name))
    live.report(0.375, 1)
    assert live.should_prune() is True  # rung 0 at epoch 1: 0.375 below trial 0's 0.6
    assert live.local.intermediate_values == {0: 0.25, 1: 0.375}
    assert live.local.system_attrs["completed_rung_0"] == 0.375
    assert reads == []
    monkeypatch.undo()
    live.flush()
    stored = stored_trial(trial)
    assert stored.intermediate_values == {0: 0.25, 1: 0.375} and stored.system_attrs["completed_rung_0"] == 0.375


def test_a_retry_does_not_report_the_steps_it_inherited_again(tmp_path: Path) -> None:
    """A retry resumed from an older last.pt (or from epoch 0) trains inherited steps again: Optuna would ignore
    the new values with an "already reported" warning per epoch; the first value stands, silently."""
    import warnings

    from search.optuna_adapter import PruningTrial

    study = optuna.create_study(storage=storage(tmp_path, heartbeat=False), direction="maximize")
    trial = study.ask()
    trial.report(0.25, 0)  # inherited from the failed attempt
    live = PruningTrial(trial)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        live.report(0.3, 0)
        live.report(0.5, 1)
        live.flush()
    assert [str(w.message) for w in caught] == []
    assert stored_trial(trial).intermediate_values == {0: 0.25, 1: 0.5} == live.local.intermediate_values


def test_reported_values_are_held_then_written_together(tmp_path: Path) -> None:
    """Within ``hold`` seconds the values wait in ``pending`` (the pruner decides on ``local``, which has them);
    ``flush`` writes them in one go; past ``hold`` a report writes what is held, itself included."""
    from search.optuna_adapter import PruningTrial

    study = optuna.create_study(storage=storage(tmp_path, heartbeat=False), direction="maximize")
    trial = study.ask()
    held = PruningTrial(trial, hold=3600)
    for step in range(4):
        held.report(0.1 * step, step)
    assert stored_trial(trial).intermediate_values == {}
    assert held.pending == held.local.intermediate_values == {0: 0.0, 1: 0.1, 2: 0.2, 3: 0.30000000000000004}
    held.flush()
    assert held.pending == {}
    assert stored_trial(trial).intermediate_values == {0: 0.0, 1: 0.1, 2: 0.2, 3: 0.30000000000000004}
    held.hold = 0.0  # an epoch longer than hold: written as it ends
    held.report(0.9, 4)
    assert stored_trial(trial).intermediate_values[4] == 0.9 and held.pending == {}
    with pytest.raises(ValueError, match="non-negative"):
        held.report(0.5, -1)


def test_a_held_value_on_a_trial_finished_elsewhere_is_refused_at_the_flush(tmp_path: Path) -> None:
    """Another worker failed the trial (a stale heartbeat) while this one held values: the write is refused as
    Optuna refuses a late report, so the session takes the trial as taken over."""
    from search.optuna_adapter import PruningTrial

    study = optuna.create_study(storage=storage(tmp_path, heartbeat=False), direction="maximize")
    trial = study.ask()
    held = PruningTrial(trial, hold=3600)
    held.report(0.5, 0)
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        held.flush()
    assert stored_trial(trial).intermediate_values == {}


def test_report_values_writes_new_steps_and_replaces_a_stored_one_as_optunas_write_does(tmp_path: Path) -> None:
    from search.optuna_adapter import report_values

    study = optuna.create_study(storage=storage(tmp_path, heartbeat=False), direction="maximize")
    trial = study.ask()
    trial.report(0.25, 0)
    report_values(trial, {0: 0.5, 1: float("nan"), 2: float("inf"), 3: 0.75})
    stored = stored_trial(trial).intermediate_values
    assert stored[0] == 0.5 and math.isnan(stored[1]) and stored[2] == float("inf") and stored[3] == 0.75
    assert trial._cached_frozen_trial.intermediate_values.keys() == {0, 1, 2, 3}


def test_steps_are_held_on_an_sqlite_file_only(tmp_path: Path) -> None:
    from search.optuna_adapter import report_hold

    assert report_hold(optuna.create_study(storage=storage(tmp_path, heartbeat=False)).ask()) == 2.0
    assert report_hold(optuna.create_study().ask()) == 0.0  # in memory: nothing to save by holding
