"""The direct optimiser update (objectives/optimizer_update.py) against torch's `optimizer.step()` and
`zero_grad()`, side by side in one process: first the update alone (microseconds per training step, the
gradients of one real batch put back before each call, many calls in alternating blocks: what the change
changes, measurable on a noisy VM), for one trial and for a pack of K members (one optimiser each); then whole
epochs of the quickstart CNN (one trial at batch 32, 64 and 128, a pack of K at batch 64; CPU time of `fit`
per epoch, median over alternating rounds; on a shared VM these move by several percent from round to round),
and whether the two ways train bit for bit alike.

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
    """`optimizer.zero_grad(set_to_none=True)` and `optimizer.step()`: what training did before the direct update."""

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

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


def update_us(base: TrainConfig, k: int, blocks: int, calls: int) -> dict[str, float]:
    """Microseconds of zero_grad + step per training step, each way, for ``k`` trials' optimisers (a pack's)."""
    from objectives.data import load_data
    from objectives.runtime import resolve_runtime
    from objectives.train import new_state

    runtime = resolve_runtime(base.device)
    data = load_data(base, runtime.device)
    sides: dict[str, list[tuple[OptimizerUpdate, list[Any]]]] = {}
    for way, update in (("torch step", TorchStep), ("direct", OptimizerUpdate)):
        sides[way] = []
        for cfg in members(base, k):
            state = new_state(cfg, data, runtime, 20)
            x = data.inputs(data.train_x[: cfg.batch_size])
            if runtime.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            torch.nn.functional.cross_entropy(state.model(x), data.train_y[: cfg.batch_size]).backward()
            opt = update(state.optimizer)
            sides[way].append((opt, [p.grad for p in opt.params]))
    cuda = runtime.device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    spent = {way: 0.0 for way in sides}
    for block in range(blocks + 1):  # block 0 is a warm-up (the first step makes the optimiser's state)
        for way, opts in sides.items():
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            for _ in range(calls):
                for update, grads in opts:
                    update.zero_grad()
                    for p, g in zip(update.params, grads, strict=True):
                        p.grad = g
                    update.step()
            if cuda:
                torch.cuda.synchronize()
            if block:
                spent[way] += clock() - start
    return {way: s * 1e6 / (blocks * calls) for way, s in spent.items()}


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
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds of epochs; the median is printed")
    parser.add_argument("--blocks", type=int, default=20, help="alternating blocks of 100 updates each")
    parser.add_argument("--k", type=int, default=4, help="members of the pack")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, help="train on this many of digits' training images (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    base = quickstart_config(args.device)
    if args.images:
        base = base.model_copy(update={"train_subset": args.images})
    unit = "wall" if cuda else "CPU"
    print(f"the update alone (zero_grad + step), {unit} microseconds per training step, {args.device}, "
          f"{args.threads} thread(s):")
    for k in (1, args.k):
        us = update_us(base.model_copy(update={"batch_size": 64}), k, args.blocks, 100)
        print(f"  {'one trial' if k == 1 else f'pack of {k}':22s} torch step {us['torch step']:7.1f}  direct "
              f"{us['direct']:7.1f}  {1 - us['direct'] / us['torch step']:6.1%} less")
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
