"""A seeded study draws each trial from (seed, trial number): a resumed study and several workers never repeat the
first trials' configurations, and a study run again from scratch draws the same ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from search.config import SamplerSection, SpaceSection
from search.samplers import build_sampler, seed_next_trial, trial_seed
from search.space import suggest

SPACE = SpaceSection.model_validate({
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "batch_size": {"type": "categorical", "choices": [32, 64, 128]},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
})
GRID_SPACE = SpaceSection.model_validate({
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True, "grid": [1e-4, 1e-3, 1e-2, 1e-1]},
    "batch_size": {"type": "categorical", "choices": [32, 64, 128]},
})
TPE = SamplerSection(name="tpe", seed=42, n_startup_trials=4)


def _process(url: str, cfg: SamplerSection, space: SpaceSection = SPACE) -> optuna.Study:
    """The study as a new process opens it: a fresh sampler, seeded from the file."""
    return optuna.load_study(study_name="s", storage=url, sampler=build_sampler(cfg, space))


def _trial(study: optuna.Study, cfg: SamplerSection, space: SpaceSection = SPACE,
           tell: bool = True) -> tuple[optuna.Trial, dict[str, Any]]:
    seed_next_trial(study, cfg, space, 1, number=len(study.get_trials(deepcopy=False)))  # as claim_slot does
    trial = study.ask()
    params = suggest(trial, space)
    if tell:
        study.tell(trial, params["dropout"] if "dropout" in params else params["lr"])
    return trial, params


def _new(tmp_path: Path, name: str) -> str:
    url = f"sqlite:///{tmp_path / name}"
    optuna.create_study(study_name="s", storage=url, direction="maximize")
    return url


def test_a_resumed_study_draws_new_configurations_and_a_rerun_the_same(tmp_path: Path) -> None:
    runs = []
    for name in ("a.db", "b.db"):
        url = _new(tmp_path, name)
        first = _process(url, TPE)  # `hpo run --trials 2`
        drawn = [_trial(first, TPE)[1] for _ in range(2)]
        resumed = _process(url, TPE)  # `hpo run --trials 6` later: a new process, same file, same seed
        drawn += [_trial(resumed, TPE)[1] for _ in range(4)]  # trials 2..5: the last 2 of TPE's 4 startup, then TPE
        runs.append(drawn)
    assert len({repr(p) for p in runs[0]}) == 6  # before: trial 2 repeated trial 0's draws and trial 3 trial 1's
    assert runs[0] == runs[1]  # the same file and seed from scratch: the same configurations, trial by trial


def test_two_workers_asking_at_once_draw_different_configurations(tmp_path: Path) -> None:
    url = _new(tmp_path, "w.db")
    one, two = _process(url, TPE), _process(url, TPE)
    drawn = []
    for _ in range(3):  # both hold a running trial before either tells: the worst case for a shared seed
        t1, p1 = _trial(one, TPE, tell=False)
        t2, p2 = _trial(two, TPE, tell=False)
        one.tell(t1, 0.5)
        two.tell(t2, 0.5)
        drawn += [p1, p2]
    assert len({repr(p) for p in drawn}) == 6


@pytest.mark.parametrize("name", ["tpe", "random", "cmaes", "gp", "grid"])
def test_every_seeded_sampler_draws_per_trial(tmp_path: Path, name: str) -> None:
    cfg = SamplerSection(name=name, seed=7)
    space = GRID_SPACE if name == "grid" else SPACE
    url = _new(tmp_path, f"{name}.db")
    drawn = [_trial(_process(url, cfg, space), cfg, space)[1] for _ in range(3)]  # each trial in a new process
    assert len({repr(p) for p in drawn}) == 3


def test_an_unseeded_study_keeps_its_sampler(tmp_path: Path) -> None:
    cfg = SamplerSection(name="tpe", seed=None)
    study = _process(_new(tmp_path, "u.db"), cfg)
    sampler = study.sampler
    seed_next_trial(study, cfg, SPACE, 1, number=0)
    assert study.sampler is sampler


def test_trial_seeds_differ_across_trials_and_study_seeds() -> None:
    seeds = {trial_seed(s, n) for s in range(5) for n in range(5)}
    assert len(seeds) == 25  # seed S+1's trial 0 is not seed S's trial 1 (hpo compare repeats with S, S+1, ...)
    assert trial_seed(42, 3) == trial_seed(42, 3)
