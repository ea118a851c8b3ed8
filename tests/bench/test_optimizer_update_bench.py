"""bench/optimizer_update.py times both ways side by side and finds them training bit for bit alike."""

from __future__ import annotations

import re

from tests.benches import run_bench


def test_prints_both_ways_per_case_and_finds_them_alike() -> None:
    stdout = run_bench("optimizer_update.py", "--epochs", "1", "--rounds", "1", "--k", "2", "--images", "64",
                       "--blocks", "1")
    row = r"^  (.+?) +torch step +([\d.]+) +direct +([\d.]+) +(-?[\d.]+)% less"
    updates = re.findall(row + "$", stdout, re.M)
    assert [r[0] for r in updates] == ["one trial", "pack of 2"], stdout
    epochs = re.findall(row + " +(.+)$", stdout, re.M)
    assert [r[0] for r in epochs] == ["one trial, batch 32", "one trial, batch 64", "one trial, batch 128",
                                      "pack of 2, batch 64"], stdout
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in updates + epochs)
    assert {r[4] for r in epochs} == {"bit for bit alike"}, stdout
