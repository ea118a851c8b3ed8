"""A user's own training function: the study file names it, hpo checks it before anything exists, the hook
forwards every epoch to the trial session, and `hpo run` on the shipped example leaves real results."""

from __future__ import annotations

import importlib.util
import re
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from objectives.custom import CustomConfig, CustomLoopError, CustomObjective, EpochHook, TrialConfig
from search.cli import main
from search.config import load_settings
from search.errors import SettingsError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_loop"

TRAIN = """
def train(config, on_epoch):
    raise AssertionError("prepare() must not train")
"""


def study(tmp_path: Path, objective: str = "", extra: str = "", train: str = TRAIN) -> Path:
    """A study file for the custom objective, with train.py beside it."""
    (tmp_path / "train.py").write_text(textwrap.dedent(train))
    path = tmp_path / "study.toml"
    path.write_text(textwrap.dedent("""
        [study]
        name = "c"
        metric = "val_accuracy"
        max_epochs = 3
        """) + textwrap.dedent(extra) + textwrap.dedent("""
        [objective]
        name = "custom"
        train = "train.py:train"
        metrics = ["val_loss", "val_accuracy"]
        """) + textwrap.dedent(objective))
    return path


# --- the [objective] section -----------------------------------------------------------------------------------

def test_relative_train_file_resolves_against_the_study_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = study(tmp_path)
    monkeypatch.chdir("/")  # the study runs the same from any working directory
    config = load_settings(path).objective
    assert isinstance(config, CustomConfig)
    assert config.train == f"{tmp_path.resolve() / 'train.py'}:train"
    assert config.metrics == ("val_loss", "val_accuracy")
    assert (config.device, config.seed, config.settings) == ("auto", 0, {})


def test_package_reference_passes_unchanged(tmp_path: Path) -> None:
    path = study(tmp_path)
    path.write_text(path.read_text().replace('"train.py:train"', '"mypackage.loops:train"'))
    assert load_settings(path).objective.train == "mypackage.loops:train"


@pytest.mark.parametrize("reference", ["train.py", "train.py:", ":train", "train.py:not-a-name"])
def test_malformed_train_reference_is_refused(tmp_path: Path, reference: str) -> None:
    path = study(tmp_path)
    path.write_text(path.read_text().replace('"train.py:train"', f'"{reference}"'))
    with pytest.raises(SettingsError, match=r"objective\.train: train = .*expected 'file\.py:function'"):
        load_settings(path)


def test_typo_in_objective_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="objective.sede: unknown key; allowed here: .*seed") as info:
        load_settings(study(tmp_path, objective="sede = 1\n"))
    assert "nothing was created" in str(info.value)


def test_space_names_the_function_may_not_know_are_passed_through(tmp_path: Path) -> None:
    extra = """
        [space.anything_at_all]
        type = "float"
        low = -5.0
        high = 5.0
        """
    settings = load_settings(study(tmp_path, extra=extra))
    assert list(settings.space.params) == ["anything_at_all"]  # no range probe: the function decides


@pytest.mark.parametrize(("extra", "where"), [
    ('[study]\nmetric = "val_f1"\n', "study.metric = 'val_f1'"),
    ('[early_stopping]\nmonitor = "train_loss"\n', "early_stopping.monitor = 'train_loss'"),
    ("[early_stopping]\nmonitor = {val_loss = 1.0, f1 = 0.5}\n", "early_stopping.monitor = 'f1'"),
])
def test_metrics_must_be_among_what_the_function_reports(tmp_path: Path, extra: str, where: str) -> None:
    path = study(tmp_path)
    text = path.read_text()
    if extra.startswith("[study]"):
        text = text.replace('metric = "val_accuracy"', extra.splitlines()[1])
    else:
        text = text.replace("[objective]", f"{extra}\n[objective]")
    path.write_text(text)
    with pytest.raises(SettingsError, match=f"{where!s}.*not a metric the objective reports; choose one of "
                                            "val_loss, val_accuracy"):
        load_settings(path)


def test_settings_and_options_reach_the_config(tmp_path: Path) -> None:
    objective = 'device = "cpu"\nseed = 7\n[objective.settings]\nhidden = 32\nlayers = [64, 32]\n'
    config = load_settings(study(tmp_path, objective=objective)).objective
    assert (config.device, config.seed, config.settings) == ("cpu", 7, {"hidden": 32, "layers": [64, 32]})


