"""Study settings: every mistake a user can make in a study file fails here, naming file, key and remedy."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from objectives.settings import TrainConfig
from search.config import (
    PROJECT_STUDIES,
    ParamSpec,
    Settings,
    SpaceSection,
    apply_overrides,
    find_study_file,
    load_settings,
    parse_override,
    settings_from_dict,
)
from search.errors import HpoError, SettingsError

STUDIES = Path(__file__).resolve().parents[2] / "studies"
SHIPPED = sorted(STUDIES.glob("*.toml"))

MINIMAL = """
[study]
name = "t"

[objective]
name = "cnn"
"""

LOG_LR = """
[space.lr]
type = "float"
low = 1e-4
high = 0.1
log = true
"""


def study_file(tmp_path: Path, text: str, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def with_study(extra: str) -> str:
    """MINIMAL with lines added to its [study] table."""
    return MINIMAL.replace('name = "t"\n', f'name = "t"\n{textwrap.dedent(extra)}\n', 1)


def load_error(path: Path, *fragments: str, overrides: tuple[str, ...] = ()) -> str:
    """Load a study that must fail; its message names the file and contains every fragment."""
    with pytest.raises(SettingsError, match=re.escape(str(path))) as info:
        load_settings(path, overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in message:\n{message}"
    return message


# --- shipped study files -----------------------------------------------------------------------------


def test_all_three_shipped_studies_are_present() -> None:
    assert {p.stem for p in SHIPPED} >= {"quickstart", "cifar10", "fashion_mnist"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_study_loads(path: Path) -> None:
    settings = load_settings(path)
    assert isinstance(settings, Settings)
    assert settings.study.name == path.stem
    assert settings.source == str(path)
    assert settings.objective_name == "cnn"
    assert isinstance(settings.objective, TrainConfig)
    assert settings.space.params, "a shipped study must tune something"
    assert set(settings.space.params) <= set(TrainConfig.model_fields)


def test_quickstart_values_are_read_as_written() -> None:
    settings = load_settings(STUDIES / "quickstart.toml")
    assert settings.study.n_trials == 12
    assert settings.sampler.name == "tpe" and settings.sampler.seed == 42
    assert settings.pruner.name == "median" and settings.pruner.n_warmup_steps == 2
    lr = settings.space.params["lr"]
    assert (lr.type, lr.low, lr.high, lr.log) == ("float", 1e-3, 3e-2, True)
    assert settings.space.params["batch_size"].choices == [32, 64, 128]
    assert settings.objective.widths == (32, 64) and settings.objective.augment is False
    assert settings.monitor == "val_accuracy" and settings.monitor_mode == "max"  # the study metric


def test_cifar10_uses_linear_lr_scaling() -> None:
    settings = load_settings(STUDIES / "cifar10.toml")
    assert settings.space.lr_scaling == "linear"
    assert "lr_scaling" not in settings.space.params


def test_minimal_study_gets_documented_defaults(tmp_path: Path) -> None:
    settings = load_settings(study_file(tmp_path, MINIMAL))
    assert settings.study.direction == "maximize"
    assert settings.study.metric == "val_accuracy"
    assert settings.study.n_trials == 20 and settings.study.timeout is None
    assert settings.sampler.name == "tpe" and settings.pruner.name == "median"
    assert settings.space.params == {} and settings.space.lr_scaling == "none"
    assert settings.objective == TrainConfig(data_dir=str(tmp_path.resolve() / "data"))  # relative to the file


# --- frozen ------------------------------------------------------------------------------------------


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(study_file(tmp_path, MINIMAL + LOG_LR))
    with pytest.raises(ValidationError, match="frozen"):
        settings.study.n_trials = 5
    with pytest.raises(ValidationError, match="frozen"):
        settings.space.params["lr"].high = 1.0
    with pytest.raises(ValidationError, match="frozen"):
        settings.objective.lr = 1.0
    with pytest.raises(ValidationError, match="frozen"):
        settings.pruner = settings.pruner
    assert settings.study.n_trials == 20
    assert settings.space.params["lr"].high == 0.1


# --- unknown keys --------------------------------------------------------------------------------------


def test_unknown_top_level_key_lists_sections(tmp_path: Path) -> None:
    path = study_file(tmp_path, "bogus = 1\n" + MINIMAL)
    load_error(path, "bogus: unknown key", "allowed here: early_stopping, objective, pruner, sampler, space, study")


def test_unknown_top_level_table_is_an_error(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[sampelr]\nname = 'tpe'\n")
    load_error(path, "sampelr: unknown key", "allowed here:")


def test_unknown_key_in_study_lists_study_keys(tmp_path: Path) -> None:
    path = study_file(tmp_path, with_study("n_trails = 5"))
    load_error(
        path,
        "study.n_trails: unknown key",
        "allowed here: checkpoint_every, checkpoint_every_seconds, direction, grace_period, heartbeat_interval, "
        "max_epochs, max_failures, "
        "metric, n_trials, name, pack, storage_retry_seconds, timeout, trial_timeout",
    )


def test_unknown_key_in_space_param_lists_param_keys(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + LOG_LR + "lg = true\n")
    load_error(path, "space.lr.lg: unknown key", "allowed here: choices, grid, high, log, low, step, type")


def test_unknown_key_in_objective_lists_train_config_fields(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "dropuot = 0.1\n")
    message = load_error(path, "objective.dropuot: unknown key", "allowed here:")
    allowed = message.split("allowed here:")[1]
    for field in ("dropout", "lr", "batch_size", "widths"):
        assert field in allowed


@pytest.mark.parametrize(
    ("table", "allowed"),
    [
        ("sampler", "multivariate, n_startup_trials, name, seed"),
        ("early_stopping", "adaptive_patience, check_finite"),
        ("pruner", "bootstrap_count, interval_steps"),
    ],
)
def test_unknown_key_in_other_sections(tmp_path: Path, table: str, allowed: str) -> None:
    path = study_file(tmp_path, MINIMAL + f"\n[{table}]\nfoo = 1\n")
    load_error(path, f"{table}.foo: unknown key", f"allowed here: {allowed}")


# --- wrong types and values --------------------------------------------------------------------------


def test_n_trials_must_be_an_integer(tmp_path: Path) -> None:
    path = study_file(tmp_path, with_study('n_trials = "ten"'))
    load_error(path, "study.n_trials", "valid integer", "'ten'")


@pytest.mark.parametrize("value", ["0", "-3"])
def test_n_trials_must_be_positive(tmp_path: Path, value: str) -> None:
    path = study_file(tmp_path, with_study(f"n_trials = {value}"))
    load_error(path, "study.n_trials", "greater than or equal to 1")


def test_direction_lists_allowed_values(tmp_path: Path) -> None:
    path = study_file(tmp_path, with_study('direction = "up"'))
    load_error(path, "study.direction", "'minimize' or 'maximize'", "'up'")


def test_study_name_must_be_a_safe_identifier(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL.replace('name = "t"', 'name = "my study/1"', 1))
    load_error(path, "study.name", "pattern")


def test_bad_sampler_name_lists_samplers(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[sampler]\nname = 'bayes'\n")
    load_error(path, "sampler.name", "'tpe'", "'random'", "'cmaes'", "'gp'", "'grid'")


def test_objective_field_validated_by_the_objective_model(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "dropout = 1.5\n")
    load_error(path, "objective.dropout", "less than 1")


def test_every_error_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    path = study_file(tmp_path, with_study('n_trials = 0\ndirection = "up"'))
    load_error(path, "study.n_trials", "study.direction", "nothing was created")


# --- impossible ranges -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("param", "fragment"),
    [
        ("type = 'float'\nlow = 0.1\nhigh = 0.1", "low must be < high"),
        ("type = 'float'\nlow = 0.5\nhigh = 0.1", "low must be < high"),
        ("type = 'float'\nlow = 0.0\nhigh = 0.1\nlog = true", "a log-scale range needs low > 0"),
        ("type = 'float'\nlow = -1e-3\nhigh = 0.1\nlog = true", "a log-scale range needs low > 0"),
        ("type = 'float'\nlow = 1e-4\nhigh = 0.1\nlog = true\nstep = 0.01", "step and log cannot be combined"),
        ("type = 'float'\nhigh = 0.1", "needs both low and high"),
        ("type = 'float'\nlow = 0.1\nhigh = 0.2\nchoices = [0.1]", "'choices' is for categorical"),
        ("type = 'float'\nlow = 0.1\nhigh = 0.2\nstep = 0", "greater than 0"),
        ("type = 'complex'\nlow = 0.1\nhigh = 0.2", "'float', 'int' or 'categorical'"),
    ],
)
def test_impossible_float_range_for_lr(tmp_path: Path, param: str, fragment: str) -> None:
    path = study_file(tmp_path, MINIMAL + f"\n[space.lr]\n{param}\n")
    load_error(path, "space.lr", fragment)


@pytest.mark.parametrize(
    ("param", "fragment"),
    [
        ("type = 'int'\nlow = 16.5\nhigh = 128", "an int parameter needs whole numbers, got low=16.5"),
        ("type = 'int'\nlow = 16\nhigh = 128.5", "an int parameter needs whole numbers, got high=128.5"),
        ("type = 'int'\nlow = 16\nhigh = 128\nstep = 1.5", "an int parameter needs whole numbers, got step=1.5"),
        ("type = 'categorical'\nchoices = []", "need a non-empty 'choices' list"),
        ("type = 'categorical'", "need a non-empty 'choices' list"),
        ("type = 'categorical'\nchoices = [32, 64]\nlow = 16\nhigh = 128", "take 'choices' only, not low/high"),
        ("type = 'categorical'\nchoices = [32, 64]\nlog = true", "take 'choices' only"),
        ("type = 'categorical'\nchoices = [32, 64, 32]", "choices must be distinct"),
    ],
)
def test_impossible_batch_size_spec(tmp_path: Path, param: str, fragment: str) -> None:
    path = study_file(tmp_path, MINIMAL + f"\n[space.batch_size]\n{param}\n")
    load_error(path, "space.batch_size", fragment)


def test_whole_valued_floats_are_fine_for_int_params(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[space.batch_size]\ntype = 'int'\nlow = 16.0\nhigh = 128\nstep = 16\n")
    spec = load_settings(path).space.params["batch_size"]
    assert (spec.low, spec.high, spec.step) == (16, 128, 16)


def test_lr_scaling_needs_an_lr_param(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[space]\nlr_scaling = 'linear'\n")
    load_error(path, "space", "lr_scaling = 'linear'", "no [space.lr]")


def test_lr_scaling_value_is_checked(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[space]\nlr_scaling = 'sqrt'\n" + LOG_LR)
    load_error(path, "space.lr_scaling", "'none' or 'linear'")


# --- budget ------------------------------------------------------------------------------------------


def test_budget_defaults_to_twenty_trials_unless_a_timeout_is_given(tmp_path: Path) -> None:
    settings = load_settings(study_file(tmp_path, with_study("max_epochs = 3")))
    assert settings.study.n_trials == 20 and settings.study.timeout is None
    # TOML has no null: a timeout-only file means "as many trials as fit in the timeout".
    settings = load_settings(study_file(tmp_path, with_study("timeout = 600")))
    assert settings.study.timeout == 600
    assert settings.study.n_trials is None


def test_a_study_with_neither_n_trials_nor_timeout_is_refused() -> None:
    data = {"study": {"name": "t", "n_trials": None}, "objective": {"name": "cnn"}}
    with pytest.raises(SettingsError, match=r"<dict>:[\s\S]*study: set n_trials, timeout or both"):
        settings_from_dict(data, source="<dict>")


def test_timeout_alone_is_a_budget() -> None:
    data = {"study": {"name": "t", "n_trials": None, "timeout": 60}, "objective": {"name": "cnn"}}
    settings = settings_from_dict(data, source="<dict>")
    assert settings.study.n_trials is None and settings.study.timeout == 60


@pytest.mark.parametrize("value", ["0", "-5"])
def test_timeout_must_be_positive(tmp_path: Path, value: str) -> None:
    load_error(study_file(tmp_path, with_study(f"timeout = {value}")), "study.timeout", "greater than 0")


# --- pruner and sampler options ------------------------------------------------------------------------


def test_pruner_option_not_used_by_the_pruner_is_rejected(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[pruner]\nname = 'hyperband'\nn_warmup_steps = 3\n")
    load_error(
        path,
        "pruner:",
        "n_warmup_steps not used by pruner 'hyperband'",
        "it takes bootstrap_count, max_resource, min_resource, reduction_factor",
    )


def test_pruner_none_takes_no_options(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[pruner]\nname = 'none'\nn_startup_trials = 3\n")
    load_error(path, "n_startup_trials not used by pruner 'none'", "no options")


def test_sampler_option_not_used_by_the_sampler_is_rejected(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[sampler]\nname = 'random'\nn_startup_trials = 3\n")
    load_error(path, "sampler:", "n_startup_trials not used by sampler 'random'; it takes seed")


def test_threshold_pruner_needs_a_bound(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[pruner]\nname = 'threshold'\n")
    load_error(path, "pruner:", "pruner 'threshold' needs lower, upper or both")


def test_threshold_pruner_bounds_must_be_ordered(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[pruner]\nname = 'threshold'\nlower = 0.9\nupper = 0.1\n")
    load_error(path, "pruner:", "lower (0.9) must not exceed upper (0.1)")


def test_threshold_pruner_with_one_bound_loads(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[pruner]\nname = 'threshold'\nlower = 0.2\n")
    pruner = load_settings(path).pruner
    assert (pruner.lower, pruner.upper) == (0.2, None)


def test_patient_pruner_needs_patience(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[pruner]\nname = 'patient'\n")
    load_error(path, "pruner:", "pruner 'patient' needs patience")


def test_percentile_must_be_a_percentage(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[pruner]\nname = 'percentile'\npercentile = 150\n")
    load_error(path, "pruner.percentile", "less than or equal to 100")


def test_hyperband_min_resource_auto_is_refused(tmp_path: Path) -> None:
    # Optuna's HyperbandPruner takes an int only; "auto" used to pass and crash the first pruning check.
    path = study_file(tmp_path, MINIMAL + "\n[pruner]\nname = 'hyperband'\nmin_resource = 'auto'\n")
    load_error(path, "pruner:", "pruner 'hyperband' needs min_resource as a whole number")


@pytest.mark.parametrize(("pruner", "key"), [("hyperband", "min_resource"), ("hyperband", "max_resource"),
                                             ("successive_halving", "min_resource")])
def test_resources_must_be_at_least_one_epoch(tmp_path: Path, pruner: str, key: str) -> None:
    path = study_file(tmp_path, MINIMAL + f"\n[pruner]\nname = '{pruner}'\n{key} = 0\n")
    load_error(path, "pruner:", f"{key} must be a whole number of epochs >= 1 or 'auto', got 0")


def test_successive_halving_min_resource_auto_is_fine(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[pruner]\nname = 'successive_halving'\nmin_resource = 'auto'\n")
    assert load_settings(path).pruner.min_resource == "auto"


# --- the space against the objective ----------------------------------------------------------------------


def test_space_name_must_be_an_objective_setting(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[space.learning_rate]\ntype = 'float'\nlow = 0.1\nhigh = 0.2\n")
    message = load_error(path, "[space] learning_rate: not a setting of objective 'cnn'", "Tunable names are:")
    tunable = message.split("Tunable names are:")[1]
    assert "lr" in tunable and "dropout" in tunable


def test_range_endpoint_refused_by_the_objective(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[space.dropout]\ntype = 'float'\nlow = 0.0\nhigh = 1.5\n")
    load_error(path, "[space.dropout] can yield 1.5", "refuses for dropout", "less than 1", "Narrow the range")


def test_low_endpoint_refused_by_the_objective(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[space.lr]\ntype = 'float'\nlow = 0.0\nhigh = 0.1\n")
    load_error(path, "[space.lr] can yield 0.0", "greater than 0")


def test_choice_refused_by_the_objective(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[space.optimizer]\ntype = 'categorical'\nchoices = ['sgd', 'lion']\n")
    load_error(path, "[space.optimizer] can yield 'lion'", "'adamw' or 'sgd'")


def test_int_endpoint_refused_by_the_objective(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[space.batch_size]\ntype = 'int'\nlow = 0\nhigh = 64\n")
    load_error(path, "[space.batch_size] can yield 0")


def test_space_value_checked_together_with_the_objective_section(tmp_path: Path) -> None:
    # momentum = 0 is fine alone but not with sgd + nesterov set in [objective].
    text = MINIMAL + "optimizer = 'sgd'\nnesterov = true\n\n[space.momentum]\ntype = 'float'\nlow = 0.0\nhigh = 0.9\n"
    load_error(study_file(tmp_path, text), "[space.momentum] can yield 0.0", "nesterov = true needs momentum > 0")


def test_range_endpoints_are_checked_even_with_a_grid(tmp_path: Path) -> None:
    # A tpe study samples low..high and ignores grid, so both must be valid for the objective.
    text = MINIMAL + "\n[space.dropout]\ntype = 'float'\nlow = 0.0\nhigh = 1.5\ngrid = [0.1, 0.2]\n"
    load_error(study_file(tmp_path, text), "[space.dropout] can yield 1.5")


# --- metrics and early stopping -----------------------------------------------------------------------------


def test_unknown_study_metric(tmp_path: Path) -> None:
    path = study_file(tmp_path, with_study('metric = "val_acc"'))
    load_error(path, "study.metric = 'val_acc' is not a metric the objective reports", "val_accuracy, val_f1")


def test_unknown_early_stopping_monitor(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[early_stopping]\nmonitor = 'val_acc'\n")
    load_error(path, "early_stopping.monitor = 'val_acc'", "choose one of")


def test_weighted_monitor_with_known_metrics(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[early_stopping]\nmonitor = {val_accuracy = 0.7, val_f1 = 0.3}\n")
    settings = load_settings(path)
    assert settings.monitor == {"val_accuracy": 0.7, "val_f1": 0.3}
    assert settings.monitor_mode == "max"
    assert settings.early_stopping_kwargs()["monitor"] == {"val_accuracy": 0.7, "val_f1": 0.3}


def test_weighted_monitor_with_an_unknown_metric(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[early_stopping]\nmonitor = {val_accuracy = 0.7, val_f2 = 0.3}\n")
    load_error(path, "early_stopping.monitor = 'val_f2' is not a metric", "choose one of")


def test_weighted_monitor_must_not_be_empty(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[early_stopping]\nmonitor = {}\n")
    load_error(path, "early_stopping.monitor", "at least one metric")


def test_weighted_monitor_weights_must_be_finite(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + "\n[early_stopping]\nmonitor = {val_accuracy = nan}\n")
    load_error(path, "early_stopping.monitor", "finite")


def test_early_stopping_combination_checked_by_early_stopping(tmp_path: Path) -> None:
    text = MINIMAL + "\n[early_stopping]\npatience = 5\nadaptive_patience = true\nmin_patience = 6\n"
    load_error(study_file(tmp_path, text), "[early_stopping]", "min_patience <= patience <= max_patience")


def test_disabled_early_stopping_never_stops(tmp_path: Path) -> None:
    settings = load_settings(study_file(tmp_path, MINIMAL + "\n[early_stopping]\nenabled = false\n"))
    kwargs = settings.early_stopping_kwargs()
    assert kwargs["patience"] >= 10**9 and kwargs["check_finite"] is False


@pytest.mark.parametrize(
    ("study", "early_stopping", "mode"),
    [
        ("", "", "max"),  # monitor defaults to the metric, mode to the direction
        ('direction = "minimize"\nmetric = "val_loss"', "", "min"),
        ('direction = "minimize"', "monitor = 'val_accuracy'", "min"),  # same as the metric: follows direction
        ("", "monitor = 'val_loss'", "min"),
        ("", "monitor = 'train_loss'", "min"),
        ("", "monitor = 'val_f1'", "max"),
        ("", "monitor = 'val_loss'\nmode = 'max'", "max"),  # explicit mode wins
        ('direction = "minimize"', "mode = 'max'", "max"),
    ],
)
def test_monitor_mode_inference(tmp_path: Path, study: str, early_stopping: str, mode: str) -> None:
    text = with_study(study) + f"\n[early_stopping]\n{early_stopping}\n"
    settings = load_settings(study_file(tmp_path, text))
    assert settings.monitor_mode == mode
    assert settings.early_stopping_kwargs()["mode"] == mode


# --- grid sampler -------------------------------------------------------------------------------------------


def test_grid_sampler_rejects_a_continuous_param_without_grid(tmp_path: Path) -> None:
    text = MINIMAL + "\n[sampler]\nname = 'grid'\n" + LOG_LR
    load_error(study_file(tmp_path, text), "[sampler] name = 'grid' needs a finite set", "grid = [...] to [space.lr]")


def test_grid_sampler_names_every_param_without_values(tmp_path: Path) -> None:
    text = (MINIMAL + "\n[sampler]\nname = 'grid'\n" + LOG_LR
            + "\n[space.dropout]\ntype = 'float'\nlow = 0.0\nhigh = 0.5\n")
    load_error(study_file(tmp_path, text), "[space.lr] (also: dropout)")


def test_grid_sampler_accepts_grid_values_choices_and_int_ranges(tmp_path: Path) -> None:
    text = (MINIMAL + "\n[sampler]\nname = 'grid'\n" + LOG_LR + "grid = [1e-3, 1e-2]\n"
            "\n[space.batch_size]\ntype = 'categorical'\nchoices = [32, 64]\n"
            "\n[space.warmup_epochs]\ntype = 'int'\nlow = 0\nhigh = 4\nstep = 2\n")
    settings = load_settings(study_file(tmp_path, text))
    params = settings.space.params
    assert params["lr"].grid_values() == [1e-3, 1e-2]
    assert params["batch_size"].grid_values() == [32, 64]
    assert params["warmup_epochs"].grid_values() == [0, 2, 4]


def test_grid_values_must_lie_in_the_range(tmp_path: Path) -> None:
    text = MINIMAL + LOG_LR + "grid = [1e-3, 0.5]\n"
    load_error(study_file(tmp_path, text), "space.lr", "grid value 0.5 is not a number within [low, high]")


def test_grid_values_of_a_categorical_must_be_choices(tmp_path: Path) -> None:
    text = MINIMAL + "\n[space.batch_size]\ntype = 'categorical'\nchoices = [32, 64]\ngrid = [32, 48]\n"
    load_error(study_file(tmp_path, text), "space.batch_size", "grid values [48] are not among the choices")


@pytest.mark.parametrize(("grid", "fragment"), [("['a']", "grid value 'a' is not a number"),
                                                ("[true]", "grid value True is not a number"),
                                                ("[2.5]", "needs whole numbers, got grid value 2.5")])
def test_grid_values_of_an_int_must_be_whole_numbers(tmp_path: Path, grid: str, fragment: str) -> None:
    text = MINIMAL + f"\n[space.warmup_epochs]\ntype = 'int'\nlow = 0\nhigh = 4\ngrid = {grid}\n"
    load_error(study_file(tmp_path, text), "space.warmup_epochs", fragment)


# --- file problems ------------------------------------------------------------------------------------------


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = study_file(tmp_path, "[study\nname = 't'\n")
    load_error(path, "not valid TOML", "line 1")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(SettingsError, match=re.escape(f"study file {str(path)!r} does not exist")):
        load_settings(path)


def test_a_missing_study_file_lists_the_names_that_would_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as caught:
        load_settings(find_study_file("quikstart"))
    message = str(caught.value)
    assert "study file 'quikstart' does not exist" in message
    assert all(name in message for name in ("quickstart", "cifar10", "folder_example")), message


def test_a_bare_name_is_the_study_file_of_that_name_here_then_in_the_projects_studies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_study_file("quickstart") == str(STUDIES / "quickstart.toml")
    assert load_settings(find_study_file("quickstart")).study.name == "quickstart"
    (tmp_path / "studies").mkdir()
    mine = study_file(tmp_path / "studies", MINIMAL.replace('name = "t"', 'name = "mine"'), name="quickstart.toml")
    assert find_study_file("quickstart") == str(Path("studies") / "quickstart.toml")
    assert load_settings(find_study_file("quickstart")).study.name == "mine" and mine.is_file()
    (tmp_path / "quickstart").write_text("not a study")  # a file of that very name is what was meant
    assert find_study_file("quickstart") == "quickstart"
    for looks_like_a_path in ("quickstart.toml", "other/quickstart", "./cifar10", "nope"):
        assert find_study_file(looks_like_a_path) == looks_like_a_path


def test_a_folder_is_not_a_study_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="is a folder, not a study file"):
        load_settings(tmp_path)


def test_missing_objective_section(tmp_path: Path) -> None:
    path = study_file(tmp_path, "[study]\nname = 't'\n")
    load_error(path, "missing [objective] section", 'name = "cnn"')


def test_unknown_objective_plugin_lists_available(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL.replace('name = "cnn"', 'name = "transformer"'))
    load_error(path, "[objective] name: unknown objective 'transformer'", "available: cnn")


def test_settings_error_is_an_hpo_error_with_exit_code_2(tmp_path: Path) -> None:
    with pytest.raises(HpoError) as info:
        load_settings(tmp_path / "nope.toml")
    assert isinstance(info.value, SettingsError) and info.value.exit_code == 2


# --- --set overrides ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("study.n_trials=3", ["study", "n_trials"], 3),
        (" space.lr.high = 0.5 ", ["space", "lr", "high"], 0.5),
        ("space.lr.log=false", ["space", "lr", "log"], False),
        ("space.batch_size.choices=[32, 64]", ["space", "batch_size", "choices"], [32, 64]),
        ("study.name=abc", ["study", "name"], "abc"),  # not TOML: kept as a string
        ('study.name="x=y"', ["study", "name"], "x=y"),
        ("early_stopping.monitor={val_accuracy = 1.0}", ["early_stopping", "monitor"], {"val_accuracy": 1.0}),
    ],
)
def test_parse_override(text: str, path: list[str], value: object) -> None:
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize("text", ["nokey", "study=3", "n_trials=3", "=3", "study.n_trials", "study..n_trials=3",
                                  ".study.n_trials=3"])
def test_malformed_override(text: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(f"--set {text!r}: expected section.key=value")):
        parse_override(text)


def test_apply_overrides_creates_tables_and_refuses_to_descend_into_values() -> None:
    data = apply_overrides({"study": {"name": "t"}}, ["space.lr.high=0.5", "study.n_trials=3"])
    assert data == {"study": {"name": "t", "n_trials": 3}, "space": {"lr": {"high": 0.5}}}
    with pytest.raises(SettingsError, match="'name' is a value, not a section"):
        apply_overrides({"study": {"name": "t"}}, ["study.name.x=1"])


def test_override_changes_n_trials(tmp_path: Path) -> None:
    settings = load_settings(study_file(tmp_path, MINIMAL), ["study.n_trials=3"])
    assert settings.study.n_trials == 3


def test_override_changes_a_space_bound(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + LOG_LR)
    settings = load_settings(path, ["space.lr.high=0.5"])
    assert settings.space.params["lr"].high == 0.5
    assert settings.space.params["lr"].low == 1e-4
    assert load_settings(path).space.params["lr"].high == 0.1  # the file is untouched


def test_later_override_wins(tmp_path: Path) -> None:
    settings = load_settings(study_file(tmp_path, MINIMAL), ["study.n_trials=3", "study.n_trials=4"])
    assert settings.study.n_trials == 4


def test_bad_override_value_is_validated_like_the_file(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + LOG_LR)
    load_error(path, "space.lr", "a log-scale range needs low > 0, got low=-1", overrides=("space.lr.low=-1",))


def test_override_of_wrong_type(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL)
    load_error(path, "study.n_trials takes a whole number", '"ten" (a string)', overrides=("study.n_trials=ten",))
    # valid TOML of the wrong type is refused too, not coerced (1 -> true, true -> 1 second, 1e3 -> 1000)
    load_error(path, "early_stopping.enabled takes true or false", "--set early_stopping.enabled=true",
               overrides=("early_stopping.enabled=1",))
    load_error(path, "study.timeout takes a number, not true", overrides=("study.timeout=true",))
    load_error(path, "study.max_epochs takes a whole number, not 1000.0", overrides=("study.max_epochs=1e3",))
    load_error(path, "pruner.n_startup_trials takes a whole number", overrides=("pruner={n_startup_trials='3'}",))
    assert load_settings(path, ["study.timeout=60", "space.lr={type='float', low=1, high=2}"]).study.timeout == 60


def test_override_of_unknown_key_lists_allowed_keys(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL)
    load_error(path, "study.n_trails: unknown key", "n_trials", overrides=("study.n_trails=3",))


def test_malformed_override_through_load_settings(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="--set 'nokey'"):
        load_settings(study_file(tmp_path, MINIMAL), ["nokey"])


def test_override_on_a_shipped_study(tmp_path: Path) -> None:
    settings = load_settings(STUDIES / "quickstart.toml", ["study.n_trials=2", "objective.dataset=synthetic"])
    assert settings.study.n_trials == 2
    assert settings.objective.dataset == "synthetic"


# --- fingerprint ---------------------------------------------------------------------------------------------


def test_fingerprint_ignores_budget_but_not_space(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + LOG_LR)
    base = load_settings(path).fingerprint()
    assert load_settings(path, ["study.n_trials=3"]).fingerprint() == base
    assert load_settings(path, ["study.timeout=60"]).fingerprint() == base
    assert load_settings(path, ["sampler.seed=7"]).fingerprint() == base
    assert load_settings(path, ["space.lr.high=0.5"]).fingerprint() != base
    assert load_settings(path, ["space.lr.log=false"]).fingerprint() != base
    assert load_settings(path, ['study.direction="minimize"']).fingerprint() != base
    assert load_settings(path, ['study.metric="val_f1"']).fingerprint() != base


def test_fingerprint_sees_lr_scaling_and_added_params(tmp_path: Path) -> None:
    path = study_file(tmp_path, MINIMAL + LOG_LR)
    base = load_settings(path).fingerprint()
    assert load_settings(path, ["space.lr_scaling=linear"]).fingerprint() != base
    added = load_settings(path, ["space.dropout.type=float", "space.dropout.low=0.0", "space.dropout.high=0.5"])
    assert added.fingerprint() != base
    assert set(added.fingerprint()["space"]) == {"lr", "dropout"}


def test_fingerprint_sees_the_data_model_and_recipe_but_not_how_trials_run(tmp_path: Path) -> None:
    """A trial's value means something else on other data, another model or another recipe, so the study is refused
    then; the device, compilation, caches and a tuned key's file default change no value, so it resumes."""
    path = study_file(tmp_path, MINIMAL.replace('name = "cnn"', 'name = "cnn"\ndataset = "folder"') + LOG_LR)
    base = load_settings(path).fingerprint()
    assert base["objective"]["data_dir"] == str(tmp_path.resolve() / "data")  # resolved: the same from any folder
    for changed in ["objective.data_dir='other'", "objective.channels=1", "objective.image_size=32",
                    "objective.val_size=0.3", "objective.data_seed=1", "objective.train_subset=100",
                    "objective.model='torchvision:resnet18'", "objective.widths=[8,16]", "objective.optimizer='sgd'",
                    "objective.schedule='step'", "objective.augment=false", "objective.seed=3"]:
        assert load_settings(path, [changed]).fingerprint() != base, changed
    for neutral in ["objective.device='cpu'", "objective.compile=true", "objective.cuda_graphs=true",
                    "objective.cache_dir='c'", "objective.download=false", "objective.verify_checksums=false",
                    "objective.data_placement='stream'", "objective.data_budget_mb=10.0",
                    "objective.eval_batch_size=7", "objective.lr=0.05", "study.max_epochs=3"]:
        assert load_settings(path, [neutral]).fingerprint() == base, neutral


