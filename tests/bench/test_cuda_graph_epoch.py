"""bench/cuda_graph_epoch.py --cpu-smoke end to end: the loop the GPU run graphs still trains, so the next lent
GPU spends its minutes on the figures, not on fixing the script. Asserts on the rows written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.benches import run_bench


@pytest.mark.slow
def test_cpu_smoke_trains_every_variant_and_the_eager_fallback_is_the_same_loop(tmp_path: Path) -> None:
    out = tmp_path / "graphs.json"
    run_bench("cuda_graph_epoch.py", "--cpu-smoke", "--epochs", "2", "--json", str(out))
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    fallback = " (eager here: no CUDA)"
    assert list(rows) == ["shipped, eager", f"shipped, graphed{fallback}", "pool-first airbench widths, eager",
                          f"pool-first airbench widths, graphed{fallback}"]
    for row in rows.values():
        assert not row["graphed"] and row["capture_s"] == 0.0  # no CUDA: nothing captured
        assert math.isfinite(row["train_loss"]) and 0.0 < row["train_loss"] < 5.0
        assert 0.0 <= row["val_accuracy"] <= 1.0 and row["images_per_s"] > 0
    # Without CUDA the graphed variant runs the same loop eagerly from the same seed: the same numbers.
    for net in ("shipped", "pool-first airbench widths"):
        eager, same = rows[f"{net}, eager"], rows[f"{net}, graphed{fallback}"]
        assert eager["train_loss"] == same["train_loss"] and eager["val_accuracy"] == same["val_accuracy"]
    # The two networks differ (the pool-first one is really built from bench/cifar_nets.py).
    assert rows["shipped, eager"]["train_loss"] != rows["pool-first airbench widths, eager"]["train_loss"]
