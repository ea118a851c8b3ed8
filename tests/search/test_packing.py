"""Trial packing end to end: every packed member is its own trial, run, checkpoint; budget exact; fallback."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from objectives.data import load_data
from objectives.networks import build_network
from objectives.runtime import resolve_runtime
from objectives.settings import TrainConfig
from objectives.train import evaluate
from search.config import load_settings
from search.packing import group_key
from search.samplers import build_sampler

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "studies" / "quickstart.toml"
EXAMPLE = REPO / "examples" / "custom_loop" / "study.toml"


def hpo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


def test_pack_is_validated_and_turns_on_tpes_constant_liar() -> None:
    settings = load_settings(QUICKSTART)
    assert settings.study.pack == 1
    packed = load_settings(QUICKSTART, ["study.pack=4"])
    assert packed.study.pack == 4
    with pytest.raises(Exception, match="pack"):
        load_settings(QUICKSTART, ["study.pack=0"])
    assert build_sampler(packed.sampler, packed.space, 4)._constant_liar  # type: ignore[attr-defined]
    assert group_key({"batch_size": 64}) == group_key({"batch_size": 64}) != group_key({"batch_size": 128})


@pytest.mark.slow
def test_hpo_run_pack_trains_each_member_as_its_own_trial(tmp_path: Path) -> None:
    budget, max_epochs = 6, 3
    done = hpo("run", str(QUICKSTART), "--pack", "3", "--trials", str(budget), "--quiet",
               "--set", f"study.max_epochs={max_epochs}", "--set", "sampler.seed=1",
               "--set", "pruner.n_startup_trials=1", "--set", "pruner.n_warmup_steps=0",
               "--set", "space.batch_size={type='categorical', choices=[64, 128]}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    root = tmp_path / "runs" / "quickstart"
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{root / 'optuna.db'}")
    trials = study.trials
    assert len(trials) == budget  # exact budget: no extra trial asked, none left WAITING or RUNNING
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert "test_accuracy" in done.stdout

    # grouping: members of a pack share their batch size; some trials really were packed together
    by_number = {t.number: t for t in trials}
    for t in trials:
        together = t.user_attrs["packed_with"]
        assert t.number in together
        assert {by_number[n].params["batch_size"] for n in together} == {t.params["batch_size"]}
    assert max(len(t.user_attrs["packed_with"]) for t in trials) >= 2
    # refill: a trial asked for a freed slot had that slot's batch size fixed, the rest sampled
    refills = [t for t in trials if "fixed_params" in t.system_attrs]
    assert refills
    for t in refills:
        assert t.system_attrs["fixed_params"] == {"batch_size": t.params["batch_size"]}

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run_ids = {t.user_attrs["mlflow_run_id"] for t in trials}
    assert len(run_ids) == budget  # one MLflow child run per member
    parent = study.user_attrs["mlflow_parent_run_id"]
    for t in trials:
        epochs = t.user_attrs["epochs_run"]
        assert sorted(t.intermediate_values) == list(range(epochs))  # its own report per epoch
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.data.params["batch_size"] == str(t.params["batch_size"])
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")}
        assert sorted(history) == list(range(epochs))
        assert [history[e] for e in range(epochs)] == pytest.approx([t.intermediate_values[e] for e in range(epochs)])
        assert not (root / "checkpoints" / f"trial-{t.number}" / "last.pt").exists()
        if t.state != TrialState.COMPLETE:
            assert t.user_attrs["reason"] == "pruned"
            continue
        # its best.pt is an ordinary CNN checkpoint whose weights (BatchNorm statistics included) score its value
        checkpoint = torch.load(t.user_attrs["checkpoint"], weights_only=True)
        assert checkpoint["epoch"] == t.user_attrs["best_epoch"]
        cfg = TrainConfig.model_validate(checkpoint["settings"])
        assert cfg.batch_size == t.params["batch_size"] and cfg.dropout == t.params["dropout"]
        model = build_network(checkpoint["model_spec"])
        model.load_state_dict(checkpoint["state_dict"])
        data = load_data(cfg, torch.device("cpu"))
        scores = evaluate(model, data.val_x, data.val_y, resolve_runtime("cpu"), num_classes=data.num_classes,
                          prepare=data.inputs)
        assert scores["accuracy"] == pytest.approx(t.value, abs=1e-6)


@pytest.mark.slow
def test_an_objective_that_cannot_pack_runs_unpacked_with_a_note(tmp_path: Path) -> None:
    done = hpo("run", str(EXAMPLE), "--pack", "2", "--trials", "2", "--quiet", "--set", "study.max_epochs=2",
               "--set", "objective.device='cpu'", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if "cannot pack" in line]
    assert len(notes) == 1 and "one at a time" in notes[0]
    study = optuna.load_study(study_name="custom_loop", storage=f"sqlite:///{tmp_path / 'runs/custom_loop/optuna.db'}")
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) + [t.state for t in study.trials].count(
        TrialState.PRUNED) == 2 == len(study.trials)


@pytest.mark.slow
def test_trials_the_cnn_objective_cannot_pack_run_one_at_a_time_with_one_note(tmp_path: Path) -> None:
    """`cuda_graphs = true` (as studies/cifar10.toml sets) makes the cnn objective's trials unpackable: `--pack`
    then trains them one at a time, and says so once."""
    done = hpo("run", str(QUICKSTART), "--pack", "2", "--trials", "3", "--quiet", "--set", "study.max_epochs=2",
               "--set", "objective.cuda_graphs=true", "--set", "objective.device='cpu'", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if "cannot be packed" in line]
    assert len(notes) == 1 and "(cuda_graphs = true: " in notes[0] and "one at a time" in notes[0], done.stderr
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp_path / 'runs/quickstart/optuna.db'}")
    assert len(study.trials) == 3 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert not any("packed_with" in t.user_attrs for t in study.trials), [t.user_attrs for t in study.trials]


@pytest.mark.slow
def test_kill_9_mid_pack_then_run_again_resumes_every_member(tmp_path: Path) -> None:
    from tests.search.failure_helpers import wait_for
    from tests.search.test_recovery import LONG, UNENDING, rerun_epochs
    from tests.search.workers_helpers import hpo_cmd, load

    proc = subprocess.Popen(hpo_cmd("run", str(QUICKSTART), "--set", "study.name='k9pack'", *LONG, "--pack", "2",
                                    "--set", f"study.max_epochs={UNENDING}", "--quiet"),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / "runs" / "k9pack" / "optuna.db"
    try:  # until both members have 4 epochs
        wait_for(proc, db, "k9pack", lambda trials: len(trials) == 2 and all(
            t.state == TrialState.RUNNING and len(t.intermediate_values) >= 4 for t in trials), seconds=300)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    root = tmp_path / "runs" / "k9pack"
    killed = load(root, "k9pack")[0].get_trials()
    assert [t.state for t in killed] == [TrialState.RUNNING, TrialState.RUNNING]  # both members were in flight
    assert all((root / "checkpoints" / f"trial-{t.number}" / "last.pt").exists() for t in killed)
    epochs = rerun_epochs(killed)
    again = hpo("run", str(QUICKSTART), "--set", "study.name='k9pack'", *LONG, "--pack", "2",
                "--set", f"study.max_epochs={epochs}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    study, client = load(root, "k9pack")
    trials = study.get_trials()
    assert [t.state for t in trials[:2]] == [TrialState.FAIL, TrialState.FAIL]
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 2 and len(trials) == 4
    for first in trials[:2]:
        retry = next(t for t in trials if t.system_attrs.get("failed_trial") == first.number)
        assert retry.state == TrialState.COMPLETE and retry.params == first.params
        assert retry.user_attrs["resumed_from_trial"] == first.number and retry.user_attrs["resumed_at_epoch"] >= 3
        assert sorted(retry.intermediate_values) == list(range(epochs)) and retry.user_attrs["epochs_run"] == epochs
        steps = [m.step for m in client.get_metric_history(retry.user_attrs["mlflow_run_id"], "val_accuracy")]
        assert sorted(steps) == list(range(epochs))  # the killed epochs copied over, then its own


@pytest.mark.slow
def test_a_pack_out_of_memory_is_split_and_its_trials_retried_smaller(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU out-of-memory cannot be made on the CPU: the pack's training step raises torch's message for packs
    of more than one member, as a GPU too small for the pack would."""
    from objectives.packed import PackedFit
    from search.stores import run_paths
    from search.study import open_study, run_trials

    real = PackedFit._train_epoch

    def too_big(self: PackedFit) -> list[float]:
        if len(self) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self)

    monkeypatch.setattr(PackedFit, "_train_epoch", too_big)
    settings = load_settings(QUICKSTART, ["study.pack=2", "study.max_epochs=2", "objective.device='cpu'",
                                          "space.batch_size={type='categorical', choices=[128]}"])
    opened = open_study(settings, run_paths(str(tmp_path), settings.study.name, None, None), 2)
    run_trials(opened, 2, None)
    trials = opened.study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.user_attrs["reason"] for t in failed] == ["out_of_memory"] * 2
    assert [t.user_attrs["oom_pack_size"] for t in failed] == [2, 2]
    assert [t.user_attrs["packed_with"] for t in failed] == [[0], [0, 1]]  # trial 1 joined trial 0's pack
    retries = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(retries) == 2 and len(trials) == 4  # exactly the budget, retried one at a time
    assert sorted(t.system_attrs["failed_trial"] for t in retries) == [0, 1]
    for t in retries:
        assert t.params == trials[t.system_attrs["failed_trial"]].params and t.user_attrs["packed_with"] == [t.number]


@pytest.mark.slow
def test_trial_timeout_fails_each_packed_member_past_it(tmp_path: Path) -> None:
    from search.stores import run_paths
    from search.study import open_study, run_trials

    settings = load_settings(QUICKSTART, ["study.pack=2", "study.max_epochs=3", "study.trial_timeout=0.001",
                                          "study.max_failures=2", "objective.device='cpu'",
                                          "space.batch_size={type='categorical', choices=[128]}"])
    opened = open_study(settings, run_paths(str(tmp_path), settings.study.name, None, None), 2)
    ran, stopped = run_trials(opened, 2, None)
    trials = opened.study.get_trials()
    assert stopped == "trial_timeout" and len(trials) == 2
    for t in trials:
        assert t.state == TrialState.FAIL and t.user_attrs["reason"] == "trial_timeout"
        # past its 1 ms before the pack's first epoch: it leaves the pack untrained (the unpacked alarm does the same)
        assert t.user_attrs["epochs_run"] == 0 and sorted(t.user_attrs["packed_with"]) in ([0], [0, 1])
