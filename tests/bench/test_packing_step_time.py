"""bench/packing_step_time.py runs and prints a time per packed step for the checkout it is given."""

from __future__ import annotations

import re

from tests.benches import REPO, run_bench


def test_prints_milliseconds_per_packed_step_of_the_given_checkout() -> None:
    stdout = run_bench("packing_step_time.py", "--repo", str(REPO), "--k", "2", "--images", "64", "--batch-size", "16",
                       "--epochs", "1", "--repeats", "1")
    found = re.fullmatch(rf"{re.escape(str(REPO))}: K = 2, batch 16: ([\d.]+) ms per packed step \(best of 1, 4 "
                         r"steps each, validation included\)\n", stdout)
    assert found, stdout
    assert float(found.group(1)) > 0
