"""Errors a user can act on. The CLI prints their message (no traceback) and exits 2 or 1."""


class HpoError(Exception):
    """Base class: the message is one paragraph saying what was wrong and what to do."""

    exit_code = 1


class SettingsError(HpoError):
    """The study file or a --set override is invalid. Nothing has been created."""

    exit_code = 2


class StorageError(HpoError):
    """The Optuna storage cannot be opened or disagrees with the study file."""

    exit_code = 2


class TrackingError(HpoError):
    """The MLflow tracking store cannot be reached."""

    exit_code = 2


def first_line(exc: BaseException, empty: str | None = None) -> str:
    """The first line of an exception's message, what a one-paragraph error quotes; for an exception without a
    message, ``empty`` (by default its type's name)."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if empty is None else empty


def cannot_listen(host: str, port: int, exc: OSError) -> HpoError:
    """`hpo dashboard` and `hpo ui` on a port they cannot bind: one paragraph, the same for both."""
    return HpoError(f"cannot listen on {host}:{port}: {exc.strerror or exc}. Another program may use the port; "
                    "pass --port N (and --host ADDRESS to listen elsewhere than 127.0.0.1).")
