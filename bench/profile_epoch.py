"""Where a training epoch of the CIFAR-shaped CNN spends its time on a GPU: the share of the wall time the GPU is
busy, the kernels that take it, and the model's arithmetic rate against the chip's. Tells whether an epoch is
bound by the GPU's arithmetic, its memory traffic, or the host launching kernels (the cure differs).

    python bench/profile_epoch.py               # CUDA GPU: studies/cifar10.toml's CNN, batch 512, CIFAR-sized data
    python bench/profile_epoch.py --cpu-smoke   # anywhere: tiny sizes, to keep the script working
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_check import CPU_SMOKE, GPU, train_config  # noqa: E402
from objectives.train import fit  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--rows", type=int, default=15, help="kernels listed (default 15)")
    args = parser.parse_args()
    sizes = CPU_SMOKE if args.cpu_smoke else GPU
    cfg = train_config(sizes)
    cuda = sizes.device == "cuda"
    fit(cfg, 1)  # warm-up: data on the device, cuDNN autotuning

    counted: dict[str, float] = {}



    # FLOPs of one training step (forward + backward) on one batch, counted by torch's dispatcher
    from objectives.data import load_data
    from objectives.runtime import resolve_runtime
    from objectives.train import new_state

    runtime = resolve_runtime(cfg.device)
    data = load_data(cfg, runtime.device)
    state = new_state(cfg, data, runtime, 1)
    x = data.inputs(data.train_x[: cfg.batch_size]).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as flops, runtime.autocast():
        state.model(x).float().sum().backward()
    counted["flop_per_image"] = flops.get_total_flops() / cfg.batch_size

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        result = fit(cfg, 1)
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    m = result.history[-1]
    images = len(result.data.train_y)
    events = [e for e in prof.key_averages() if cuda and e.device_type.name == "CUDA"] if cuda else []
    busy = sum(e.self_device_time_total for e in events) / 1e6 if cuda else float("nan")
    rate = counted["flop_per_image"] * m["images_per_second"] / 1e12
    print(f"one epoch under the profiler: {wall:.3f} s wall ({m['epoch_seconds']:.3f} s as fit counts it), "
          f"{images} training images, {m['images_per_second']:,.0f} img/s")
    print(f"model: {counted['flop_per_image'] / 1e9:.3f} GFLOP per training image (forward + backward) -> "
          f"{rate:.1f} TFLOP/s achieved while training")
    if cuda:
        print(f"GPU kernels busy {busy:.3f} s of {wall:.3f} s ({100 * busy / wall:.0f}%): below ~80% the host "
              "(Python, kernel launches) is the limit, not the GPU")
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60)
    else:
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
