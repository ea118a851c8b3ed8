"""bench/packing_step_time.py runs and prints a time per packed step for the checkout it is given."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_prints_milliseconds_per_packed_step_of_the_given_checkout() -> None:
    done = subprocess.run([sys.executable, "bench/packing_step_time.py", "--repo", str(REPO), "--k", "2",
                           "--images", "64", "--batch-size", "16", "--epochs", "1", "--repeats", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    found = re.fullmatch(rf"{re.escape(str(REPO))}: K = 2, batch 16: ([\d.]+) ms per packed step \(best of 1, 4 "
                         r"steps each, validation included\)\n", done.stdout)
    assert found, done.stdout
    assert float(found.group(1)) > 0
