"""Find objectives by name through the ``hpo.objectives`` entry point group.

This is how ``search/`` runs an objective without importing it: a package declares
``[project.entry-points."hpo.objectives"] cnn = "objectives.objective:CNNObjective"``.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Protocol, cast

from pydantic import BaseModel

from search.errors import HpoError

GROUP = "hpo.objectives"
SPEC_GROUP = "hpo.objective_specs"  # the same names, each an ObjectiveSpec that imports little (load_spec)


class ExportUnsupported(HpoError):
    """The objective cannot rebuild a model from a checkpoint (a user's own training loop): no export."""

    exit_code = 2


class ObjectiveSpec(Protocol):
    """What validating a study file needs of an objective: its settings model, the ``[space]`` names it can tune
    and the metrics it reports. Found by ``load_spec``, which imports no more than these need."""

    config_model: type[BaseModel]

    @classmethod
    def tunable_names(cls, config: Any) -> set[str] | None:
        """The ``[space]`` names this objective reads from its validated config; None = any name (passed through)."""

    @classmethod
    def reported_metrics(cls, config: Any) -> tuple[str, ...]:
        """What the objective reports every epoch; study.metric and early_stopping.monitor must be among them."""


class ObjectivePlugin(ObjectiveSpec, Protocol):
    """What an objective class offers the search machinery: the one thing ``search/`` relies on.

    The search side never imports an objective; it finds the class by name (``load_objective``) and uses
    only these members. Everything about a particular model or data set stays behind them. Optional: trial
    packing's ``pack_key`` and ``open_pack`` (``search.packing.PackingObjective``); without them ``--pack``
    runs the objective's trials one at a time. And ``data_identity()`` (after ``prepare``): a JSON-able dict
    of what the data is beyond the settings (classes, images per split), kept in the study's fingerprint so a
    study resumed on changed data is refused; without it only the settings are compared.
    """

    def __init__(self, settings: Any) -> None: ...

    @classmethod
    def neutral_keys(cls, config: Any) -> set[str]:
        """Config keys whose values do not change what a trial's value means (the device, compilation, caches):
        a study resumes with other values for them. Every other key is in the study's fingerprint, so a run whose
        file changed it (the data, the model, the training recipe) is refused rather than mixed into the study."""

    def prepare(self) -> None:
        """Check and load what trials need (data, the model on two examples); raise an HpoError a user can act on."""

    def describe(self) -> str:
        """One line for the start of a run: what is trained on (and where it lives) and which model."""

    def attach(self, ctx: Any) -> None:
        """Receive the study context (stores, tracker, progress) before the first trial."""

    def __call__(self, trial: Any) -> float: ...

    def test_score(self, checkpoint_path: str) -> dict[str, float]:
        """Metrics of a saved checkpoint on held-out data, scored once for the best trial; {} when there is none."""

    def load_model(self, checkpoint_path: str) -> tuple[Any, Any]:
        """(a torch module taking raw inputs, an example input batch) for MLflow logging and `hpo export`;
        raise ExportUnsupported when the objective cannot rebuild its model."""


def data_identity(objective: Any) -> dict[str, Any] | None:
    """The objective's optional ``data_identity()`` (see ``ObjectivePlugin``), or None without one."""
    method = getattr(objective, "data_identity", None)
    return method() if callable(method) else None


def available() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load_spec(name: str) -> type[ObjectiveSpec]:
    """The objective's ``ObjectiveSpec``: its entry in the group ``SPEC_GROUP`` where it has one (the built-in
    objectives: a module without torch or MLflow, so `hpo status` and the other reading commands validate a study
    file without importing either), else the objective's class itself (another package's objective, or an install
    made before the group existed)."""
    spec = _entry(SPEC_GROUP, name)
    return cast("type[ObjectiveSpec]", spec) if spec is not None else load_objective(name)


def load_objective(name: str) -> type[ObjectivePlugin]:
    objective = _entry(GROUP, name)
    if objective is not None:
        return cast("type[ObjectivePlugin]", objective)
    names = ", ".join(available()) or "none (is the package installed? run `make run` or `pip install -e .`)"
    raise LookupError(f"unknown objective {name!r}; available: {names}")


def _entry(group: str, name: str) -> Any:
    """What the entry point ``name`` of ``group`` names, loaded; None if the group has no such name."""
    for ep in entry_points(group=group):
        if ep.name == name:
            return ep.load()
    return None