def test_fingerprint_sees_the_function_and_its_settings_but_not_the_device(tmp_path: Path) -> None:
    """Another function, seed or fixed setting gives trials another meaning; the device does not."""
    path = study(tmp_path, objective='[objective.settings]\nhidden = 32\n')
    base = load_settings(path).fingerprint()
    assert load_settings(path, ["objective.device='cpu'"]).fingerprint() == base
    for changed in ["objective.seed=1", "objective.settings.hidden=64", "objective.train='other.py:train'"]:
        assert load_settings(path, [changed]).fingerprint() != base, changed


# --- importing the function at prepare() -----------------------------------------------------------------------

def prepare_error(path: Path) -> str:
    objective = CustomObjective(load_settings(path))
    with pytest.raises(CustomLoopError) as info:
        objective.prepare()
    assert info.value.exit_code == 2
    return str(info.value)


def test_prepare_imports_the_function_without_training(tmp_path: Path) -> None:
    objective = CustomObjective(load_settings(study(tmp_path)))
    objective.prepare()  # TRAIN raises if called
    assert objective._train is not None and objective._train.__name__ == "train"


def test_missing_train_file_names_the_path(tmp_path: Path) -> None:
    path = study(tmp_path)
    path.write_text(path.read_text().replace('"train.py:train"', '"loops/missing.py:train"'))
    message = prepare_error(path)
    assert str(tmp_path.resolve() / "loops" / "missing.py") in message
    assert "does not exist" in message and "relative path is read from the study file's folder" in message


def test_missing_function_lists_what_the_file_has(tmp_path: Path) -> None:
    message = prepare_error(study(tmp_path, train="def fit(config, on_epoch):\n    pass\n"))
    assert "has no 'train'; functions there: fit" in message


