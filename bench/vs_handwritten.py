"""The same search run by `hpo run` and by the hand-written Optuna script, side by side (issue 11, Proof).

For each seed, in one invocation, alternating which goes first: `bench/handwritten_study.py --seed S` and
`hpo run studies/quickstart.toml --set sampler.seed=S`, each as a fresh process with OMP_NUM_THREADS=1 (so
both train on one core of the same machine and neither competes with itself), in a fresh folder. Printed
per seed and in total: wall time of the whole process (imports, data, every trial and whatever the tool
does at the end), epochs trained, seconds per epoch, the best validation accuracy each found, and the
ratio of wall times hand-written / hpo (above 1: hpo finished sooner). The wall time is split into the
trials (first trial's start to last trial's end, from the storage) and the rest (process start-up, imports,
data, and what the tool does before the first and after the last trial), each with its own ratio; seconds per
epoch are the trials' time over the epochs trained. Before the timed runs each side runs once untimed (1 trial
x 1 epoch), so first-use costs of the machine (file caches) fall on neither side.

"Best validation accuracy" is read the same way from both studies' storage: the highest val_accuracy
reported at any epoch of any trial. Each study's own best value is printed next to it; they differ where
the script, like Optuna's example, returns its last epoch's accuracy while hpo returns its best epoch's.

    python bench/vs_handwritten.py                           # 3 seeds, quickstart's 12 trials x 20 epochs
    python bench/vs_handwritten.py --seeds 1 --trials 30
    python bench/vs_handwritten.py --pack 4                  # hpo with trial packing
    python bench/vs_handwritten.py --trials 30 --workers 2 --handwritten-threads 2   # each side using both cores
    python bench/vs_handwritten.py --trials 30 --workers 2 --handwritten-threads 2 --repeats 3

On a shared VM one 3-seed run moved the ratio by a quarter from the next one (BENCHMARKS section 8, runs P and Q):
``--repeats R`` runs each seed's pair R times, the order alternating over all pairs, and the summary gives the
median of the pairs' ratios with its range, the figure to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import handwritten_study as hw  # noqa: E402
from bench.trial_throughput import machine  # noqa: E402
from search.config import load_settings  # noqa: E402

QUICKSTART = REPO / "studies" / "quickstart.toml"

DIFFERENCES = """\
same on both sides: the digits split (objectives.data.load_data), the CNN (objectives.networks, widths 32-64),
  the 4 hyperparameters and ranges, TPE (seed S, 4 startup trials), MedianPruner (3 startup trials, 2 warm-up
  steps), max epochs, AdamW + cosine schedule over max_epochs, Optuna study in SQLite, MLflow runs in SQLite,
  one fresh process each (OMP_NUM_THREADS=1 unless --handwritten-threads / --workers say otherwise), start-up
  and imports counted in the wall time.
what differs (each is part of what the side is):
  hpo stops a trial early inside it (patience {patience}, min_delta {min_delta} on val_accuracy) and returns its best
    epoch's accuracy (restore_best); the script trains every unpruned trial to max_epochs and returns the last epoch's.
  hpo trains from one normalised tensor with index slices; the script uses a DataLoader over TensorDatasets.
  hpo's runtime trains channels_last with a fused AdamW step on the CPU; the script NCHW with torch's AdamW.
  hpo logs 7 metrics per epoch in one MLflow call; the script 3 metrics, one log_metric call each.
  hpo also writes last.pt (at most every 30 s) and best.pt per trial, curve PNGs and notes for the dashboard, at the
    end scores the best trial on the test split and logs the model; the script does none of that.
  hpo applies weight decay to weights only (not biases or BatchNorm); the script to all parameters, as
    torch.optim.AdamW(model.parameters()) does. hpo seeds every trial alike (objective seed 0); the script
    seeds torch once per process with S."""


@dataclass
class Side:
    """One study's figures, read from its Optuna storage; ``wall_s`` is the whole process."""

    wall_s: float
    epochs: int
    trials: int
    complete: int
    pruned: int
    failed: int
    best_value: float
    best_epoch_value: float
    trials_span_s: float  # first trial's start to last trial's end

    @property
    def seconds_per_epoch(self) -> float:
        """Within the trials: training plus the per-epoch and per-trial work of the tool, without start-up."""
        return self.trials_span_s / max(1, self.epochs)


