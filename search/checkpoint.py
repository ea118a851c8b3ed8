"""Checkpoints are one dict of tensors and plain values, written atomically, read with weights_only."""

from __future__ import annotations

import os
import pickle
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from search import interrupts
from search.errors import HpoError, first_line


def save_atomic(obj: dict[str, Any], path: Path) -> Path:
    """Write to a temp file in the same folder, then rename: a reader never sees half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        interrupt = interrupts.cause(exc)
        if interrupt is not exc:  # Ctrl-C mid-write, then the zip writer's own error on closing: the Ctrl-C counts
            raise interrupt from None
        raise
    return path


def load_checkpoint(path: str | Path, key: str = "state_dict") -> dict[str, Any]:
    """Load a checkpoint safely; corrupt files or non-dict payloads get a clear error."""
    path = Path(path)
    if not path.is_file():
        raise HpoError(f"checkpoint {str(path)!r} does not exist. Check the path or rerun the trial that wrote it.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            IndexError, KeyError, AssertionError, struct.error) as exc:
        # Damaged bytes surface as any of these, depending on where the unpickler trips (fuzzed).
        reason = first_line(exc)  # EOFError() has an empty message: its type's name
        raise HpoError(
            f"checkpoint {str(path)!r} is corrupt or holds more than tensors and plain values "
            f"({reason}). It was refused by torch.load(weights_only=True); delete it "
            "and rerun the trial, or load it yourself only if you trust where it came from."
        ) from exc
    if not isinstance(obj, dict) or key not in obj:
        raise HpoError(
            f"checkpoint {str(path)!r} is not a checkpoint of this tool (expected a dict with {key!r}, "
            f"got {type(obj).__name__})."
        )
    return obj
