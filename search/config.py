"""Study settings: one TOML file, validated once into frozen, typed objects.

Everything downstream trusts these objects, so every check a user can fail lives here and reports the
file, the key and what is allowed. The ``[objective]`` section is validated by the objective's own model
(found through the ``hpo.objectives`` entry point group), which keeps this module free of any particular
objective.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from search.early_stopping import EarlyStopping
from search.errors import SettingsError
from search.plugins import load_objective, load_spec
from search.pruning import PRUNERS
from search.samplers import SAMPLERS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class Section(BaseModel):
    """Base of every settings section: frozen, strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class StudySection(Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    direction: Literal["minimize", "maximize"] = "maximize"
    metric: str = "val_accuracy"
    n_trials: int | None = Field(default=20, ge=1)
    timeout: float | None = Field(default=None, gt=0)
    max_epochs: int = Field(default=20, ge=1)
    max_failures: int = Field(default=5, ge=1)
    trial_timeout: float | None = Field(default=None, gt=0)
    checkpoint_every: int = Field(default=1, ge=0)
    checkpoint_every_seconds: float = Field(
        default=30.0, ge=0,
        description="last.pt is written at most this often (seconds of training since the last write); 0: every "
        "checkpoint_every epochs. Short epochs then cost nothing; a crash loses at most this much training.",
    )
    heartbeat_interval: int = Field(default=10, ge=1)
    pack: int = Field(
        default=1, ge=1, le=64,
        description="Trials trained together as one packed model (trial packing; objectives that cannot pack run "
        "them one at a time); 1: one trial at a time. See README 'Trial packing'.",
    )
    grace_period: int | None = Field(default=None, ge=1)
    storage_retry_seconds: float = Field(
        default=60.0, ge=0,
        description="how long a worker retries a database storage call that fails on a lost connection (a "
        "database restart, a network blip) before it stops with an error; 0: no retry.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_budget(cls, data: Any) -> Any:
        """20 trials unless the file gives a budget; a timeout alone means "as many trials as fit"."""
        if isinstance(data, Mapping) and "n_trials" not in data:
            data = {**data, "n_trials": None if data.get("timeout") is not None else 20}
        return data

    @model_validator(mode="after")
    def _some_budget(self) -> StudySection:
        if self.n_trials is None and self.timeout is None:
            raise ValueError("set n_trials, timeout or both; a study without a budget never ends")
        if self.grace_period is not None and self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"grace_period ({self.grace_period}) must exceed heartbeat_interval ({self.heartbeat_interval}), "
                "or live trials would be failed as stale; leave it out for 6 x heartbeat_interval"
            )
        return self

    @property
    def stale_after(self) -> int:
        return self.grace_period or 6 * self.heartbeat_interval


SAMPLER_OPTIONS: dict[str, frozenset[str]] = {name: kind.options for name, kind in SAMPLERS.items()}


class SamplerSection(Section):
    name: str = "tpe"
    seed: int | None = 0
    n_startup_trials: int | None = Field(default=None, ge=0)
    multivariate: bool | None = None

    @field_validator("name")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        return _known(value, SAMPLERS, "sampler")

    @model_validator(mode="after")
    def _options_fit_sampler(self) -> SamplerSection:
        _check_options(self, SAMPLER_OPTIONS[self.name], f"sampler {self.name!r}")
        return self


PRUNER_OPTIONS: dict[str, frozenset[str]] = {name: kind.options for name, kind in PRUNERS.items()}


class PrunerSection(Section):
    name: str = "median"
    n_startup_trials: int | None = Field(default=None, ge=0)
    n_warmup_steps: int | None = Field(default=None, ge=0)
    interval_steps: int | None = Field(default=None, ge=1)
    n_min_trials: int | None = Field(default=None, ge=1)
    percentile: float | None = Field(default=None, ge=0, le=100)
    min_resource: int | Literal["auto"] | None = None
    max_resource: int | Literal["auto"] | None = None
    reduction_factor: int | None = Field(default=None, ge=2)
    min_early_stopping_rate: int | None = Field(default=None, ge=0)
    bootstrap_count: int | None = Field(default=None, ge=0)
    lower: float | None = None
    upper: float | None = None
    wrapped: Literal["median", "percentile", "none"] | None = None
    patience: int | None = Field(default=None, ge=0)
    min_delta: float | None = Field(default=None, ge=0)
    p_threshold: float | None = Field(default=None, gt=0, lt=1)
    n_startup_steps: int | None = Field(default=None, ge=0)

    @field_validator("name")
    @classmethod
    def _known_pruner(cls, value: str) -> str:
        return _known(value, PRUNERS, "pruner")

    @model_validator(mode="after")
    def _options_fit_pruner(self) -> PrunerSection:
        _check_options(self, PRUNER_OPTIONS[self.name], f"pruner {self.name!r}")
        if self.name == "threshold" and self.lower is None and self.upper is None:
            raise ValueError("pruner 'threshold' needs lower, upper or both")
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError(f"lower ({self.lower}) must not exceed upper ({self.upper})")
        for key in ("min_resource", "max_resource"):
            value = getattr(self, key)
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{key} must be a whole number of epochs >= 1 or 'auto', got {value}")
        if self.name == "hyperband" and self.min_resource == "auto":
            raise ValueError("pruner 'hyperband' needs min_resource as a whole number of epochs >= 1, not 'auto'")
        if self.name == "patient" and self.patience is None:
            raise ValueError("pruner 'patient' needs patience (epochs without improvement before pruning)")
        return self


class EarlyStoppingSection(Section):
    enabled: bool = True
    monitor: str | dict[str, float] | None = None
    mode: Literal["min", "max"] | None = None
    patience: int = Field(default=5, ge=1)
    min_delta: float = Field(default=0.0, ge=0)
    smoothing: float = Field(default=0.0, ge=0, lt=1)
    stopping_threshold: float | None = None
    divergence_threshold: float | None = None
    check_finite: bool = True
    restore_best: bool = True
    adaptive_patience: bool = False
    min_patience: int | None = Field(default=None, ge=1)
    max_patience: int | None = Field(default=None, ge=1)

    @field_validator("monitor")
    @classmethod
    def _weights_usable(cls, v: str | dict[str, float] | None) -> str | dict[str, float] | None:
        if isinstance(v, dict):
            if not v:
                raise ValueError("a weighted monitor needs at least one metric, e.g. {val_accuracy = 1.0}")
            bad = [k for k, w in v.items() if not math.isfinite(w)]
            if bad:
                raise ValueError(f"weights must be finite numbers; check {bad}")
        return v


class ParamSpec(Section):
    """One hyperparameter: a float or int range, or a list of choices."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(default=None, gt=0)
    choices: list[int | float | str | bool] | None = None
    grid: list[int | float | str | bool] | None = None

    @model_validator(mode="after")
    def _range_possible(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical parameters need a non-empty 'choices' list")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("categorical parameters take 'choices' only, not low/high/log/step")
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ValueError(f"choices must be distinct, got {self.choices}")
            outside = [g for g in self.grid or [] if g not in self.choices]
            if outside:
                raise ValueError(f"grid values {outside} are not among the choices {self.choices}")
            return self
        if self.choices is not None:
            raise ValueError(f"'choices' is for categorical parameters; a {self.type} takes low and high")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs both low and high")
        if self.low >= self.high:
            raise ValueError(f"low must be < high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, got low={self.low}")
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined (Optuna samples log ranges continuously)")
        if self.type == "int":
            for key in ("low", "high", "step"):
                value = getattr(self, key)
                if value is not None and float(value) != int(value):
                    raise ValueError(f"an int parameter needs whole numbers, got {key}={value}")
        for value in self.grid or []:
            if isinstance(value, bool) or not isinstance(value, int | float) or not self.low <= value <= self.high:
                raise ValueError(f"grid value {value!r} is not a number within [low, high] = [{self.low}, {self.high}]")
            if self.type == "int" and float(value) != int(value):
                raise ValueError(f"an int parameter needs whole numbers, got grid value {value}")
        return self

    def grid_values(self) -> list[Any] | None:
        """Values the grid sampler walks: explicit grid, the choices, or a stepped int range."""
        if self.grid:
            return list(self.grid)
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int" and not self.log:
            step = int(self.step or 1)
            return list(range(int(self.low or 0), int(self.high or 0) + 1, step))
        return None


class SpaceSection(Section):
    """The search space: ``[space.<name>]`` tables plus the reserved key ``lr_scaling``."""

    lr_scaling: Literal["none", "linear"] = "none"
    params: dict[str, ParamSpec] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split_params(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "params" not in data:
            data = dict(data)
            scaling = data.pop("lr_scaling", "none")
            return {"lr_scaling": scaling, "params": data}
        return data

    @model_validator(mode="after")
    def _scaling_has_lr(self) -> SpaceSection:
        if self.lr_scaling == "linear" and "lr" not in self.params:
            raise ValueError("lr_scaling = 'linear' scales the sampled 'lr', but the space has no [space.lr]")
        return self


class Settings(Section):
    """A whole study file after validation."""

    study: StudySection
    sampler: SamplerSection = Field(default_factory=SamplerSection)
    pruner: PrunerSection = Field(default_factory=PrunerSection)
    early_stopping: EarlyStoppingSection = Field(default_factory=EarlyStoppingSection)
    space: SpaceSection = Field(default_factory=SpaceSection)
    objective: Any
    objective_name: str = "cnn"
    source: str = ""

    @property
    def monitor(self) -> str | dict[str, float]:
        return self.early_stopping.monitor or self.study.metric

    @property
    def monitor_mode(self) -> str:
        if self.early_stopping.mode:
            return self.early_stopping.mode
        if self.early_stopping.monitor in (None, self.study.metric):
            return "max" if self.study.direction == "maximize" else "min"
        monitor = self.early_stopping.monitor
        return "min" if isinstance(monitor, str) and monitor.endswith("loss") else "max"

    def early_stopping_kwargs(self) -> dict[str, Any]:
        """Arguments for ``EarlyStopping``; when disabled it still tracks the best epoch but never stops."""
        es = self.early_stopping
        base = {"monitor": self.monitor, "mode": self.monitor_mode, "restore_best": es.restore_best}
        if not es.enabled:
            return {**base, "patience": 10**9, "check_finite": False}
        return {
            **base, "patience": es.patience, "min_delta": es.min_delta, "smoothing": es.smoothing,
            "stopping_threshold": es.stopping_threshold, "divergence_threshold": es.divergence_threshold,
            "check_finite": es.check_finite, "adaptive_patience": es.adaptive_patience,
            "min_patience": es.min_patience, "max_patience": es.max_patience,
        }

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between runs of one study, or old and new trials would not be comparable: direction,
        metric, the space, and the objective's settings (data, model, training recipe). Left out of those: the keys
        the space tunes (the file's value is only a default) and those the objective calls neutral (the device...)."""
        left_out = load_objective(self.objective_name).neutral_keys(self.objective) | set(self.space.params)
        config = self.objective.model_dump(mode="json")
        return {
            "direction": self.study.direction,
            "metric": self.study.metric,
            "space": {k: v.model_dump(exclude_none=True) for k, v in self.space.params.items()},
            "lr_scaling": self.space.lr_scaling,
            "objective_name": self.objective_name,
            "objective": {k: v for k, v in sorted(config.items()) if k not in left_out},
        }


def _known(value: str, table: Mapping[str, Any], kind: str) -> str:
    if value not in table:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(repr(k) for k in table)}")
    return value