def test_fingerprint_leaves_out_data_keys_the_data_set_does_not_read(tmp_path: Path) -> None:
    """digits reads no data_dir: a copy of its study file in another folder is the same study."""
    path = study_file(tmp_path, MINIMAL)
    base = load_settings(path).fingerprint()
    assert "data_dir" not in base["objective"] and "synthetic_classes" not in base["objective"]
    assert load_settings(path, ["objective.data_dir='elsewhere'", "objective.synthetic_classes=3"]).fingerprint() \
        == base
    assert load_settings(path, ["objective.test_size=0.3"]).fingerprint() != base


def test_run_only_keys_are_training_settings() -> None:
    from objectives.settings import RUN_ONLY_KEYS

    assert set(TrainConfig.model_fields) >= RUN_ONLY_KEYS  # a misspelt name would leave a key in the fingerprint


def test_fingerprint_is_plain_data(tmp_path: Path) -> None:
    import json

    fingerprint = load_settings(study_file(tmp_path, MINIMAL + LOG_LR)).fingerprint()
    assert json.loads(json.dumps(fingerprint)) == fingerprint
    assert fingerprint["space"]["lr"] == {"type": "float", "low": 1e-4, "high": 0.1, "log": True}


# --- models used directly -------------------------------------------------------------------------------------


