"""Importing a user's own Python file (a model factory, a training function), once per version of the file.

Both `model = "file.py:build"` (networks.py) and `[objective] train = "file.py:train"` (custom.py) name a file,
not a module; this is the one place that turns such a file into a module. Each caller checks first that the
file exists and says in its own words what a failure means.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
import threading
from pathlib import Path
from types import ModuleType

_loaded: dict[str, tuple[int, ModuleType]] = {}  # resolved path -> (mtime_ns, module)
_lock = threading.Lock()


def import_file(path: Path) -> ModuleType:
    """The module of ``path``, imported under a name derived from the path (so classes pickle and two trials in
    one process share it) and imported again when the file has changed. The file's folder goes on ``sys.path``,
    so it can import its neighbours as when run as a script. What the file raises at import time propagates,
    and leaves nothing behind in ``sys.modules``."""
    path = path.expanduser().resolve()
    mtime = path.stat().st_mtime_ns
    with _lock:
        cached = _loaded.get(str(path))
        if cached is not None and cached[0] == mtime:
            return cached[1]
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
        stem = re.sub(r"\W", "_", path.stem)
        name = f"hpo_user_{digest}_{stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"Python cannot import {path}; it must be a .py source file")
        module = importlib.util.module_from_spec(spec)
        if str(path.parent) not in sys.path:
            sys.path.append(str(path.parent))
        sys.modules[name] = module  # dataclasses and pickling look classes up by module name
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        _loaded[str(path)] = (mtime, module)
        return module
