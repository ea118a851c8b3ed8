"""search/errors.py: what a one-paragraph error quotes of an exception."""

from __future__ import annotations

from search.errors import first_line
from search.failures import failure_reason
from search.storage_retry import first_line as driver_line


def test_first_line_is_the_message_s_first_line_or_the_type_s_name() -> None:
    assert first_line(ValueError("  bad value\nsecond line\n")) == "bad value"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError(""), empty="") == ""


def test_a_storage_error_quotes_the_driver_s_cause_and_a_trial_reason_has_no_type_twice() -> None:
    try:
        try:
            raise ConnectionError("server closed the connection unexpectedly\n\tThis probably means ...")
        except ConnectionError as cause:
            raise RuntimeError("(psycopg.OperationalError) wrapped") from cause
    except RuntimeError as exc:
        assert driver_line(exc) == "server closed the connection unexpectedly"
    assert failure_reason(ValueError()) == "error: ValueError: "
    assert failure_reason(ValueError("lr must be positive\ndetails")) == "error: ValueError: lr must be positive"
