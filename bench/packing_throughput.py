"""Trial packing throughput: K trials packed into one grouped network against the same K trained one after another.

For K = 1, 2, 4, 8 it trains K configurations of one architecture and batch size (different lr, weight decay,
dropout and seed, as K trials of a study would be) twice: packed (`objectives.packed.fit_packed`, one
forward/backward for all K) and sequentially (`objectives.train.fit` K times). It prints training images per
second (K x train images x epochs over the wall time, validation included, as a study spends it) of each and
their ratio. Both run in the same process, interleaved per round (packed, then sequential, for each K), with the
median over rounds, so a machine shared with other jobs slows both alike.

Models: the quickstart CNN (studies/quickstart.toml: digits 8x8, widths 32-64) and the CIFAR-shaped CNN
(studies/cifar10.toml: widths 64-128-256 x2 on synthetic 3x32x32 data; on the CPU a subset, see --cifar-train).

    .venv/bin/python bench/packing_throughput.py                      # both models, this machine's device
    .venv/bin/python bench/packing_throughput.py --models quickstart --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cifar_synthetic import cifar_synthetic  # noqa: E402
from objectives.data import load_data  # noqa: E402
from objectives.packed import fit_packed  # noqa: E402
from objectives.runtime import resolve_runtime  # noqa: E402
from objectives.settings import TrainConfig  # noqa: E402
from objectives.train import fit  # noqa: E402
from search.config import load_settings  # noqa: E402


def quickstart_config(device: str) -> TrainConfig:
    objective = load_settings(REPO / "studies" / "quickstart.toml").objective.model_dump()
    return TrainConfig.model_validate({**objective, "device": device, "batch_size": 64})


def cifar_config(device: str, train: int, val: int) -> TrainConfig:
    # cuda_graphs: the study turns it on; graphed trials do not pack, so both sides run without
    return cifar_synthetic(train, val, 100, device=device, compile=False, cuda_graphs=False)


def members(base: TrainConfig, k: int) -> list[TrainConfig]:
    """K trials of one pack: same architecture and batch size, their own optimisation settings and seed."""
    return [base.model_copy(update={"lr": base.lr * (1.0 + 0.3 * i), "weight_decay": base.weight_decay * (i + 1),
                                    "dropout": 0.1 * (i % 4), "seed": base.seed + i}) for i in range(k)]


def images_per_second(cfgs: list[TrainConfig], epochs: int, packed: bool) -> float:
    cuda = cfgs[0].device == "cuda" or (cfgs[0].device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = fit_packed(cfgs, epochs) if packed else [fit(cfg, epochs) for cfg in cfgs]
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return sum(len(r.data.train_y) * r.epochs_run for r in results) / wall


def compare(base: TrainConfig, ks: tuple[int, ...] = (1, 2, 4, 8), epochs: int = 1, rounds: int = 3,
            ) -> list[dict[str, Any]]:
    """Per K: median packed and sequential images/s over `rounds` interleaved rounds, and their ratio.
    `ratio_vs_one` compares packed K against one trial at a time (K = 1 sequential)."""
    load_data(base, resolve_runtime(base.device).device)  # made and placed once, outside the timings
    for k in ks:  # warm-up: allocator, kernels, and cuDNN's autotuning for each K's grouped-convolution shapes
        fit_packed(members(base, k), 1)
    fit(base, 1)
    packed: dict[int, list[float]] = {k: [] for k in ks}
    sequential: dict[int, list[float]] = {k: [] for k in ks}
    for i in range(rounds):
        for k in ks:
            cfgs = members(base, k)
            packed[k].append(images_per_second(cfgs, epochs, packed=True))
            sequential[k].append(images_per_second(cfgs, epochs, packed=False))
            print(f"  (round {i + 1}, K={k}: {packed[k][-1]:,.0f} packed vs {sequential[k][-1]:,.0f} sequential img/s)",
                  file=sys.stderr, flush=True)
    one = statistics.median(v for k in ks for v in sequential[k])  # sequential images/s does not depend on K
    rows = []
    for k in ks:
        p, s = statistics.median(packed[k]), statistics.median(sequential[k])
        rows.append({"k": k, "packed_images_per_s": p, "sequential_images_per_s": s, "ratio": p / s,
                     "ratio_vs_one": p / one})
    return rows


def describe(rows: list[dict[str, Any]]) -> str:
    return "; ".join(f"K={r['k']}: {r['packed_images_per_s']:,.0f} img/s packed vs {r['sequential_images_per_s']:,.0f} "
                     f"sequential ({r['ratio']:.2f}x)" for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=["quickstart", "cifar"], choices=["quickstart", "cifar"])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--epochs", type=int, default=1, help="epochs per trial and measurement (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is printed")
    parser.add_argument("--cifar-train", type=int, default=None,
                        help="CIFAR-shaped train images (default: 45000 on a GPU, 1024 on the CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_runtime(args.device).device.type
    cifar_train = args.cifar_train or (45_000 if device == "cuda" else 1024)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; {args.epochs} epoch(s) "
          f"per trial, median of {args.rounds} interleaved rounds")
    for name in args.models:
        base = quickstart_config(device) if name == "quickstart" else cifar_config(device, cifar_train,
                                                                                  max(100, cifar_train // 9))
        data = load_data(base, resolve_runtime(base.device).device)
        print(f"\n{name}: widths {'-'.join(map(str, base.widths))} x{base.blocks_per_stage}, batch {base.batch_size}, "
              f"{len(data.train_y)} train / {len(data.val_y)} val images of {data.in_channels}x{data.image_size}x"
              f"{data.image_size}")
        print(f"{'K':>3}  {'packed img/s':>13}  {'K sequential img/s':>19}  {'packed/sequential':>17}")
        for r in compare(base, tuple(args.ks), args.epochs, args.rounds):
            print(f"{r['k']:>3}  {r['packed_images_per_s']:>13,.0f}  {r['sequential_images_per_s']:>19,.0f}  "
                  f"{r['ratio']:>16.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
