"""Find objectives by name through the ``hpo.objectives`` entry point group.

This is how ``search/`` runs an objective without importing it: a package declares
``[project.entry-points."hpo.objectives"] cnn = "objectives.objective:CNNObjective"``.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Protocol

from pydantic import BaseModel

GROUP = "hpo.objectives"


class ObjectivePlugin(Protocol):
    """What an objective class offers the search machinery."""

    config_model: type[BaseModel]

    def __init__(self, settings: Any) -> None: ...

    @classmethod
    def tunable_names(cls, config: Any) -> set[str] | None:
        """The ``[space]`` names this objective reads from its validated config; None = any name (passed through)."""

    @classmethod
    def reported_metrics(cls, config: Any) -> tuple[str, ...]:
        """What the objective reports every epoch; study.metric and early_stopping.monitor must be among them."""

    def prepare(self) -> None:
        """Check and load what trials need (data, the model on two examples); raise an HpoError a user can act on."""

    def describe(self) -> str:
        """One line for the start of a run: what is trained on (and where it lives) and which model."""

    def attach(self, ctx: Any) -> None:
        """Receive the study context (stores, tracker, progress) before the first trial."""

    def __call__(self, trial: Any) -> float: ...

    def test_score(self, checkpoint_path: str) -> dict[str, float]: ...


def available() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load_objective(name: str) -> Any:
    for ep in entry_points(group=GROUP):
        if ep.name == name:
            return ep.load()
    names = ", ".join(available()) or "none (is the package installed? run `make run` or `pip install -e .`)"
    raise LookupError(f"unknown objective {name!r}; available: {names}")