@pytest.mark.parametrize(("train", "fragment"), [
    ("train = 3\n", "'train' is not a function (it is of type int)"),
    ("def train(config):\n    pass\n", "cannot be called as train(config, on_epoch)"),
    ("import not_a_module_anywhere\n", "ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    ("def train(config, on_epoch)\n", "SyntaxError"),
])
def test_unusable_function_is_refused_with_the_reason(tmp_path: Path, train: str, fragment: str) -> None:
    message = prepare_error(study(tmp_path, train=train))
    assert fragment in message and "train = " in message


def test_missing_package_module_is_refused(tmp_path: Path) -> None:
    path = study(tmp_path)
    path.write_text(path.read_text().replace('"train.py:train"', '"no_such_package.loops:train"'))
    assert "is installed in the environment hpo runs in" in prepare_error(path)


def test_hpo_run_exits_2_and_creates_nothing_when_the_function_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = study(tmp_path, train="def fit(config, on_epoch):\n    pass\n")
    assert main(["run", str(path), "--run-dir", str(tmp_path / "runs"), "--quiet"]) == 2
    assert "has no 'train'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# --- what the function receives --------------------------------------------------------------------------------

def test_trial_config_is_read_only_and_get_prefers_sampled_values(tmp_path: Path) -> None:
    extra = '[space]\nlr_scaling = "linear"\n[space.lr]\ntype = "float"\nlow = 0.01\nhigh = 0.1\n'
    objective = 'device = "cpu"\n[objective.settings]\nbatch_size = 512\nhidden = 8\n'
    custom = CustomObjective(load_settings(study(tmp_path, objective=objective, extra=extra)))
    config = custom.trial_config({"lr": 0.1, "dropout": 0.5}, trial_number=4)
    assert isinstance(config, TrialConfig)
    assert config.params == {"lr": pytest.approx(0.2), "dropout": 0.5}  # linear rule: lr x 512 / 256
    assert (config.get("hidden"), config.get("dropout", 0.0), config.get("nothing", 3)) == (8, 0.5, 3)
    assert (config.device, config.max_epochs, config.seed, config.trial_number) == (torch.device("cpu"), 3, 0, 4)
    with pytest.raises(TypeError):
        config.params["lr"] = 1.0  # type: ignore[index]


class Forward:
    """Stands in for TrialSession.on_epoch: records calls, says stop at a given epoch."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls: list[tuple[int, dict[str, float], Any]] = []
        self.stop_at = stop_at

    def __call__(self, epoch: int, metrics: dict[str, float], state: Any) -> bool:
        self.calls.append((epoch, metrics, state))
        return epoch == self.stop_at


def test_hook_forwards_metrics_and_model_and_stops_when_told() -> None:
    forward, model = Forward(stop_at=1), torch.nn.Linear(2, 2)
    hook = EpochHook(forward, ("val_loss",), max_epochs=10)
    assert hook(0, {"val_loss": torch.tensor(0.5), "extra": 2}, model) is False
    assert hook(1, {"val_loss": 0.4}, model) is True
    assert [(e, m) for e, m, _ in forward.calls] == [(0, {"val_loss": 0.5, "extra": 2.0}), (1, {"val_loss": 0.4})]
    assert all(state.model is model for _, _, state in forward.calls)  # the session saves best weights from it


def test_hook_says_stop_at_the_last_epoch() -> None:
    hook = EpochHook(Forward(), ("val_loss",), max_epochs=2)
    assert [hook(e, {"val_loss": 1.0}, torch.nn.Linear(1, 1)) for e in range(2)] == [False, True]
    with pytest.raises(ValueError, match="past study.max_epochs"):
        hook(2, {"val_loss": 1.0}, torch.nn.Linear(1, 1))


@pytest.mark.parametrize(("epoch", "metrics", "model", "error"), [
    (1, {"val_loss": 1.0}, torch.nn.Linear(1, 1), "epoch 1 where 0 was due"),
    (0, {"loss": 1.0}, torch.nn.Linear(1, 1), "no val_loss at epoch 0 .*it got loss"),
    (0, {"val_loss": "low"}, torch.nn.Linear(1, 1), "'val_loss' at epoch 0 is not a number"),
    (0, {"val_loss": 1.0}, "model", "needs the model"),
])
def test_hook_refuses_what_the_session_cannot_use(epoch: int, metrics: dict, model: Any, error: str) -> None:
    forward = Forward()
    with pytest.raises((ValueError, TypeError), match=error):
        EpochHook(forward, ("val_loss",), max_epochs=5)(epoch, metrics, model)
    assert forward.calls == []


# --- end to end: `hpo run examples/custom_loop/study.toml` -----------------------------------------------------

def example_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_train_digits", EXAMPLE / "train_digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_example_study_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    budget, max_epochs = 4, 4
    code = main(["run", str(EXAMPLE / "study.toml"), "--run-dir", str(tmp_path), "--quiet",
                 "--set", f"study.n_trials={budget}", "--set", f"study.max_epochs={max_epochs}",
                 "--set", "objective.device='cpu'",
                 "--set", "space.unused={type='int', low=1, high=3}"])  # a name train() never reads
    out = capsys.readouterr()
    assert code == 0, out.err
    root = tmp_path / "custom_loop"
    trials = optuna.load_study(study_name="custom_loop", storage=f"sqlite:///{root / 'optuna.db'}").trials
    states = [t.state for t in trials]
    assert len(trials) == budget and all(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    assert TrialState.COMPLETE in states
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    build_model = example_module().build_model
    for t in trials:
        epochs = t.user_attrs["epochs_run"]
        assert 1 <= epochs <= max_epochs and sorted(t.intermediate_values) == list(range(epochs))
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.params["unused"] == str(t.params["unused"])
        assert run.data.params["config.hidden"] == "64" and run.data.params["config.device"] == "cpu"
        for key in ("train_loss", "val_loss", "val_accuracy"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(epochs)), (t.number, key)
        if t.state != TrialState.COMPLETE:
            continue
        checkpoint = torch.load(t.user_attrs["checkpoint"], weights_only=True)
        assert checkpoint["epoch"] == t.user_attrs["best_epoch"]
        assert checkpoint["metrics"]["val_accuracy"] == pytest.approx(t.value)
        assert checkpoint["params"]["unused"] == t.params["unused"]
        model = build_model(checkpoint["settings"]["hidden"], checkpoint["params"]["dropout"])
        model.load_state_dict(checkpoint["state_dict"])  # strict: every weight of the example's model
    assert re.search(r"best trial #\d+: val_accuracy [\d.]+; params", out.out)  # no test score, no error
    assert " dashboard " in out.out and " export " not in out.out  # no export command offered: it cannot work
    code = main(["export", str(EXAMPLE / "study.toml"), "--run-dir", str(tmp_path), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot rebuild a model" in err and "load_state_dict" in err  # no export, said why
    assert not (tmp_path / "m").exists()
