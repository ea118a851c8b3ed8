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
