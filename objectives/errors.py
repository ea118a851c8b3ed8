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


class BadDataError(Exception):
    """The data is there but unusable (no classes, a corrupt image, mismatched arrays); the message names
    the file or folder and what to do."""


class ModelError(Exception):
    """The configured model cannot be built or does not map (N, C, H, W) images to (N, num_classes) logits;
    the message names the model and shows the shapes."""


class DeviceUnavailable(ValueError):
    """The config asks for an accelerator (cuda, mps) that torch does not see; the message says what to use."""
