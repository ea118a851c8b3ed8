"""Running a bench script as a person does, for the smoke tests under tests/bench: one place for the command,
the working folder and the check that it exited 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, timeout: float = 300) -> str:
    """`python bench/SCRIPT ARGS` from the repository root; its stdout once it exited 0, else the test fails
    with the ends of its output."""
    done = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout
