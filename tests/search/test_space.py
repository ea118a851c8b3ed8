"""The search space, driven like Optuna's own tests: create_study + ask/tell, no training."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search.config import SpaceSection, load_settings
from search.space import REFERENCE_BATCH, grid_space, resolve, suggest

pytestmark = pytest.mark.usefixtures("quiet_optuna")

STUDIES = Path(__file__).resolve().parents[2] / "studies"

SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.05},
    "batch_size": {"type": "categorical", "choices": [32, 64, 128]},
    "optimizer": {"type": "categorical", "choices": ["adamw", "sgd"]},
    "nesterov": {"type": "categorical", "choices": [True, False]},
    "blocks_per_stage": {"type": "int", "low": 1, "high": 4},
    "warmup_epochs": {"type": "int", "low": 0, "high": 6, "step": 2},
    "step_size": {"type": "int", "low": 1, "high": 64, "log": True},
}


@pytest.fixture
def space() -> SpaceSection:
    return SpaceSection.model_validate(SPACE)


def random_study(seed: int = 0) -> optuna.Study:
    return optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))


def check_in_space(params: dict[str, Any], space: SpaceSection) -> None:
    assert list(params) == list(space.params)  # every parameter, in file order
    for name, spec in space.params.items():
        value = params[name]
        if spec.type == "categorical":
            assert value in spec.choices
            assert type(value) is type(spec.choices[spec.choices.index(value)])
        elif spec.type == "int":
            assert type(value) is int
            assert spec.low <= value <= spec.high
            assert (value - spec.low) % int(spec.step or 1) == 0
        else:
            assert type(value) is float
            assert spec.low <= value <= spec.high
            if spec.step:
                k = (value - spec.low) / spec.step
                assert math.isclose(k, round(k), abs_tol=1e-9)


def test_suggest_returns_every_param_in_range_with_its_type(space: SpaceSection) -> None:
    study = random_study()
    for i in range(60):
        trial = study.ask()
        params = suggest(trial, space)
        check_in_space(params, space)
        study.tell(trial, float(i))
    assert len(study.trials) == 60
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_suggest_records_what_it_returns(space: SpaceSection) -> None:
    study = random_study(seed=3)
    trial = study.ask()
    params = suggest(trial, space)
    study.tell(trial, 1.0)
    assert study.trials[0].params == params
    assert trial.params == params


def test_distributions_recorded_on_the_trial_match_the_spec(space: SpaceSection) -> None:
    study = random_study()
    trial = study.ask()
    suggest(trial, space)
    assert trial.distributions == {
        "lr": FloatDistribution(1e-4, 1e-1, log=True),
        "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
        "dropout": FloatDistribution(0.0, 0.5),
        "label_smoothing": FloatDistribution(0.0, 0.2, step=0.05),
        "batch_size": CategoricalDistribution([32, 64, 128]),
        "optimizer": CategoricalDistribution(["adamw", "sgd"]),
        "nesterov": CategoricalDistribution([True, False]),
        "blocks_per_stage": IntDistribution(1, 4),
        "warmup_epochs": IntDistribution(0, 6, step=2),
        "step_size": IntDistribution(1, 64, log=True),
    }
    study.tell(trial, 0.0)
    assert study.trials[0].distributions == trial.distributions


def test_suggest_is_compatible_with_later_trials_of_the_same_study(space: SpaceSection) -> None:
    # A resumed study asks again with the same space: Optuna refuses a changed distribution, so the
    # distributions suggest builds must be identical from call to call.
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3))
    for i in range(6):
        trial = study.ask()
        params = suggest(trial, space)
        check_in_space(params, space)
        study.tell(trial, params["dropout"] + i)
    assert len({tuple(sorted(t.distributions.items())) for t in study.trials}) == 1


def test_log_scale_params_stay_in_bounds_and_spread_over_decades() -> None:
    space = SpaceSection.model_validate({"lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True},
                                         "step_size": {"type": "int", "low": 1, "high": 1000, "log": True}})
    study = random_study(seed=1)
    lrs, steps = [], []
    for _ in range(400):
        trial = study.ask()
        params = suggest(trial, space)
        lrs.append(params["lr"])
        steps.append(params["step_size"])
        study.tell(trial, 0.0)
    assert all(1e-5 <= v <= 1.0 for v in lrs)
    assert all(1 <= v <= 1000 and type(v) is int for v in steps)
    # log-uniform: about half the draws fall below the geometric middle (1e-2.5); uniform would give 0.3%
    below = sum(v < 10**-2.5 for v in lrs) / len(lrs)
    assert 0.35 < below < 0.65
    # and each decade gets its share (uniform sampling would leave 1e-5..1e-3 almost empty)
    assert sum(v < 1e-3 for v in lrs) > 100


def test_log_scale_endpoints_reachable_with_fixed_trial() -> None:
    space = SpaceSection.model_validate({"lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True}})
    for value in (1e-4, 0.1):
        assert suggest(optuna.trial.FixedTrial({"lr": value}), space) == {"lr": value}


def test_suggest_with_fixed_trial_passes_values_through(space: SpaceSection) -> None:
    values = {"lr": 0.01, "weight_decay": 1e-4, "dropout": 0.25, "label_smoothing": 0.1, "batch_size": 64,
              "optimizer": "sgd", "nesterov": False, "blocks_per_stage": 2, "warmup_epochs": 4, "step_size": 8}
    assert suggest(optuna.trial.FixedTrial(values), space) == values


def test_suggest_on_a_shipped_study_space() -> None:
    settings = load_settings(STUDIES / "quickstart.toml")
    study = random_study()
    for _ in range(10):
        trial = study.ask()
        params = suggest(trial, settings.space)
        check_in_space(params, settings.space)
        # every sampled value is one the objective accepts
        settings.objective.model_validate({**settings.objective.model_dump(), **params})
        study.tell(trial, 0.5)


def test_empty_space_suggests_nothing() -> None:
    study = random_study()
    trial = study.ask()
    assert suggest(trial, SpaceSection()) == {}
    assert trial.distributions == {}


# --- resolve: the linear scaling rule -------------------------------------------------------------------------


def test_reference_batch_is_256() -> None:
    assert REFERENCE_BATCH == 256


@pytest.mark.parametrize(
    ("params", "default_batch", "lr"),
    [
        ({"lr": 0.1, "batch_size": 512}, 64, 0.2),
        ({"lr": 0.1, "batch_size": 256}, 64, 0.1),
        ({"lr": 0.1, "batch_size": 128}, 64, 0.05),
        ({"lr": 0.4, "batch_size": 64}, 1024, 0.1),
        ({"lr": 0.1}, 512, 0.2),  # batch size not searched: the objective's own batch size
        ({"lr": 0.1}, 128, 0.05),
    ],
)
def test_linear_scaling(params: dict[str, Any], default_batch: int, lr: float) -> None:
    resolved = resolve(params, "linear", default_batch)
    assert resolved["lr"] == lr
    assert {k: v for k, v in resolved.items() if k != "lr"} == {k: v for k, v in params.items() if k != "lr"}


def test_linear_scaling_does_not_touch_the_sampled_params() -> None:
    params = {"lr": 0.1, "batch_size": 512, "dropout": 0.3}
    resolved = resolve(params, "linear", 64)
    assert params == {"lr": 0.1, "batch_size": 512, "dropout": 0.3}
    assert resolved == {"lr": 0.2, "batch_size": 512, "dropout": 0.3}
    assert resolved is not params


def test_no_scaling_returns_a_copy_unchanged() -> None:
    params = {"lr": 0.1, "batch_size": 512}
    resolved = resolve(params, "none", 64)
    assert resolved == params and resolved is not params


def test_linear_scaling_with_sampled_params() -> None:
    space = SpaceSection.model_validate({"lr_scaling": "linear",
                                         "lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
                                         "batch_size": {"type": "categorical", "choices": [128, 512]}})
    study = random_study()
    # sampled values fixed by enqueueing them; the effective rates worked out by hand: lr is per 256 examples,
    # so 0.25 at batch 512 is 0.5, 0.5 at batch 128 is 0.25, 0.125 at batch 512 is 0.25
    for lr, batch, effective in ((0.25, 512, 0.5), (0.5, 128, 0.25), (0.125, 512, 0.25)):
        study.enqueue_trial({"lr": lr, "batch_size": batch})
        trial = study.ask()
        params = suggest(trial, space)
        assert params == {"lr": lr, "batch_size": batch}
        assert resolve(params, space.lr_scaling, 64) == {"lr": effective, "batch_size": batch}
        study.tell(trial, 0.0)


# --- grid_space -----------------------------------------------------------------------------------------------


def test_grid_space_of_an_int_range_with_step() -> None:
    space = SpaceSection.model_validate({"warmup_epochs": {"type": "int", "low": 2, "high": 10, "step": 4}})
    assert grid_space(space) == {"warmup_epochs": [2, 6, 10]}


def test_grid_space_step_that_misses_high_stops_below_it() -> None:
    space = SpaceSection.model_validate({"warmup_epochs": {"type": "int", "low": 0, "high": 7, "step": 3}})
    assert grid_space(space) == {"warmup_epochs": [0, 3, 6]}


def test_grid_space_of_int_range_choices_and_explicit_grid() -> None:
    space = SpaceSection.model_validate({
        "blocks_per_stage": {"type": "int", "low": 1, "high": 4},
        "optimizer": {"type": "categorical", "choices": ["adamw", "sgd"]},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True, "grid": [1e-3, 1e-2]},
        "batch_size": {"type": "categorical", "choices": [32, 64, 128], "grid": [64]},
    })
    assert grid_space(space) == {
        "blocks_per_stage": [1, 2, 3, 4],
        "optimizer": ["adamw", "sgd"],
        "lr": [1e-3, 1e-2],
        "batch_size": [64],
    }


def test_grid_sampler_walks_every_combination_once() -> None:
    space = SpaceSection.model_validate({
        "warmup_epochs": {"type": "int", "low": 0, "high": 4, "step": 2},
        "optimizer": {"type": "categorical", "choices": ["adamw", "sgd"]},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True, "grid": [1e-3, 1e-2]},
    })
    grid = grid_space(space)
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(grid, seed=0))
    seen = []

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        seen.append((params["warmup_epochs"], params["optimizer"], params["lr"]))
        return 0.0

    study.optimize(objective, n_trials=100)  # the grid sampler stops the study once the grid is exhausted
    assert sorted(seen) == sorted(itertools.product([0, 2, 4], ["adamw", "sgd"], [1e-3, 1e-2]))
    assert len(study.trials) == math.prod(len(v) for v in grid.values()) == 12
