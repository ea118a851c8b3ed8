"""Sampler + storage time per trial as a study grows to 50, 200 and 500 trials (trivial objective).

The objective does no training: it suggests the quickstart's four parameters, reports ``--steps``
intermediate values with a should_prune() after each (a median pruner that does its usual work but is
kept from pruning, so every trial reports every step and trial 500 costs what trial 50 would have with
the same data) and returns a cheap function of the parameters. So the time per trial is what Optuna and its storage cost
around a trial, which a real trial pays on top of training. Three runs, one after the other:

* TPE + SQLite: what ``hpo run`` uses by default;
* TPE + in-memory storage: the sampler's share (no database);
* random sampler + SQLite: the storage's share (a sampler that costs nothing).

For each, the median time per trial over the trials just before 50, 200 and 500 (windows of 20 trials).

    python bench/study_scaling.py
    python bench/study_scaling.py --trials 500 --steps 20
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.trial_throughput import machine  # noqa: E402

CHECKPOINTS = (50, 200, 500)
WINDOW = 20


def objective(steps: int) -> Any:
    def run(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 3e-1, log=True)
        batch = trial.suggest_categorical("batch_size", [32, 64, 128])
        wd = trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
        dropout = trial.suggest_float("dropout", 0.0, 0.5)
        value = 1.0 - (math.log10(lr) + 2.5) ** 2 / 10 - dropout / 5 - abs(math.log10(wd) + 4) / 50 - batch / 1e4
        for step in range(steps):
            trial.report(value * (1 - 0.5 ** (step + 1)), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    return run


def measure(sampler: optuna.samplers.BaseSampler, storage: Any, trials: int, steps: int
            ) -> tuple[list[float], list[int]]:
    """Seconds per trial in trial order (time between consecutive trial ends, the first from the start), and
    the number of steps each trial reported (a pruned trial reports fewer, so it costs the storage less)."""
    # n_min_trials out of reach: the pruner reads the completed trials and computes as usual but never prunes,
    # so every trial reports every step and the windows compare like with like
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2, n_min_trials=10**9)
    study = optuna.create_study(direction="maximize", sampler=sampler, storage=storage, pruner=pruner)
    ends: list[float] = []
    reported: list[int] = []

    def done(s: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        ends.append(time.perf_counter())
        reported.append(len(t.intermediate_values))

    start = time.perf_counter()
    study.optimize(objective(steps), n_trials=trials, callbacks=[done])
    return [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)], reported


def windows(values: list[float], scale: float = 1000.0) -> dict[int, float]:
    """Median over the WINDOW trials before each checkpoint (ms for durations)."""
    return {n: statistics.median(values[max(0, n - WINDOW):n]) * scale for n in CHECKPOINTS if n <= len(values)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=500)
    p.add_argument("--steps", type=int, default=20, help="intermediate reports per trial (epochs); default 20")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    results: dict[str, dict[int, float]] = {}
    reports: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "tpe + sqlite": (optuna.samplers.TPESampler(seed=0), f"sqlite:///{tmp}/tpe.db"),
            "tpe + memory": (optuna.samplers.TPESampler(seed=0), None),
            "random + sqlite": (optuna.samplers.RandomSampler(seed=0), f"sqlite:///{tmp}/random.db"),
        }
        for label, (sampler, storage) in runs.items():
            started = time.perf_counter()
            durations, reported = measure(sampler, storage, args.trials, args.steps)
            results[label] = windows(durations)
            reports[label] = windows([float(r) for r in reported], 1.0)
            print(f"{label:<16} " + "   ".join(f"trial {n}: {v:6.1f} ms ({reports[label][n]:.0f} reports)"
                                               for n, v in results[label].items())
                  + f"   (whole run {time.perf_counter() - started:.0f} s)", flush=True)
    tpe_sql, tpe_mem, rnd_sql = (results[k] for k in runs)
    for n in tpe_sql:
        print(f"at trial {n}: TPE without a database {tpe_mem[n]:.1f} ms, SQLite with a free sampler "
              f"{rnd_sql[n]:.1f} ms, TPE + SQLite {tpe_sql[n]:.1f} ms per trial (each includes the median "
              f"pruner's {args.steps} checks)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "steps": args.steps, "ms_per_trial": results,
                                               "median_reports_per_trial": reports}, indent=2, default=str))


if __name__ == "__main__":
    main()
