"""Milliseconds per packed training step of the quickstart CNN, for comparing two versions of the packing code.

At a small batch the step's arithmetic is small and what is left is the host's work per step (indexing,
launching, per-member bookkeeping): on the CPU a proxy for what limits packing small CNNs on a GPU
(BENCHMARKS.md sections 9 and 10 (h)). `--repo` times another checkout (a `git worktree` of an older commit),
so old and new can alternate in separate processes:

    git worktree add /tmp/base <commit>
    for i in 1 2 3; do python bench/packing_step_time.py --repo /tmp/base; python bench/packing_step_time.py; done
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout whose objectives/ to time (default: this one)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--k", type=int, default=8, help="members in the pack")
    parser.add_argument("--images", type=int, default=512, help="training images (train_subset)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="the best of these is printed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo.resolve()))
    import torch

    from bench.packing_throughput import members, quickstart_config
    from objectives.packed import fit_packed

    torch.set_num_threads(args.threads)
    base = quickstart_config("cpu").model_copy(update={"batch_size": args.batch_size, "train_subset": args.images})
    fit_packed(members(base, args.k), 1)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fit_packed(members(base, args.k), args.epochs)
        times.append(time.perf_counter() - start)
    steps = args.epochs * -(-args.images // args.batch_size)
    print(f"{args.repo}: K = {args.k}, batch {args.batch_size}: {1000 * min(times) / steps:.2f} ms per packed step "
          f"(best of {args.repeats}, {steps} steps each, validation included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