def test_space_section_splits_params_from_lr_scaling() -> None:
    space = SpaceSection.model_validate({"lr_scaling": "linear", "lr": {"type": "float", "low": 0.01, "high": 1}})
    assert space.lr_scaling == "linear"
    assert list(space.params) == ["lr"]
    assert space.params["lr"] == ParamSpec(type="float", low=0.01, high=1.0)


def test_set_pruner_name_drops_the_file_options_the_new_pruner_does_not_take(
        caplog: pytest.LogCaptureFixture) -> None:
    quickstart = PROJECT_STUDIES / "quickstart.toml"  # a median pruner with n_startup_trials, n_warmup_steps, ...
    with caplog.at_level("WARNING", logger="hpo"):
        settings = load_settings(quickstart, ["pruner.name=hyperband"])
    assert settings.pruner.name == "hyperband" and settings.pruner.n_warmup_steps is None
    assert "options n_startup_trials, n_warmup_steps, interval_steps do not apply to 'hyperband'" in caplog.text
    kept = load_settings(quickstart, ["pruner.name=percentile", "pruner.percentile=25"]).pruner
    assert (kept.n_startup_trials, kept.n_warmup_steps, kept.percentile) == (3, 2, 25)  # percentile takes them
    assert load_settings(quickstart, ["sampler.name=random"]).sampler.seed == 42  # n_startup_trials left out
    # an option the user gives with --set is theirs: a wrong one is still refused
    load_error(quickstart, "n_warmup_steps not used by pruner 'hyperband'",
               overrides=("pruner.name=hyperband", "pruner.n_warmup_steps=2"))
    assert load_settings(quickstart).pruner.n_warmup_steps == 2  # the file is untouched


