"""Your own training loop: a function ``train(config, on_epoch) -> model`` named in the study file.

Some users need their own loss, metrics or loop. They write one function; the search side samples the
hyperparameters, calls it once per trial and does everything else through the ``on_epoch`` hook the function
calls every epoch: early stopping, pruning, MLflow, checkpoints (best weights) and dashboard notes.
Like ``objective.py`` this is glue: the user's code never sees Optuna or MLflow.

Limits, by design: a crashed trial that is retried starts again at epoch 0 (hpo cannot save your optimizer),
there is no test split hpo knows of (``test_score`` is empty), and ``hpo export`` cannot rebuild the model.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import torch

from objectives.runtime import resolve_runtime, seed_everything
from objectives.settings import CustomConfig
from objectives.spec import CustomSpec
from objectives.user_code import import_file
from search.config import Settings
from search.errors import HpoError, first_line
from search.plugins import ExportUnsupported
from search.session import StudyContext
from search.space import REFERENCE_BATCH, resolve, suggest


class CustomLoopError(HpoError):
    """The training function named in the study file cannot be used; nothing has been created."""

    exit_code = 2


@dataclass(frozen=True)
class TrialConfig:
    """What one trial's training function receives. ``params`` are the sampled ``[space]`` values (the
    learning rate already scaled when ``lr_scaling = "linear"``), ``settings`` the fixed ``[objective.settings]``;
    both are read-only. ``seed`` is the same for every trial, so trials differ only by their parameters."""

    params: Mapping[str, Any]
    settings: Mapping[str, Any]
    device: torch.device
    max_epochs: int
    seed: int
    trial_number: int

    def get(self, name: str, default: Any = None) -> Any:
        """A sampled value, else the fixed setting, else ``default``: tune a value or fix it without code changes."""
        if name in self.params:
            return self.params[name]
        return self.settings.get(name, default)


class OnEpoch(Protocol):
    """The hook a training function calls after every epoch; True means stop training now."""

    def __call__(self, epoch: int, metrics: Mapping[str, float], model: torch.nn.Module) -> bool: ...


TrainFunction = Callable[[TrialConfig, OnEpoch], "torch.nn.Module | None"]


@dataclass
class _EpochState:
    """What the trial session reads from a training state: ``.model`` for the best weights (no resume)."""

    model: torch.nn.Module


class EpochHook:
    """Adapts the user's ``on_epoch(epoch, metrics, model)`` to the session's ``on_epoch(epoch, metrics, state)``,
    checking what the function reports so a mistake fails the trial with a message instead of a KeyError."""

    def __init__(self, forward: Callable[[int, dict[str, float], Any], bool], metrics: tuple[str, ...],
                 max_epochs: int) -> None:
        self.forward = forward
        self.metrics = metrics
        self.max_epochs = max_epochs
        self.next_epoch = 0

    def __call__(self, epoch: int, metrics: Mapping[str, float], model: torch.nn.Module) -> bool:
        if epoch >= self.max_epochs:
            raise ValueError(f"on_epoch got epoch {epoch}, past study.max_epochs ({self.max_epochs}); "
                             "loop over range(config.max_epochs) and stop when on_epoch returns True")
        if epoch != self.next_epoch:
            raise ValueError(f"on_epoch got epoch {epoch} where {self.next_epoch} was due; count epochs from 0 "
                             "and call on_epoch exactly once per epoch")
        missing = [name for name in self.metrics if name not in metrics]
        if missing:
            raise ValueError(f"on_epoch got no {', '.join(missing)} at epoch {epoch} (it got "
                             f"{', '.join(metrics) or 'nothing'}); report every name in [objective] metrics")
        if not hasattr(model, "state_dict"):
            raise TypeError(f"on_epoch needs the model as its third argument, got {type(model).__name__}")
        values: dict[str, float] = {}
        for name, value in metrics.items():
            try:
                values[name] = float(value)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError(f"metric {name!r} at epoch {epoch} is not a number: {value!r}") from exc
        stop = self.forward(epoch, values, _EpochState(model))
        self.next_epoch = epoch + 1
        return bool(stop) or self.next_epoch >= self.max_epochs


def load_train_function(reference: str) -> TrainFunction:
    """Import ``file.py:function`` or ``package.module:function``; every way it can fail is a CustomLoopError."""
    where, _, name = reference.rpartition(":")
    try:
        module = _import_file(Path(where)) if where.endswith(".py") else importlib.import_module(where)
    except CustomLoopError:
        raise
    except Exception as exc:
        first = first_line(exc)
        if where.endswith(".py"):
            hint = f"fix that file; `python {where}` shows the whole traceback"
        elif isinstance(exc, ModuleNotFoundError) and exc.name == where.split(".")[0]:
            hint = "check the spelling, and that the package is installed in the environment hpo runs in"
        else:
            hint = f"fix that module; `python -c 'import {where}'` shows the whole traceback"
        raise CustomLoopError(f"[objective] train = {reference!r}: importing {where!r} failed with "
                              f"{type(exc).__name__}: {first}; {hint}.") from exc
    function = getattr(module, name, None)
    if function is None:
        found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise CustomLoopError(f"[objective] train = {reference!r}: {where!r} has no {name!r}; functions there: "
                              f"{', '.join(found) or 'none'}. Fix the name after the colon.")
    if not callable(function):
        raise CustomLoopError(f"[objective] train = {reference!r}: {name!r} is not a function (it is of type "
                              f"{type(function).__name__}); name a function train(config, on_epoch) that returns "
                              "the model.")
    try:
        inspect.signature(function).bind(None, None)
    except TypeError as exc:
        raise CustomLoopError(f"[objective] train = {reference!r}: {name!r} cannot be called as "
                              f"{name}(config, on_epoch) ({exc}); give it exactly those two parameters.") from exc
    except ValueError:  # no signature to inspect (a builtin): let the call decide
        pass
    return function


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise CustomLoopError(f"[objective] train: the file {str(path)!r} does not exist. A relative path is "
                              "read from the study file's folder; check the name, or give an absolute path.")
    return import_file(path)


class CustomObjective(CustomSpec):
    """Run the user's training function with the sampled hyperparameters; value = the study metric. Its settings
    model, tunable names and metrics are ``CustomSpec``'s (objectives/spec.py)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config: CustomConfig = settings.objective
        self.ctx: StudyContext | None = None
        self._train: TrainFunction | None = None

    @classmethod
    def neutral_keys(cls, config: CustomConfig) -> set[str]:
        """Only where the function runs; what it is, its seed and its fixed settings change its results."""
        return {"device"}

    def prepare(self) -> None:
        """Import the function and check the device, before any store is created; trains nothing."""
        try:
            resolve_runtime(self.config.device)
        except ValueError as exc:
            raise CustomLoopError(f"[objective] device: {exc}.") from exc
        base = self.config.settings.get("batch_size", REFERENCE_BATCH)
        if self.settings.space.lr_scaling == "linear" and (isinstance(base, bool) or not isinstance(base, int)):
            raise CustomLoopError(f"[objective.settings] batch_size = {base!r}: lr_scaling = 'linear' needs a "
                                  "whole number here (the batch size when it is not sampled).")
        self._train = load_train_function(self.config.train)

    def describe(self) -> str:
        """One line for the start of a run: whose loop runs, what it reports, where."""
        return (f"training function {self.config.train} (your own loop; a retried trial restarts at epoch 0), "
                f"reporting {', '.join(self.config.metrics)}, on {resolve_runtime(self.config.device).device}")

    def attach(self, ctx: StudyContext) -> None:
        """Give the objective the study's stores; done after prepare() so a bad function creates nothing."""
        self.ctx = ctx

    def trial_config(self, params: Mapping[str, Any], trial_number: int) -> TrialConfig:
        base = int(self.config.settings.get("batch_size", REFERENCE_BATCH))
        resolved = resolve(dict(params), self.settings.space.lr_scaling, base)
        return TrialConfig(
            params=MappingProxyType(resolved),
            settings=MappingProxyType(dict(self.config.settings)),
            device=resolve_runtime(self.config.device).device,
            max_epochs=self.settings.study.max_epochs,
            seed=self.config.seed,
            trial_number=trial_number,
        )

    def __call__(self, trial: Any) -> float:
        if self.ctx is None:
            raise RuntimeError("attach(ctx) must be called before the objective runs trials")
        if self._train is None:
            self.prepare()
        assert self._train is not None
        params = suggest(trial, self.settings.space)
        config = self.trial_config(params, trial.number)
        logged = {**config.settings, **config.params, "train": self.config.train, "device": str(config.device),
                  "seed": config.seed}
        with self.ctx.trial(trial, params, logged) as session:
            seed_everything(config.seed)
            hook = EpochHook(session.on_epoch, self.config.metrics, config.max_epochs)
            model = self._train(config, hook)
            if hook.next_epoch == 0:
                raise RuntimeError(f"{self.config.train} returned without calling on_epoch; call "
                                   "on_epoch(epoch, metrics, model) after every epoch")
            if model is not None and not hasattr(model, "state_dict"):
                raise TypeError(f"{self.config.train} returned a {type(model).__name__}; return the trained "
                                "torch.nn.Module (its weights are saved as the trial's checkpoint)")
            checkpoint = {"train": self.config.train, "params": dict(config.params),
                          "settings": dict(config.settings)}
            return session.complete(checkpoint, model=model)

    def test_score(self, checkpoint_path: str) -> dict[str, float]:
        """Empty: hpo knows no test split of the user's data (evaluate the best checkpoint yourself)."""
        return {}

    def load_model(self, checkpoint_path: str) -> tuple[Any, Any]:
        """A custom loop builds its model itself, so hpo cannot rebuild it: no MLflow model, no export."""
        raise ExportUnsupported(
            f"the objective 'custom' ({self.config.train}) cannot rebuild a model from a checkpoint: your training "
            "function builds it, so `hpo export` cannot write an MLflow model for it. The best trial's weights are "
            f"in {checkpoint_path}: build your model and call "
            "model.load_state_dict(torch.load(PATH, weights_only=True)['state_dict'])."
        )
