"""Objectives found by name: the objective class (``load_objective``) and what validating a study file needs of it
(``load_spec``), which for the built-in objectives imports neither torch nor MLflow."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from search import plugins
from search.plugins import GROUP, SPEC_GROUP, load_objective, load_spec


def test_every_built_in_objective_has_a_spec_that_its_class_is_built_on() -> None:
    names = sorted(ep.name for ep in entry_points(group=GROUP))
    assert names == sorted(ep.name for ep in entry_points(group=SPEC_GROUP)) == ["cnn", "custom"]
    for name in names:
        spec, objective = load_spec(name), load_objective(name)
        assert spec is not objective and issubclass(objective, spec)  # one definition of each member
        assert objective.config_model is spec.config_model


def test_an_objective_without_a_spec_entry_is_its_own_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another package's objective, or an install made before the spec group: the objective class serves."""
    monkeypatch.setattr(plugins, "SPEC_GROUP", "hpo.no_such_group")
    assert load_spec("cnn") is load_objective("cnn")
    with pytest.raises(LookupError, match="unknown objective 'nope'"):
        load_spec("nope")
