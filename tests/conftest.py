"""Suite-wide hooks: on CI a test skipped for a missing service (PostgreSQL, a browser) fails (tests/services.py)."""

from tests.services import pytest_runtest_makereport  # noqa: F401  (a hook: pytest finds it here)