def _check_options(section: BaseModel, allowed: frozenset[str], owner: str) -> None:
    given = {k for k in section.model_fields_set if k not in ("name",) and getattr(section, k) is not None}
    extra = sorted(given - allowed)
    if extra:
        allowed_text = ", ".join(sorted(allowed)) or "no options"
        raise ValueError(f"{', '.join(extra)} not used by {owner}; it takes {allowed_text}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value); the value is read as TOML, else a string.

    ``section={...}`` (a TOML inline table) replaces a whole section, e.g. ``--set "pruner={name='none'}"``
    (``--set pruner.name=none`` does too, see ``drop_options_of_old_choice``).
    """
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if any(not p for p in path) and key.strip():  # `study..name`, `.study.name`: a typo, not study.name
        path = []
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if not sep or not path or (len(path) < 2 and not isinstance(value, dict)):
        raise SettingsError(
            f"--set {text!r}: expected section.key=value, for example --set study.n_trials=5 "
            "or --set space.lr.high=0.1, or section={...} to replace a section: --set \"pruner={name='none'}\""
        )
    return path, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SettingsError(f"--set {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


PROJECT_STUDIES = Path(__file__).resolve().parents[1] / "studies"  # the example study files, in a clone


def study_files() -> dict[str, Path]:
    """The study files a bare name stands for (``quickstart``): ./studies/*.toml, then the project's own
    studies/ folder (beside search/ in a clone), so the examples run by name from any folder."""
    found: dict[str, Path] = {}
    for folder in (Path("studies"), PROJECT_STUDIES):
        for file in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            found.setdefault(file.stem, file)
    return found


def find_study_file(name: str) -> str:
    """The study file a command names: the path as given when it exists or looks like a path (a folder or a
    suffix in it), else the study file of that name (``study_files``), else the name unchanged, which then
    fails with the names there are."""
    path = Path(name)
    if path.exists() or path.suffix or "/" in name or os.sep in name:
        return name
    found = study_files().get(name)
    return str(found) if found is not None else name


def drop_options_of_old_choice(data: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    """``--set pruner.name=hyperband`` on a file written for the median pruner: drop the file's pruner (or
    sampler) options the new one does not take, instead of refusing the run for them; options given with --set
    stay, so a wrong one is still an error. Returns one note per section changed, for the user."""
    named = {path[0]: value for path, value in map(parse_override, overrides)
             if len(path) == 2 and path[1] == "name" and path[0] in ("pruner", "sampler")}
    given = {tuple(path[:2]) for path, _ in map(parse_override, overrides)}
    notes = []
    for section, name in named.items():
        table, options = data.get(section), (PRUNER_OPTIONS if section == "pruner" else SAMPLER_OPTIONS).get(name)
        if not isinstance(table, dict) or options is None:
            continue  # an unknown name is reported by validation
        dropped = [k for k in table if k != "name" and k not in options and (section, k) not in given]
        for key in dropped:
            del table[key]
        if dropped:
            notes.append(f"--set {section}.name={name}: the study file's {section} options {', '.join(dropped)} "
                         f"do not apply to {name!r} and were left out")
    return notes


def load_settings(path: str | Path, overrides: Sequence[str] = ()) -> Settings:
    """Read, override and validate a study file; raise SettingsError naming the file and key."""
    path = Path(path)
    data = apply_overrides(read_study(path), overrides)
    for note in drop_options_of_old_choice(data, overrides):
        logging.getLogger("hpo").warning("note: %s", note)
    _check_override_types(data, overrides, str(path))
    return settings_from_dict(data, source=str(path), base_dir=path.resolve().parent)


def read_study(path: Path) -> dict[str, Any]:
    """The study file's TOML as a dict (see read_study_text for every way it is refused)."""
    return tomllib.loads(read_study_text(path))


def read_study_text(path: Path) -> str:
    """The study file as text that parses as TOML; every way it can fail is one SettingsError naming the file."""
    if path.is_dir():
        raise SettingsError(f"{path} is a folder, not a study file. Pass the path of a TOML study file inside it, "
                            "for example studies/quickstart.toml.")
    if not path.is_file():
        found = study_files()
        example = "quickstart" if "quickstart" in found else next(iter(found), "")
        known = (f", or the name of one of these: {', '.join(found)} (`hpo run {example}` runs {found[example]})"
                 if found else "")
        raise SettingsError(
            f"study file {str(path)!r} does not exist. Pass the path of a TOML study file, "
            f"for example studies/quickstart.toml{known}."
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # TOML is UTF-8; a BOM some editors add is harmless
    except UnicodeDecodeError as exc:
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
            what, fix = "saved as UTF-16", "Save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8 FILE > NEW.toml)"
        else:
            what = f"not text (byte {raw[exc.start]:#04x} at offset {exc.start} is not UTF-8)"
            fix = "Check that you passed the right file, or save it as UTF-8"
        raise SettingsError(f"{path}: {what}, but a study file is TOML in UTF-8. {fix}.") from exc
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML ({exc}). Fix the syntax at that line and run again.") from exc
    return text


def _check_override_types(data: Mapping[str, Any], overrides: Sequence[str], source: str) -> None:
    """A --set value must have the key's own type: pydantic would read ``enabled=1`` or ``enabled=yes`` as true,
    ``timeout=true`` as 1 second and ``max_epochs=1e3`` as 1000, silently. Files are left to pydantic."""
    objective = data.get("objective")
    name = objective.get("name", "cnn") if isinstance(objective, Mapping) else "cnn"
    try:
        objective_model = load_spec(str(name)).config_model
    except LookupError:
        objective_model = None  # settings_from_dict reports the unknown objective
    for text in overrides:
        path, value = parse_override(text)
        for where, leaf in _leaves(path, value):
            annotation = _annotation_at(where, objective_model)
            expected = _type_mismatch(annotation, leaf)
            if expected:
                key, kind = ".".join(where), _KINDS.get(type(leaf), type(leaf).__name__)
                raise SettingsError(
                    f"{source}: --set {text!r}: {key} takes {expected}, not {json.dumps(leaf, default=str)} "
                    f"({kind}), which would be read as something you did not mean. Write it as that type, for example "
                    f"--set {key}={_example(expected)}."
                )


def _leaves(path: list[str], value: Any) -> list[tuple[list[str], Any]]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves([*path, str(k)], v)]
    return [(path, value)]


def _annotation_at(path: list[str], objective_model: Any) -> Any:
    """The type annotation of the key at ``path`` (None when unknown: validation reports unknown keys)."""
    current: Any = objective_model if path[0] == "objective" else Settings
    parts = path[1:] if path[0] == "objective" else path
    for i, part in enumerate(parts):
        if current is SpaceSection and part != "lr_scaling":
            current = ParamSpec
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        current = current.model_fields[part].annotation
        if i < len(parts) - 1 and not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
    return current


def _type_mismatch(annotation: Any, value: Any) -> str | None:
    """What ``annotation`` takes, when ``value`` is a scalar of none of its scalar types; else None."""
    import types
    import typing

    if annotation is None:
        return None
    arms = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    checks = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str)}
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a quoted string"}
    scalars = [a for a in arms if a in checks]
    if value is None or len(scalars) != len([a for a in arms if a is not type(None)]):
        return None  # an arm this check does not know (Literal, list, path, model): pydantic decides
    if any(checks[a](value) for a in scalars):
        return None
    return " or ".join(names[a] for a in scalars)


_KINDS = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
          dict: "a table"}


def _example(expected: str) -> str:
    first = expected.split(" or ")[0] if expected.startswith("a ") else expected
    return {"true or false": "true", "a whole number": "5", "a number": "0.5"}.get(first, '"x"')


def settings_from_dict(data: Mapping[str, Any], source: str = "<settings>", base_dir: Path | None = None) -> Settings:
    """Validate a study's data; relative paths in ``[objective]`` are resolved against ``base_dir``
    (the study file's folder) when given."""
    data = dict(data)
    objective_raw = data.pop("objective", None)
    if not isinstance(objective_raw, Mapping):
        raise SettingsError(f"{source}: missing [objective] section; add one with name = \"cnn\".")
    objective_raw = dict(objective_raw)
    plugin_name = objective_raw.pop("name", "cnn")
    try:
        plugin = load_spec(plugin_name)
    except LookupError as exc:
        raise SettingsError(f"{source}: [objective] name: {exc}") from exc
    try:
        context = {"base_dir": base_dir} if base_dir is not None else None
        objective = plugin.config_model.model_validate(objective_raw, context=context)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, source, ("objective",), plugin.config_model)) from exc
    # The plugin says which [space] names it reads (None: any, handed to the objective as they are) and which
    # metrics it reports. Names first: a misspelt one (`--set space.lrr.low=1`) is that, not "type missing".
    fields = plugin.tunable_names(objective)
    space = data.get("space")
    params = space.get("params") if isinstance(space, Mapping) and "params" in space else space  # stored settings
    names = {k for k, v in params.items() if isinstance(v, Mapping)} if isinstance(params, Mapping) else set()
    if fields is not None and (unknown := sorted(names - fields)):
        raise SettingsError(
            f"{source}: [space] {', '.join(unknown)}: not a setting of objective {plugin_name!r} that a trial's "
            "result depends on (a misspelt name, or one that only says how trials run, such as the device), so "
            f"sampling it would change nothing. Tunable names are: {', '.join(sorted(fields))}."
        )
    try:
        settings = Settings.model_validate(
            {**data, "objective": objective, "objective_name": plugin_name, "source": source}
        )
    except ValidationError as exc:
        raise SettingsError(_describe(exc, source, (), Settings)) from exc
    probed = settings.space.params if fields is not None else {}  # ranges are the objective's to check
    for pname, spec in probed.items():
        bounds = [v for v in (spec.low, spec.high) if v is not None]  # a range has both (validated above)
        probes = [*(spec.choices or bounds), *(spec.grid or [])]
        for value in probes:
            value = int(value) if spec.type == "int" else value
            try:
                plugin.config_model.model_validate({**objective_raw, pname: value})
            except ValidationError as exc:
                reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
                raise SettingsError(
                    f"{source}: [space.{pname}] can yield {value!r}, which the objective refuses for {pname}: "
                    f"{reason}. Narrow the range or the choices."
                ) from exc
    reported = plugin.reported_metrics(objective)
    monitored = settings.monitor if isinstance(settings.monitor, dict) else {settings.monitor: 1.0}
    for where, name in [("study.metric", settings.study.metric)] + [("early_stopping.monitor", m) for m in monitored]:
        if reported and name not in reported:
            raise SettingsError(
                f"{source}: {where} = {name!r} is not a metric the objective reports; choose one of "
                f"{', '.join(reported)}."
            )
    try:
        EarlyStopping(**settings.early_stopping_kwargs())
    except ValueError as exc:
        raise SettingsError(f"{source}: [early_stopping] {exc}") from exc
    if settings.sampler.name == "grid":
        missing = [n for n, p in settings.space.params.items() if p.grid_values() is None]
        if missing:
            raise SettingsError(
                f"{source}: [sampler] name = 'grid' needs a finite set of values for every parameter; "
                f"add grid = [...] to [space.{missing[0]}] (also: {', '.join(missing[1:]) or 'none'})."
            )
    return settings


def _describe(exc: ValidationError, source: str, prefix: tuple[str, ...], model: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in (*prefix, *err["loc"]) if p != "params"]
        where = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, [p for p in err["loc"][:-1] if p != "params"])
            msg = f"unknown key; allowed here: {', '.join(allowed)}" if allowed else "unknown key"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] not in ("value_error", "missing") and "input" in err:
                msg += f" (got {err['input']!r})"
        lines.append(f"  {where}: {msg}")
    return f"{source}: invalid study settings; nothing was created.\n" + "\n".join(lines)


def _allowed_keys(model: type[BaseModel], loc: list[Any]) -> list[str]:
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            if current is SpaceSection:
                current = ParamSpec
                continue
            return []
        current = field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(k for k in current.model_fields if k not in ("params", "source", "objective_name"))
    return []
