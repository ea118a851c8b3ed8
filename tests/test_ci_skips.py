"""tests/services.py's hook, run by a real pytest on a generated test file: with CI set, a skip for a missing
service is a failure; without it, a skip with its reason; other skips (a GPU) stay skips either way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SAMPLE = '''
import pytest
from tests.services import NO_POSTGRES, missing

def test_needs_postgres():
    pytest.skip(NO_POSTGRES)

@pytest.mark.skipif(True, reason=missing("no browser: /usr/bin/chromium is missing"))
def test_needs_a_browser():
    pass

@pytest.mark.skipif(True, reason="needs CUDA")
def test_needs_a_gpu():
    pass

def test_plain():
    assert True
'''


def run_sample(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # its own rootdir: the suite's conftest is not loaded
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(REPO)
    if ci is not None:
        env["CI"] = ci
    command = [sys.executable, "-m", "pytest", "-p", "tests.services", "-p", "no:cacheprovider", "-rA", "-q",
               "test_sample.py"]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", [None, "false"])
def test_without_ci_a_missing_service_skips_with_its_reason(tmp_path: Path, ci: str | None) -> None:
    out = run_sample(tmp_path, ci)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed, 3 skipped" in out.stdout
    assert "SKIPPED [1] test_sample.py:6: required service missing: no PostgreSQL server: set HPO_TEST_POSTGRES_URL" \
        in out.stdout
    assert "required service missing: no browser: /usr/bin/chromium is missing" in out.stdout
    assert "needs CUDA" in out.stdout


@pytest.mark.parametrize("ci", ["true", "1"])
def test_on_ci_a_missing_service_fails_and_other_skips_stay(tmp_path: Path, ci: str) -> None:
    out = run_sample(tmp_path, ci)
    assert out.returncode == 1, out.stdout + out.stderr
    # pytest.skip() in the test body: a failed test; a skipif mark (decided in setup): an error. Both fail the run.
    assert "FAILED test_sample.py::test_needs_postgres" in out.stdout
    assert "ERROR test_sample.py::test_needs_a_browser" in out.stdout
    assert "1 failed, 1 passed, 1 skipped, 1 error" in out.stdout
    assert "SKIPPED [1] test_sample.py:12: needs CUDA" in out.stdout
    assert f"CI is set (CI={ci!r}), so a missing service fails this test instead of skipping it." in out.stdout
    assert "no PostgreSQL server: set HPO_TEST_POSTGRES_URL" in out.stdout
