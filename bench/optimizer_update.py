"""Epoch time of the quickstart CNN with the direct optimiser update (objectives/optimizer_update.py) against
torch's `optimizer.step()` / `zero_grad()`, side by side in one process, and whether the two train bit for bit
alike. One trial at batch 32, 64 and 128, and a pack of K members at batch 64 (one optimiser per member, so a
packed step makes K updates: on a GPU the host time a pack waits on).

The two ways alternate round by round (the VM's speed drifts over a minute); each figure is the median over
the rounds of the CPU time of `fit` (or `fit_packed`) per epoch, validation included.

    python bench/optimizer_update.py                   # on the CPU, one thread: about 2 minutes
    python bench/optimizer_update.py --device cuda     # on a GPU (wall time, synchronised)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import objectives.packed as packed_module  # noqa: E402
import objectives.train as train_module  # noqa: E402
from bench.packing_throughput import members, quickstart_config  # noqa: E402
from objectives.optimizer_update import OptimizerUpdate  # noqa: E402
from objectives.packed import fit_packed  # noqa: E402
from objectives.settings import TrainConfig  # noqa: E402
from objectives.train import fit  # noqa: E402


class TorchStep(OptimizerUpdate):
    """Always `optimizer.step()`: what training did before the direct update."""

    def _exact(self) -> bool:
        return False


def use(update: type[OptimizerUpdate]) -> None:
    train_module.OptimizerUpdate = update  # type: ignore[misc]
    packed_module.OptimizerUpdate = update  # type: ignore[misc]


def timed(run: Callable[[], list[Any]], cuda: bool) -> tuple[float, list[float]]:
    """CPU seconds of ``run`` (wall seconds on a GPU) and the runs' last validation losses."""
    clock = time.perf_counter if cuda else time.process_time
    if cuda:
        torch.cuda.synchronize()
    start = clock()
    results = run()
    if cuda:
        torch.cuda.synchronize()
    return clock() - start, [r.history[-1]["val_loss"] for r in results]


def cases(base: TrainConfig, k: int, epochs: int) -> dict[str, Callable[[], list[Any]]]:
    cfg = base.model_copy(update={"lr": 0.01, "weight_decay": 1e-4, "dropout": 0.2})
    out: dict[str, Callable[[], list[Any]]] = {}
    for batch in (32, 64, 128):
        one = cfg.model_copy(update={"batch_size": batch})
        out[f"one trial, batch {batch}"] = lambda one=one: [fit(one, epochs)]
    pack = members(cfg.model_copy(update={"batch_size": 64}), k)
    out[f"pack of {k}, batch 64"] = lambda: fit_packed(pack, epochs)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per timed run")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is printed")
    parser.add_argument("--k", type=int, default=4, help="members of the pack")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, help="train on this many of digits' training images (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    base = quickstart_config(args.device)
    if args.images:
        base = base.model_copy(update={"train_subset": args.images})
    runs = cases(base, args.k, args.epochs)
    ways = {"torch step": TorchStep, "direct": OptimizerUpdate}
    seconds: dict[tuple[str, str], list[float]] = {}
    losses: dict[tuple[str, str], list[float]] = {}
    for run in runs.values():  # one untimed run each: first-use costs fall on neither way
        for update in ways.values():
            use(update)
            run()
    for _ in range(args.rounds):
        for name, run in runs.items():
            for way, update in ways.items():
                use(update)
                s, loss = timed(run, cuda)
                seconds.setdefault((name, way), []).append(s)
                losses[(name, way)] = loss
    use(OptimizerUpdate)
    unit = "wall" if cuda else "CPU"
    print(f"{unit} ms per epoch (median of {args.rounds} rounds, {args.epochs} epochs each), {args.device}, "
          f"{args.threads} thread(s)")
    for name in runs:
        step, direct = (statistics.median(seconds[(name, w)]) * 1000 / args.epochs for w in ways)
        same = losses[(name, "torch step")] == losses[(name, "direct")]
        print(f"  {name:22s} torch step {step:7.1f}  direct {direct:7.1f}  {1 - direct / step:6.1%} less"
              f"  {'bit for bit alike' if same else 'RESULTS DIFFER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
