"""bench/compile_modes.py at tiny sizes: eager and train.py's static compile each train and print their epochs."""

from __future__ import annotations

import re

import pytest

from tests.benches import run_bench


@pytest.mark.slow
def test_eager_and_static_modes_each_print_their_first_and_steady_epochs() -> None:
    stdout = run_bench("compile_modes.py", "--modes", "eager", "static", "--train", "128", "--widths", "4", "8",
                       "--batch-size", "64", "--epochs", "3", "--threads", "1", timeout=600)
    lines = stdout.splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["eager", "static"]
    for line in lines:
        found = re.search(r": ([\d.]+) s first epoch, steady ([\d.]+)-([\d.]+) s per epoch$", line)
        assert found, line
        first, low, high = (float(g) for g in found.groups())
        assert first > 0 and 0 < low <= high
