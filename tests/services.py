"""Services a few tests need and a fresh machine may lack: a PostgreSQL server, a browser.

Where one is missing those tests skip and say why, so `make test` works on a user's machine. On CI (the ``CI``
environment variable set, as `.ci/run` and CI services do) the same skip is a failure: a required service that
is missing is a broken CI, not a reason to go green. Skip sites build their reason with ``missing``;
``pytest_runtest_makereport`` (loaded by tests/conftest.py) turns those skips, and only those, into failures.
A test that needs a CUDA GPU is marked ``gpu``: where there is no CUDA it is deselected, not skipped (the
summary says how many and why), and `bench/gpu_check.sh` runs exactly those tests on a GPU machine.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

MISSING_SERVICE = "required service missing"


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str) -> str:
    """A skip reason that CI turns into a failure."""
    return f"{MISSING_SERVICE}: {reason}"


NO_POSTGRES = missing("no PostgreSQL server: set HPO_TEST_POSTGRES_URL (`.ci/run` sets it when 127.0.0.1:5432 "
                      "answers)")


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda():
        return
    gpu_only = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_only:
        config.hook.pytest_deselected(items=gpu_only)
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]
        config.stash[_GPU_DESELECTED] = len(gpu_only)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if count := config.stash.get(_GPU_DESELECTED, 0):
        terminalreporter.write_line(f"{count} GPU-only test(s) deselected: no CUDA GPU here (bench/gpu_check.sh runs "
                                    "them on a GPU machine)")


_GPU_DESELECTED = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A pytest-xdist worker hands its count to the controller, which prints the summary (`make test`)."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["gpu_deselected"] = session.config.stash.get(_GPU_DESELECTED, 0)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: absent without it
def pytest_testnodedown(node: Any, error: Any) -> None:
    count = int(getattr(node, "workeroutput", {}).get("gpu_deselected", 0))  # every worker collects every test
    node.config.stash[_GPU_DESELECTED] = max(node.config.stash.get(_GPU_DESELECTED, 0), count)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, Any]:
    report = yield
    reason = str(report.longrepr[2]) if report.skipped and isinstance(report.longrepr, tuple) else ""
    if MISSING_SERVICE in reason and on_ci():
        report.outcome = "failed"
        report.longrepr = (f"CI is set (CI={os.environ['CI']!r}), so a missing service fails this test instead of "
                           f"skipping it. {reason.removeprefix('Skipped: ')}")
    return report
