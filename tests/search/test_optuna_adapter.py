"""Optuna's private API as the adapter uses it, on a real SQLite storage: an Optuna upgrade that changes any
of it fails here first, by name."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.optuna_adapter import CHECKED_AGAINST, fail_running, fail_stale, heartbeat_enabled, stored_trial

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