def check_same_search() -> None:
    """Refuse to compare if studies/quickstart.toml no longer matches what the hand-written script copies."""
    s = load_settings(QUICKSTART)
    p = s.space.params
    got = {
        "lr": (p["lr"].low, p["lr"].high, p["lr"].log), "batch_size": list(p["batch_size"].choices or []),
        "weight_decay": (p["weight_decay"].low, p["weight_decay"].high, p["weight_decay"].log),
        "dropout": (p["dropout"].low, p["dropout"].high, p["dropout"].log), "params": list(p),
        "lr_scaling": s.space.lr_scaling, "sampler": (s.sampler.name, s.sampler.n_startup_trials),
        "pruner": (s.pruner.name, {k: getattr(s.pruner, k) for k in hw.PRUNER_OPTIONS}),
        "objective": {k: getattr(s.objective, k) for k in hw.OBJECTIVE},
        "optimiser": (s.objective.optimizer, s.objective.schedule, s.objective.warmup_epochs),
    }
    want = {
        "lr": (*hw.LR, True), "batch_size": hw.BATCH_SIZES, "weight_decay": (*hw.WEIGHT_DECAY, True),
        "dropout": (*hw.DROPOUT, False), "params": ["lr", "batch_size", "weight_decay", "dropout"],
        "lr_scaling": "none", "sampler": ("tpe", hw.TPE_STARTUP_TRIALS), "pruner": ("median", hw.PRUNER_OPTIONS),
        "objective": hw.OBJECTIVE, "optimiser": ("adamw", "cosine", 0),
    }
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    if wrong:
        raise SystemExit(f"studies/quickstart.toml and bench/handwritten_study.py differ (file, script): {wrong}")


def read_study(storage: Path, name: str, wall_s: float) -> Side:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage}")
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    values = [v for t in trials for v in t.intermediate_values.values()]
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return Side(wall_s=wall_s, epochs=sum(len(t.intermediate_values) for t in trials), trials=len(trials),
                complete=states.count("COMPLETE"), pruned=states.count("PRUNED"), failed=states.count("FAIL"),
                best_value=study.best_value, best_epoch_value=max(values),
                trials_span_s=(max(ends) - min(starts)).total_seconds() if starts and ends else float("nan"))


