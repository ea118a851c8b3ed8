"""A smoke run of bench/many_workers.py (4 light workers, direct and through `hpo storage-proxy`): the bench
works end to end and its figures come from a run that kept the budget exact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.benches import run_bench


@pytest.mark.slow
def test_many_workers_bench_smoke_run_keeps_the_budget_exact(tmp_path: Path) -> None:
    if not os.environ.get("HPO_TEST_POSTGRES_URL"):
        pytest.skip("no PostgreSQL server: set HPO_TEST_POSTGRES_URL (`.ci/run` sets it when 127.0.0.1:5432 answers)")
    pytest.importorskip("grpc", reason="grpcio is not installed (pip install 'hpo-service[grpc]')")
    out = tmp_path / "many.json"
    stdout = run_bench("many_workers.py", "--workers", "4", "--trials", "12", "--json", str(out), timeout=600)
    results = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["workers"]) for r in results] == [("direct", 4), ("proxy", 4)]
    for r in results:
        assert r["finished"] == 12 and r["running"] == 0 and r["exact"] and not r["worker_errors"], r
        assert r["ran_by_workers"] == 12  # every finished trial was started by one of the workers, none extra
    assert "| direct | 4 |" in stdout and "| proxy | 4 |" in stdout
