"""The dashboard notes' text and the epoch accounting behind them, from hand-made trials."""

from __future__ import annotations

from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from search.notes import epoch_account, study_note, trial_note
from search.records import epochs_trained, outcome

SETTINGS = {
    "study": {"metric": "val_accuracy", "max_epochs": 20, "timeout": None},
    "sampler": {"name": "tpe", "seed": 42},
    "pruner": {"name": "median"},
    "early_stopping": {"enabled": True, "monitor": "val_loss", "patience": 3, "min_delta": 0.002},
    "source": "studies/quickstart.toml",
}


def trial(state: TrialState, epochs: int, value: float | None = None, **attrs: object) -> FrozenTrial:
    return create_trial(state=state, value=value, params={"lr": 0.01},
                        distributions={"lr": FloatDistribution(1e-4, 1.0, log=True)},
                        user_attrs={"epochs_run": epochs, **attrs})


TRIALS = [
    trial(TrialState.COMPLETE, 20, 0.9, early_stopped=False, best_epoch=18),
    trial(TrialState.COMPLETE, 8, 0.95, early_stopped=True, stopped_epoch=7, best_epoch=4,
          mlflow_run_url="http://127.0.0.1:5000/#/experiments/1/runs/abc"),
    trial(TrialState.PRUNED, 3, 0.4, pruned_epoch=2),
    trial(TrialState.PRUNED, 5, 0.5, pruned_epoch=4),
    trial(TrialState.FAIL, 1, reason="out_of_memory"),
    trial(TrialState.RUNNING, 4),
]
for number, t in enumerate(TRIALS):
    t.number = number


def test_epoch_account_counts_ended_trials_against_the_full_budget() -> None:
    acc = epoch_account(TRIALS, 20)
    assert acc.trials == 5  # the running trial is left out
    assert acc.spent == 20 + 8 + 3 + 5 + 1
    assert acc.full == 5 * 20
    assert (acc.saved_by_pruning, acc.pruned) == (17 + 15, 2)
    assert (acc.saved_by_early_stopping, acc.early_stopped) == (12, 1)
    assert acc.unused_by_failures == 19 and acc.resumed == 0
    assert [outcome(t) for t in TRIALS] == ["completed", "early stopped", "pruned", "pruned", "failed", "running"]


def test_a_resumed_retry_counts_only_the_epochs_it_trained_and_a_waiting_retry_none() -> None:
    """Interrupted at its 6th epoch (epochs 0-5 trained), trial 0's retry resumed its checkpoint of epoch 4 (5
    epochs) and trained epochs 5-11: 6 + 7 epochs were trained, and 5 were resumed instead of trained again."""
    interrupted = trial(TrialState.FAIL, 6, reason="interrupted")
    resumed = trial(TrialState.COMPLETE, 12, 0.9, early_stopped=True, stopped_epoch=11, resumed_from_trial=0,
                    resumed_at_epoch=5)
    acc = epoch_account([interrupted, resumed], 20)
    assert (acc.spent, acc.resumed, acc.full) == (6 + 7, 5, 40)
    assert (acc.saved_by_early_stopping, acc.unused_by_failures) == (8, 14)
    assert acc.spent + acc.saved_by_pruning + acc.saved_by_early_stopping + acc.unused_by_failures + acc.resumed \
        == acc.full
    note = study_note("s", [interrupted, resumed], SETTINGS, resumed, {}, 2, "hpo run s.toml", "")
    assert "13 spent of 40" in note and "not trained again: 5 epochs" in note
    assert "not trained again" not in study_note("quickstart", TRIALS, SETTINGS, TRIALS[1], {}, 12, "hpo run", "")
    assert [epochs_trained(t) for t in (interrupted, resumed, trial(TrialState.WAITING, 0))] == [6, 7, 0]


def test_each_trial_is_counted_against_the_epoch_budget_it_trained_under() -> None:
    """A study resumed with study.max_epochs raised from 10 to 20: the first run's trials had 10 epochs to
    spend, the second's 20; a trial of an older hpo (no recorded budget) counts against the budget given."""
    first = [trial(TrialState.COMPLETE, 10, 0.9, early_stopped=False, max_epochs=10),
             trial(TrialState.PRUNED, 3, 0.4, pruned_epoch=2, max_epochs=10)]
    second = [trial(TrialState.COMPLETE, 12, 0.95, early_stopped=True, stopped_epoch=11, max_epochs=20),
              trial(TrialState.PRUNED, 4, 0.5, pruned_epoch=3)]  # no max_epochs: the given 20
    acc = epoch_account(first + second, 20)
    assert acc.full == 10 + 10 + 20 + 20 and acc.spent == 10 + 3 + 12 + 4
    assert acc.saved_by_pruning == 7 + 16 and acc.saved_by_early_stopping == 8
    assert acc.spent + acc.saved_by_pruning + acc.saved_by_early_stopping == acc.full
    assert acc.per_trial == "4 trials of 10 to 20 epochs"
    assert epoch_account(second, 20).per_trial == "2 trials x 20 epochs"
    assert epoch_account([], 20).per_trial == "0 trials x 20 epochs"
    note = study_note("s", first + second, SETTINGS, second[0], {}, 4, "hpo run s.toml", "")
    assert "29 spent of 60 (48%) that 4 trials of 10 to 20 epochs would cost" in note