def run(cmd: list[str], log: Path, threads: int = 1) -> float:
    """Wall seconds of ``cmd`` as a fresh process with ``threads`` torch threads; its output goes to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:  # the log is kept: the run's folder is a temporary one unless --keep named it
        text = log.read_text()
        kept = Path(tempfile.mkdtemp(prefix="vs-handwritten-failed-")) / log.name
        kept.write_text(text)
        raise SystemExit(f"exit code {done.returncode}: {' '.join(cmd)}\n{text[-3000:]}\n(the whole log: {kept})")
    return wall


def handwritten_cmd(seed: int, trials: int, epochs: int, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "bench" / "handwritten_study.py"), "--trials", str(trials), "--epochs",
            str(epochs), "--seed", str(seed), "--out", str(out)]


def hpo_cmd(seed: int, trials: int, epochs: int, run_dir: Path, pack: int | None = None,
            workers: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "search.cli", "run", str(QUICKSTART), "--set", f"sampler.seed={seed}",
           "--trials", str(trials), "--run-dir", str(run_dir), "--quiet"]
    if pack is not None:
        cmd += ["--pack", str(pack)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    if epochs != load_settings(QUICKSTART).study.max_epochs:
        cmd += ["--set", f"study.max_epochs={epochs}"]
    return cmd


def line(name: str, s: Side) -> str:
    rest = s.wall_s - s.trials_span_s
    return (f"  {name:<12} wall {s.wall_s:6.1f} s = trials {s.trials_span_s:6.1f} s + rest {rest:5.1f} s   "
            f"epochs {s.epochs:4d}   {s.seconds_per_epoch:.3f} s/epoch in trials   trials {s.complete} complete / "
            f"{s.pruned} pruned / {s.failed} failed   best val acc {s.best_epoch_value:.4f} (study's best value "
            f"{s.best_value:.4f})")


def compare(name: str, hand: Side, hpo: Side) -> str:
    """The ratios, hand-written over hpo: the whole wall, then its two parts (the trials; the rest: start-up and
    end, which both sides largely share, so a short study's ratio leans towards the rest's)."""
    gap = (hpo.best_epoch_value - hand.best_epoch_value) * 100
    trials = hand.trials_span_s / hpo.trials_span_s
    rest = (hand.wall_s - hand.trials_span_s) / (hpo.wall_s - hpo.trials_span_s)
    return (f"  {name}: hand-written/hpo wall {hand.wall_s / hpo.wall_s:.2f}x (trials {trials:.2f}x, rest "
            f"{rest:.2f}x), epochs {hand.epochs / hpo.epochs:.2f}x,"
            f" s/epoch {hand.seconds_per_epoch / hpo.seconds_per_epoch:.2f}x; best val acc hpo - hand-written "
            f"{gap:+.2f} points")


def pair_ratios(results: list[dict[str, Any]]) -> list[float]:
    """Hand-written wall over hpo wall, one per pair, in the order run."""
    return [r["hand-written"]["wall_s"] / r["hpo"]["wall_s"] for r in results]


def main() -> None:
    qs = load_settings(QUICKSTART)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (default 3)")
    parser.add_argument("--first-seed", type=int, default=qs.sampler.seed or 0,
                        help="seeds are first-seed, first-seed+1, ... (default: the quickstart's)")
    parser.add_argument("--trials", type=int, default=qs.study.n_trials)
    parser.add_argument("--epochs", type=int, default=qs.study.max_epochs)
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the untimed 1-trial x 1-epoch run of each side before the timed ones")
    parser.add_argument("--pack", type=int, help="hpo's --pack K (default: the study file's study.pack)")
    parser.add_argument("--workers", type=int, help="hpo's --workers N (worker processes, one thread each on 2 cores)")
    parser.add_argument("--handwritten-threads", type=int, default=1,
                        help="torch threads of the hand-written script (default 1; 2 = torch's default on 2 cores)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each seed's pair this many times (default 1); the summary gives the median ratio")
    parser.add_argument("--keep", type=Path, help="keep both sides' study folders and logs here")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    check_same_search()

    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    print(f"search: quickstart, {args.trials} trials x {args.epochs} epochs, seeds "
          f"{args.first_seed}..{args.first_seed + args.seeds - 1}", flush=True)
    stopping = load_settings(QUICKSTART).early_stopping
    print(DIFFERENCES.format(patience=stopping.patience, min_delta=stopping.min_delta), flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="vs-handwritten-")
    root = args.keep or Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    if args.warmup:  # file caches and first-use costs land here, not on whichever side is timed first
        run(handwritten_cmd(0, 1, 1, root / "warmup-handwritten"), root / "warmup-handwritten.log",
            args.handwritten_threads)
        run(hpo_cmd(0, 1, 1, root / "warmup-hpo", args.pack, args.workers), root / "warmup-hpo.log")
    results: list[dict[str, Any]] = []
    pairs = [(args.first_seed + i, r) for r in range(args.repeats) for i in range(args.seeds)]
    for i, (seed, repeat) in enumerate(pairs):
        tag = f"{seed}" if args.repeats == 1 else f"{seed}-r{repeat + 1}"
        hand_dir, hpo_dir = root / f"handwritten-{tag}", root / f"hpo-{tag}"
        order = ["hand-written", "hpo"] if i % 2 == 0 else ["hpo", "hand-written"]
        sides: dict[str, Side] = {}
        for name in order:
            if name == "hpo":
                wall = run(hpo_cmd(seed, args.trials, args.epochs, hpo_dir, args.pack, args.workers),
                           root / f"hpo-{tag}.log")
                sides[name] = read_study(hpo_dir / "quickstart" / "optuna.db", "quickstart", wall)
            else:
                wall = run(handwritten_cmd(seed, args.trials, args.epochs, hand_dir), root / f"handwritten-{tag}.log",
                           args.handwritten_threads)
                sides[name] = read_study(hand_dir / "optuna.db", f"handwritten-seed{seed}", wall)
        print(f"\nseed {seed}{'' if args.repeats == 1 else f', repeat {repeat + 1}'} ({order[0]} first)")
        print(line("hand-written", sides["hand-written"]))
        print(line("hpo", sides["hpo"]))
        print(compare("ratio", sides["hand-written"], sides["hpo"]), flush=True)
        results.append({"seed": seed, "repeat": repeat + 1, "first": order[0],
                        **{k: asdict(v) for k, v in sides.items()}})

    def total(name: str) -> Side:
        parts = [Side(**r[name]) for r in results]
        return Side(wall_s=sum(p.wall_s for p in parts), epochs=sum(p.epochs for p in parts),
                    trials=sum(p.trials for p in parts), complete=sum(p.complete for p in parts),
                    pruned=sum(p.pruned for p in parts), failed=sum(p.failed for p in parts),
                    best_value=statistics.mean(p.best_value for p in parts),
                    best_epoch_value=statistics.mean(p.best_epoch_value for p in parts),
                    trials_span_s=sum(p.trials_span_s for p in parts))

    hand, hpo = total("hand-written"), total("hpo")
    ratios = pair_ratios(results)
    print(f"\ntotal over {len(results)} pair(s): {args.seeds} seed(s) x {args.repeats} repeat(s) (walls, epochs and "
          "spans summed; accuracies are means over pairs)")
    print(line("hand-written", hand))
    print(line("hpo", hpo))
    print(compare("ratio", hand, hpo))
    print(f"  per-pair wall ratios: {', '.join(f'{r:.2f}x' for r in ratios)}; median {statistics.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}x-{max(ratios):.2f}x); issue 11's target: >= 3x at a best val acc within 0.5 "
          "points")
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average at start {info.get('load_average')}, at end {load_after}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "load_average_after": load_after, "argv": sys.argv[1:],
                                         "pairs": results, "ratios": ratios,
                                         "median_ratio": statistics.median(ratios)}, indent=2, default=str))
    tmp.cleanup()


if __name__ == "__main__":
    main()
