"""bench/gpu_check.sh --cpu-smoke end to end, so the GPU check still runs when a GPU is finally lent.

Asserts on what the summary says, section by section (each with its figures), not on how long it took.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benches import run_bench

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NUMBER = r"[\d,]+(?:\.\d+)?"


def summary_lines(stdout: str) -> dict[str, str]:
    """The summary block after the '=== gpu_check summary' header, as {label: text}."""
    head, sep, block = stdout.partition("=== gpu_check summary")
    assert sep, f"no summary printed:\n{stdout[-3000:]}"
    lines = {}
    for line in block.splitlines()[1:]:
        label, colon, text = line.partition(":")
        if colon:
            lines[label] = text.strip()
    return lines


def figure(pattern: str, text: str) -> list[float]:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in {text!r}"
    return [float(g.replace(",", "")) for g in found.groups()]


def test_cpu_smoke_runs_every_section_and_prints_its_figures() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    assert re.match(r"python \S+, torch \S+, CUDA \S+, cuDNN \S+, GPU ", out), out.splitlines()[0]

    s = summary_lines(out)
    assert list(s) == ["gpu tests", "epoch", "compile", "trials as processes", "packing K=1,2,4,8", "epoch profile",
                       "cuda graphs", "study", "total", "result"]
    passed, skipped, selected = figure(r"^(\d+) passed, 0 failed, (\d+) skipped \((\d+) selected", s["gpu tests"])
    assert passed + skipped == selected
    epoch_s, images_s = figure(rf"^({NUMBER}) s/epoch \(first {NUMBER} s\), ({NUMBER}) img/s training, peak memory "
                               r"n/a; fp32, channels_last", s["epoch"])
    assert epoch_s > 0 and images_s > 0
    off, on, speedup, _ = figure(rf"^off ({NUMBER}) s/epoch, on ({NUMBER}) s/epoch \(({NUMBER})x\), ({NUMBER}) img/s",
                                 s["compile"])
    assert off > 0 and on > 0 and speedup > 0
    one, two = figure(rf"^1: ({NUMBER}) img/s \(1\.00x\); 2: ({NUMBER}) img/s \({NUMBER}x\) \(summed",
                      s["trials as processes"])  # the smoke run's 1 and 2 (4 on a GPU)
    assert min(one, two) > 0
    quick, cifar, graphed = s["packing K=1,2,4,8"].split(" | ")
    with_graphs, eager, ratio = figure(rf"^quickstart CNN, one trial of 3 epochs: ({NUMBER}) img/s with cuda_graphs "
                                       rf"vs ({NUMBER}) eager \(({NUMBER})x\)", graphed)
    assert with_graphs > 0 and eager > 0 and ratio == pytest.approx(with_graphs / eager, rel=0.1, abs=0.01)
    for text, name in ((quick, "quickstart CNN"), (cifar, "CIFAR-shaped CNN")):
        assert text.startswith(f"{name}: K=1: ")
        for k in (1, 2, 4, 8):
            packed, sequential, ratio = figure(rf"K={k}: ({NUMBER}) img/s packed vs ({NUMBER}) sequential "
                                               rf"\(({NUMBER})x\)", text)
            assert packed > 0 and sequential > 0 and ratio == pytest.approx(packed / sequential, rel=0.1, abs=0.01)
    gflop, tflops, _ = figure(rf"^model ({NUMBER}) GFLOP per training image, ({NUMBER}) TFLOP/s at ({NUMBER}) img/s",
                              s["epoch profile"])
    assert 0.001 < gflop < 0.01 and tflops >= 0  # the smoke CNN: two small convolutions (no kernel time on the CPU)
    graphs = s["cuda graphs"]
    assert graphs.startswith("s/epoch: shipped ")
    for variant in ("shipped", "shipped, cuda_graphs", "batch 256, cuda_graphs", "pool-first 8-16 x2, cuda_graphs"):
        seconds, = figure(rf"(?:^s/epoch: |; ){re.escape(variant)} ({NUMBER}) s \(first", graphs)
        assert seconds > 0
    assert s["study"].startswith("exit 0, 2 trials finished (2 COMPLETE, 0 PRUNED, 0 FAIL), best val_accuracy ")
    total, = figure(rf"^({NUMBER}) s \(limit 120 s\)", s["total"])
    keys = ["gpu_tests", "epoch", "compile", "processes", "packing", "profile", "graphs", "study"]
    spent = figure("; seconds per section: " + ", ".join(f"{k} ({NUMBER})" for k in keys) + "$", s["total"])
    assert 0 < sum(spent) <= total + len(keys)  # each rounded to a second
    assert s["result"] == "ok"


def test_profile_epoch_cpu_smoke_counts_the_models_arithmetic_and_lists_its_operators() -> None:
    out = run_bench("profile_epoch.py", "--cpu-smoke", "--rows", "5", timeout=600)
    images, rate = figure(rf"one epoch under the profiler: {NUMBER} s wall \({NUMBER} s as fit counts it\), "
                          rf"(\d+) training images, ({NUMBER}) img/s", out)
    assert images == 512 and rate > 0
    # the smoke CNN (widths 8-16, 1 block each, 3x32x32): forward + backward of its two convolutions, counted
    gflop, _ = figure(rf"model: ({NUMBER}) GFLOP per training image \(forward \+ backward\) -> ({NUMBER}) TFLOP/s", out)
    assert 0.001 < gflop < 0.01
    assert "aten::" in out.split("TFLOP/s achieved while training", 1)[1]  # the operator table follows


SECTIONS = ("gpu_tests", "epoch_section", "compile_section", "processes_section", "packing_section",
            "profile_section", "graphs_section", "study_section")


@pytest.mark.parametrize("stop_at", [None, "compile_section"])
def test_the_json_holds_every_finished_section_also_when_the_run_is_stopped(
        stop_at: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device's command limit can stop the check mid-run: the JSON is written after every section, so what
    was measured comes back; ``complete`` says whether the run got to the end. Sections here are stand-ins."""
    import json

    from bench import gpu_check

    def section(name: str) -> gpu_check.Section:
        def run(sizes: object, results: dict) -> tuple[dict, str]:
            if name == stop_at:
                raise KeyboardInterrupt  # as the limit's kill would end it: no summary, no final write
            return {"figure": name}, f"{name} ok"
        return run

    for name in SECTIONS:
        monkeypatch.setattr(gpu_check, name, section(name))
    out = tmp_path / "gpu-check.json"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--cpu-smoke", "--json", str(out)])
    if stop_at is None:
        assert gpu_check.main() == 0
    else:
        with pytest.raises(KeyboardInterrupt):
            gpu_check.main()
    written = json.loads(out.read_text())
    keys = ["gpu_tests", "epoch", "compile", "processes", "packing", "profile", "graphs", "study"]
    done = keys if stop_at is None else keys[:2]
    assert [k for k in keys if k in written] == done and all(written[k] for k in done)
    assert list(written["section_seconds"]) == done
    assert written["complete"] is (stop_at is None) and (written["total_s"] is None) is (stop_at is not None)
