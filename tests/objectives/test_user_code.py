"""A user's file imported once per version, able to import its neighbours, leaving nothing behind on failure."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from objectives.user_code import import_file


def test_imported_once_per_version_with_its_folder_on_the_path(tmp_path: Path) -> None:
    (tmp_path / "helpers_for_test_user_code.py").write_text("WIDTH = 7\n")
    path = tmp_path / "models.py"
    path.write_text("from helpers_for_test_user_code import WIDTH\nVALUE = WIDTH\n")
    first = import_file(path)
    assert first.VALUE == 7 and import_file(path) is first  # a second trial reuses the module
    assert sys.modules[first.__name__] is first
    path.write_text("VALUE = 8\n")
    os.utime(path, ns=(1, 1))  # a changed file (new mtime) is imported again
    assert import_file(path).VALUE == 8


def test_a_file_that_fails_to_import_leaves_no_module(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('top-level failure')\n")
    before = set(sys.modules)
    with pytest.raises(RuntimeError, match="top-level failure"):
        import_file(path)
    assert set(sys.modules) - before == set()