def test_a_misspelt_space_name_set_by_one_key_is_named_as_misspelt() -> None:
    """`--set space.lrr.low=1` makes a [space.lrr] table with only `low`: the name is the mistake, not the type."""
    message = load_error(PROJECT_STUDIES / "quickstart.toml", "[space] lrr: not a setting of objective 'cnn'",
                         "Tunable names are: ", overrides=("space.lrr.low=1",))
    assert "type" not in message.split("Tunable names")[0]


def test_settings_stored_with_a_study_validate_again() -> None:
    """`hpo export --study NAME` and `hpo compare`'s reuse check rebuild settings from the dump stored with the
    study, whose space is {"lr_scaling": ..., "params": {...}}: "params" is not a misspelt parameter."""
    settings = load_settings(PROJECT_STUDIES / "quickstart.toml")
    dumped = json.loads(settings.model_dump_json(exclude={"objective"}))
    again = settings_from_dict({**dumped, "objective": {"name": "cnn", **settings.objective.model_dump(mode="json")}})
    assert again.space == settings.space and again.fingerprint() == settings.fingerprint()


def test_how_trials_run_is_not_tunable() -> None:
    message = load_error(PROJECT_STUDIES / "quickstart.toml", "[space] device: not a setting of objective 'cnn' that",
                         overrides=("space.device={type='categorical', choices=['cpu']}",))
    tunable = message.split("Tunable names are: ")[1]
    assert "lr," in tunable and not {"device", "cache_dir", "data_dir", "model_args"} & set(tunable[:-1].split(", "))
