"""bench/trial_throughput.py runs end to end on the CPU and reports both loops for every configuration: it once broke
unnoticed (the data sets came to store raw images, which its hand-written loop fed to the model unnormalised)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.benches import run_bench


def test_trial_throughput_measures_both_loops_on_every_configuration(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    run_bench("trial_throughput.py", "--repeats", "1", "--epochs", "1", "--batch-sizes", "128", "--synthetic-train",
              "128", "--widths", "8", "16", "--device", "cpu", "--threads", "1", "--json", str(out), timeout=600)
    loops = json.loads(out.read_text())["loops"]
    assert {loop["label"].split()[0] for loop in loops} >= {"digits", "synthetic"}
    for loop in loops:
        assert loop["batch_size"] == 128 and loop["device"] == "cpu"
        assert loop["project_images_per_s"] > 0 and loop["handwritten_images_per_s"] > 0
        assert loop["ratio_median"] == loop["project_images_per_s"] / loop["handwritten_images_per_s"]
