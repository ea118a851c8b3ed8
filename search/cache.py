"""The folder where this project keeps what it derives once per machine and shares between runs: the empty
MLflow store (search/tracking.py), the digits split (objectives/data.py), decoded image folders
(objectives/image_folder.py). Imports nothing heavy, so training code may use it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """$HPO_CACHE_DIR, else $XDG_CACHE_HOME/hpo, else ~/.cache/hpo."""
    return Path(os.environ.get("HPO_CACHE_DIR")
                or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hpo")
