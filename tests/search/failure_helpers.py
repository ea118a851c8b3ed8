"""Shared by the failure-path tests: a digits study whose model is tests/search/faulty_model.py, waiting for a
study to reach a state (instead of sleeping a fixed time), and a Ctrl-C landing inside a checkpoint's write."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial

import search.checkpoint as checkpoint
from search.stores import open_storage

FAULTY_MODEL = Path(__file__).with_name("faulty_model.py")

STUDY = """
[study]
name = "{name}"
n_trials = {n_trials}
max_epochs = {max_epochs}
max_failures = {max_failures}
checkpoint_every = {checkpoint_every}
checkpoint_every_seconds = 0

[sampler]
name = "random"
seed = 0

[pruner]
name = "none"

[early_stopping]
enabled = false

[space.lr]
type = "float"
low = 0.003
high = 0.03
log = true

[space.batch_size]
type = "categorical"
choices = [32, 64]

[objective]
name = "cnn"
dataset = "digits"
device = "cpu"
augment = false
model = "{model}:build"
model_args = {{plan = {plan}, log = "{log}"{extra}}}
"""


def faulty_study(folder: Path, name: str, plan: list[str], *, n_trials: int = 2, max_epochs: int = 2,
                 max_failures: int = 5, checkpoint_every: int = 1, at_epoch: int | None = None) -> Path:
    """A study file in ``folder`` whose models follow ``plan`` (see faulty_model.py); its log is folder/model.log."""
    extra = "" if at_epoch is None else f", at_epoch = {at_epoch}"
    path = folder / f"{name}.toml"
    path.write_text(STUDY.format(name=name, n_trials=n_trials, max_epochs=max_epochs, max_failures=max_failures,
                                 checkpoint_every=checkpoint_every, model=FAULTY_MODEL, plan=json.dumps(plan),
                                 log=folder / "model.log", extra=extra))
    return path


def model_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "model.log").read_text().splitlines()]


def wait_for(proc: subprocess.Popen, db: Path, name: str, ready: Callable[[list[FrozenTrial]], bool],
             seconds: float = 240, storage: str | None = None) -> list[FrozenTrial]:
    """Poll the study in the SQLite file ``db`` (or the file of ``storage``) until ``ready(trials)`` holds; fail if
    ``proc`` exits first."""
    deadline = time.monotonic() + seconds
    opened: optuna.storages.BaseStorage | None = None  # opened once: an open per poll cost the workers CPU time
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            try:
                opened = opened or open_storage(storage or f"sqlite:///{db}")
                trials = optuna.load_study(study_name=name, storage=opened).get_trials()
                if ready(trials):
                    return trials
            except KeyError:  # the study is not created yet
                pass
        time.sleep(0.05)
    proc.kill()
    _, err = proc.communicate()
    raise AssertionError(f"the study never reached the state waited for (exit code {proc.returncode}): {err}")


def interrupt_on_write(monkeypatch: pytest.MonkeyPatch, nth: int, interrupt: Any) -> None:
    """save_atomic's file calls ``interrupt`` on its ``nth`` write, as a Ctrl-C landing mid-write does."""
    real = checkpoint.os.fdopen

    class Cut:
        def __init__(self, fh: Any) -> None:
            self.fh, self.writes = fh, 0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.fh, name)

        def __enter__(self) -> Cut:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.fh.__exit__(*exc)

        def write(self, data: bytes) -> int:
            self.writes += 1
            if self.writes == nth:
                interrupt()
            return int(self.fh.write(data))

    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: Cut(real(fd, mode)))
