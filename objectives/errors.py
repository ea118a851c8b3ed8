"""Errors the caller is expected to catch and show to a person, not a traceback."""

from __future__ import annotations


class DatasetNotFoundError(Exception):
    """A data set is not on disk and could not be fetched; the message says what to put where.

    `dataset` and `directory` are kept as attributes so a caller can report them without parsing text.
    """

    def __init__(self, message: str, *, dataset: str = "", directory: str = "") -> None:
        super().__init__(message)
        self.dataset = dataset
        self.directory = directory
