"""The one cache folder (search/cache.py) that the empty MLflow store, the digits split and image folders share."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.cache import cache_home


def test_the_cache_folder_is_hpo_cache_dir_else_xdg_cache_home_else_home(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    home = Path.home() / ".cache" / "hpo"
    for xdg, own, expected in ((None, None, home), ("xdg", None, tmp_path / "xdg" / "hpo"),
                               ("xdg", "own", tmp_path / "own"), (None, "own", tmp_path / "own")):
        for name, value in (("XDG_CACHE_HOME", xdg), ("HPO_CACHE_DIR", own)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, str(tmp_path / value))
        assert cache_home() == expected
