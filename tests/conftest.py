"""Suite-wide hooks (tests/services.py): on CI a test skipped for a missing service (PostgreSQL, a browser)
fails; a test marked ``gpu`` is deselected where there is no CUDA GPU. And the fixtures several packages use."""

from collections.abc import Iterator

import optuna
import pytest

from tests.services import (  # noqa: F401  (hooks: pytest finds them here)
    pytest_collection_modifyitems,
    pytest_runtest_makereport,
    pytest_sessionfinish,
    pytest_terminal_summary,
    pytest_testnodedown,
)


@pytest.fixture
def quiet_optuna() -> Iterator[None]:
    """Optuna's INFO lines (one per trial) off for a test, and its verbosity as it was afterwards. Modules whose
    every test makes studies use it with ``pytestmark = pytest.mark.usefixtures("quiet_optuna")``."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)