def test_study_note_says_budget_epochs_savings_best_trial_and_how_to_reproduce() -> None:
    note = study_note("quickstart", TRIALS, SETTINGS, TRIALS[1], {"test_accuracy": 0.9722}, 12,
                      "hpo run studies/quickstart.toml --trials 12", " --run-dir /tmp/r")
    assert "## Study quickstart" in note
    assert "4 of 12 trials finished (2 complete, 2 pruned, 1 failed)" in note
    assert "37 spent of 100 (37%)" in note
    assert "saved by pruning: **32** epochs (2 trials pruned)" in note
    assert "saved by early stopping: **12** epochs (1 trials stopped)" in note
    assert "#1, val_accuracy 0.95 at epoch 4 of 8; test set: test_accuracy 0.9722" in note
    assert "[Best trial's MLflow run](http://127.0.0.1:5000/#/experiments/1/runs/abc)" in note
    assert "hpo run studies/quickstart.toml --trials 12" in note
    assert "hpo export studies/quickstart.toml --run-dir /tmp/r --out DIR" in note
    assert "sampler seed 42" in note


def test_study_note_without_a_completed_trial() -> None:
    note = study_note("s", TRIALS[2:4], SETTINGS, None, {}, None, "hpo run s.toml")
    assert "none yet" in note and "4 trials (timeout budget)" not in note
    assert "2 trials (timeout budget) finished" in note


def test_trial_note_says_how_it_ended_and_links_its_run() -> None:
    pruned = trial_note(3, "PRUNED", {"epochs_run": 3, "pruned_epoch": 2, "reason": "pruned",
                                      "mlflow_run_url": "http://x/#/experiments/1/runs/r3"}, 20)
    assert "pruned at epoch 2: 3 of 20 epochs; reason `pruned`" in pruned
    assert "[MLflow run trial-3](http://x/#/experiments/1/runs/r3)" in pruned
    done = trial_note(1, "COMPLETE", {"epochs_run": 8, "early_stopped": True, "stopped_epoch": 7, "best_epoch": 4,
                                      "reason": "early_stopped:patience"}, 20, "good fit: fine")
    assert "early stopped at epoch 7" in done and "epoch** 4" in done and "**Fit:** good fit: fine" in done


def test_a_failed_trials_note_says_where_it_raised_and_where_its_traceback_is() -> None:
    note = trial_note(2, "FAIL", {"epochs_run": 0, "reason": "error: ValueError: dropout too high",
                                  "error_at": "/study/model.py line 14, in forward",
                                  "mlflow_run_url": "http://x/#/experiments/1/runs/r2"}, 20)
    assert "**Ended:** failed with an error: 0 of 20 epochs; reason `error: ValueError: dropout too high`." in note
    assert "**Raised at `/study/model.py line 14, in forward`**; the traceback is `error.txt` in its MLflow run" in note
    assert "[MLflow run trial-2](http://x/#/experiments/1/runs/r2)" in note


def test_an_interrupted_trials_note_says_so_and_that_the_next_run_retries_it() -> None:
    note = trial_note(30, "FAIL", {"epochs_run": 3, "reason": "interrupted",
                                   "mlflow_run_url": "http://x/#/experiments/1/runs/r30"}, 20)
    assert "**Ended:** interrupted (Ctrl-C or SIGTERM): 3 of 20 epochs; reason `interrupted`." in note
    assert "The next `hpo run` of the study retries it as a new trial with the same params" in note
    assert "Raised" not in note and "[MLflow run trial-30](http://x/#/experiments/1/runs/r30)" in note


def test_a_retrys_note_names_the_trial_it_resumes() -> None:
    note = trial_note(7, "COMPLETE", {"epochs_run": 12, "reason": "completed", "resumed_from_trial": 3,
                                      "resumed_at_epoch": 5}, 20)
    assert "**Retry of trial #3**: resumed from its checkpoint, training from epoch 5 on" in note
    assert "Retry of" not in trial_note(3, "COMPLETE", {"epochs_run": 12, "reason": "completed"}, 20)
    both = trial_note(7, "COMPLETE", {"epochs_run": 12, "reason": "completed", "retry_of": 6,
                                      "resumed_from_trial": 3, "resumed_at_epoch": 5}, 20)
    assert both.count("Retry of") == 1 and "**Retry of trial #3**: resumed" in both  # 6 had none: 3's was read


def test_a_retry_with_no_checkpoint_to_resume_says_it_trained_from_epoch_0() -> None:
    note = trial_note(7, "COMPLETE", {"epochs_run": 12, "reason": "completed", "retry_of": 3}, 20)
    assert "**Retry of trial #3**: with its params, trained from epoch 0 (it left no checkpoint" in note
