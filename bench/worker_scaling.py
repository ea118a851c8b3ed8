"""Trials finished per minute with 1, 2 and 4 workers on one machine (`hpo run --workers N`).

Runs the same study (fresh run directory each time, same seed and budget) with each worker count,
alternating over repeats, and prints the median throughput and the ratio to one worker, measured in this
one run. Wall time includes process start-up (each worker imports torch and MLflow), which is part of
what a user pays.

    python bench/worker_scaling.py --trials 24 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(workers: int, trials: int, study: str, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "search.cli", "run", str(REPO / study), "--trials", str(trials), "--quiet",
               "--workers", str(workers), "--run-dir", tmp]
        for override in overrides:
            cmd += ["--set", override]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="studies/quickstart.toml")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    seconds: dict[int, list[float]] = {w: [] for w in counts}
    for _ in range(args.repeats):
        for w in counts:
            seconds[w].append(one_run(w, args.trials, args.study, args.overrides))
    from trial_throughput import machine  # bench/ is on sys.path when run as a script

    print(f"machine: {machine()}")
    print(f"study: {args.study} {' '.join(args.overrides)}, {args.trials} trials, {args.repeats} repeats (median)")
    base = args.trials / statistics.median(seconds[counts[0]]) * 60
    print("| workers | wall seconds (median) | trials / minute | vs 1 worker |")
    print("| --- | --- | --- | --- |")
    for w in counts:
        median = statistics.median(seconds[w])
        rate = args.trials / median * 60
        print(f"| {w} | {median:.1f} | {rate:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
