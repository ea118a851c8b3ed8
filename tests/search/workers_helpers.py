"""Shared helpers for the worker and recovery tests: commands, stores, a throwaway PostgreSQL database."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.services import NO_POSTGRES

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "studies" / "quickstart.toml"
POSTGRES_URL = os.environ.get("HPO_TEST_POSTGRES_URL")


def hpo_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "search.cli", *args]


def hpo(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(hpo_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def load(root: Path, name: str) -> tuple[optuna.Study, MlflowClient]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'optuna.db'}")
    return study, MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def child_runs(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=5000)
    return [r for r in runs if r.data.tags.get("hpo.role") != "study"]


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the test server, dropped afterwards."""
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    import sqlalchemy

    name = f"hpo_test_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class InThread:
    """``call()`` started on a thread of its own, for a storage call that must wait on another session's lock;
    once the thread ended, ``outcome`` is what the call returned or raised."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.outcome: Any = None
        self.thread = threading.Thread(target=self._run, args=(call,))
        self.thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.outcome = call()
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            self.outcome = exc
