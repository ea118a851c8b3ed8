"""Loading large libraries with the garbage collector off: each full collection walks every object loaded so far,
7 of them and about 1.2 s for `hpo run` (BENCHMARKS.md section 8), and loading leaves little garbage."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_off(freeze: bool) -> Iterator[None]:
    """No collection while the block imports; with ``freeze``, what it loaded is then frozen, so later
    collections skip it (and a forked worker does not copy its pages by touching it)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if enabled:
            gc.enable()
