"""Where a training epoch of the CIFAR-shaped CNN spends its time on a GPU: the share of the wall time the GPU is
busy, the kernels that take it, and the model's arithmetic rate. Tells whether an epoch is bound by the GPU's
kernels or by the host launching them (the cure differs). bench/gpu_check.sh prints its summary line too.

    python bench/profile_epoch.py               # CUDA GPU: studies/cifar10.toml's CNN, batch 512, CIFAR-sized data
    python bench/profile_epoch.py --cpu-smoke   # anywhere: tiny sizes, to keep the script working
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from objectives.data import load_data  # noqa: E402
from objectives.runtime import resolve_runtime  # noqa: E402
from objectives.settings import TrainConfig  # noqa: E402
from objectives.train import fit, new_state  # noqa: E402


def flop_per_image(cfg: TrainConfig) -> float:
    """Forward + backward FLOPs of one training batch, per image, as torch's dispatcher counts them."""
    runtime = resolve_runtime(cfg.device)
    data = load_data(cfg, runtime.device)
    state = new_state(cfg, data, runtime, 1)
    x = data.inputs(data.train_x[: cfg.batch_size])
    if runtime.channels_last:  # as the training loop feeds it
        x = x.contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as flops, runtime.autocast():
        state.model(x).float().sum().backward()
    return flops.get_total_flops() / len(x)


def kernel_time(averages: Any) -> float:
    """Seconds the GPU spent in kernels, from a profile's `key_averages()`."""
    return sum(e.self_device_time_total for e in averages if e.device_type.name == "CUDA") / 1e6


def measure(cfg: TrainConfig, rows: int = 15) -> dict[str, Any]:
    """One warm-up epoch, then one epoch under torch.profiler: wall time, kernel time, rates, the top operators."""
    cuda = resolve_runtime(cfg.device).device.type == "cuda"
    fit(cfg, 1)  # warm-up: data on the device, cuDNN autotuning
    per_image = flop_per_image(cfg)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        result = fit(cfg, 1)
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    m = result.history[-1]
    averages = prof.key_averages()
    busy = kernel_time(averages) if cuda else None
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return {"wall_s": wall, "fit_epoch_s": m["epoch_seconds"], "images": len(result.data.train_y),
            "images_per_s": m["images_per_second"], "gflop_per_image": per_image / 1e9,
            "tflop_per_s": per_image * m["images_per_second"] / 1e12, "kernel_s": busy,
            "table": averages.table(sort_by=sort, row_limit=rows, max_name_column_width=60)}


def describe(r: dict[str, Any]) -> str:
    busy = "" if r["kernel_s"] is None else (f"GPU kernels busy {r['kernel_s']:.3f} s of the profiled epoch's "
                                             f"{r['wall_s']:.3f} s ({100 * r['kernel_s'] / r['wall_s']:.0f}%); ")
    return (f"{busy}model {r['gflop_per_image']:.3f} GFLOP per training image, {r['tflop_per_s']:.1f} TFLOP/s at "
            f"{r['images_per_s']:,.0f} img/s under the profiler")


def main() -> int:
    from bench.gpu_check import CPU_SMOKE, GPU, train_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--rows", type=int, default=15, help="operators listed (default 15)")
    args = parser.parse_args()
    r = measure(train_config(CPU_SMOKE if args.cpu_smoke else GPU), args.rows)
    print(f"one epoch under the profiler: {r['wall_s']:.3f} s wall ({r['fit_epoch_s']:.3f} s as fit counts it), "
          f"{r['images']} training images, {r['images_per_s']:,.0f} img/s")
    print(f"model: {r['gflop_per_image']:.3f} GFLOP per training image (forward + backward) -> "
          f"{r['tflop_per_s']:.1f} TFLOP/s achieved while training")
    if r["kernel_s"] is not None:
        share = 100 * r["kernel_s"] / r["wall_s"]
        print(f"GPU kernels busy {r['kernel_s']:.3f} s of {r['wall_s']:.3f} s ({share:.0f}%): kernel time near an "
              "unprofiled epoch's time means the GPU is the limit; far below, the host")
    print(r["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
