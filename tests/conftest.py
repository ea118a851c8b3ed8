"""Suite-wide hooks (tests/services.py): on CI a test skipped for a missing service (PostgreSQL, a browser)
fails; a test marked ``gpu`` is deselected where there is no CUDA GPU."""

from tests.services import (  # noqa: F401  (hooks: pytest finds them here)
    pytest_collection_modifyitems,
    pytest_runtest_makereport,
    pytest_terminal_summary,
)
