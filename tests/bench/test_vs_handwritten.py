"""bench/vs_handwritten.py, issue 11's proof, runs both sides end to end and pairs them as it says: each pair one
run of the hand-written script and one of `hpo run` on the same seed, the order alternating, the ratio their walls'."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tests.benches import run_bench


def test_repeated_pairs_alternate_order_and_the_summary_is_their_median(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    printed = run_bench("vs_handwritten.py", "--seeds", "1", "--repeats", "2", "--trials", "2", "--epochs", "1",
                        "--no-warmup", "--keep", str(tmp_path / "kept"), "--json", str(out), timeout=600)
    figures = json.loads(out.read_text())
    pairs = figures["pairs"]
    assert [(p["seed"], p["repeat"], p["first"]) for p in pairs] == [(42, 1, "hand-written"), (42, 2, "hpo")]
    for p in pairs:
        for side in ("hand-written", "hpo"):  # both studies read back from their own storage: 2 trials x 1 epoch
            assert (p[side]["trials"], p[side]["epochs"], p[side]["failed"]) == (2, 2, 0)
            assert 0 < p[side]["trials_span_s"] < p[side]["wall_s"]
    ratios = [p["hand-written"]["wall_s"] / p["hpo"]["wall_s"] for p in pairs]
    assert figures["ratios"] == ratios and figures["median_ratio"] == statistics.median(ratios)
    assert f"median {statistics.median(ratios):.2f}x" in printed
    first = pairs[0]
    hand, hpo = first["hand-written"], first["hpo"]
    parts = (f"(trials {hand['trials_span_s'] / hpo['trials_span_s']:.2f}x, rest "
             f"{(hand['wall_s'] - hand['trials_span_s']) / (hpo['wall_s'] - hpo['trials_span_s']):.2f}x)")
    assert f"hand-written/hpo wall {ratios[0]:.2f}x {parts}" in printed
    assert {d.name for d in (tmp_path / "kept").iterdir() if d.is_dir()} == {
        "handwritten-42-r1", "handwritten-42-r2", "hpo-42-r1", "hpo-42-r2"}
