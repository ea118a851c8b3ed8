"""Seconds per epoch of the CIFAR-shaped CNN under one change at a time, side by side in one run: which change
moves the epoch toward issue 11's 0.15 s on an H100-class GPU. Each variant is a whole `fit` (the shipped
training loop) on gpu_check's synthetic CIFAR-sized data; the first epoch is counted apart, the median of
the others is the figure, and the ratio is against the shipped settings measured in the same run.

    python bench/cifar_epoch_variants.py               # CUDA GPU, 45k/5k images, batch 512
    python bench/cifar_epoch_variants.py --cpu-smoke   # anywhere: tiny sizes, to keep the script working
    python bench/cifar_epoch_variants.py --json out.json

Variants: the shipped settings (bf16 autocast and channels_last on CUDA, eager); NCHW instead of channels_last;
batch 1024; augmentation off (what the on-device crop and flip cost); one conv block per stage; and the
pool-first network (the built-in CNN with `pool_first = true`) at the shipped widths and at airbench's
(64-256-256). On a GPU also the shipped network and the airbench-width one with `compile = true` (the first
epoch holds the compiling), and compiled with `mode="reduce-overhead"` (torch.compile's CUDA graphs of the
forward and backward). Then `cuda_graphs = true` (the training loop's own capture of the whole step, optimiser
included, as one CUDA graph: objectives/step_graph.py) for the shipped and the pool-first networks, compiled
too on a GPU (`--only cuda_graphs` runs just those, after the shipped baseline; on the CPU they train eagerly,
as the setting does there). `--kernel-time` adds each variant's GPU kernel time per epoch, which says whether
the GPU or the host sets its pace.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import objectives.train as train_module  # noqa: E402
from bench.gpu_check import Sizes, sizes_for, timed_fit, train_config  # noqa: E402
from bench.profile_epoch import kernel_time  # noqa: E402
from objectives.runtime import Runtime, resolve_runtime  # noqa: E402
from objectives.settings import TrainConfig  # noqa: E402
from objectives.train import fit  # noqa: E402


@contextlib.contextmanager
def compile_mode(mode: str) -> Iterator[None]:
    """`compile = true` compiles with torch.compile's `mode` (for this bench only; fit passes none)."""
    original = torch.compile

    def with_mode(model: Any, **kwargs: Any) -> Any:
        return original(model, mode=mode, **kwargs)

    torch.compile = with_mode  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = original


@contextlib.contextmanager
def nchw() -> Iterator[None]:
    """The runtime objectives/runtime.py decides, with channels_last off (for this bench only)."""
    original = train_module.resolve_runtime

    def contiguous(device: str) -> Runtime:
        return dataclasses.replace(original(device), channels_last=False)

    train_module.resolve_runtime = contiguous
    try:
        yield
    finally:
        train_module.resolve_runtime = original


def widths(sizes: Sizes) -> tuple[list[int], list[int]]:
    """(the shipped widths, airbench's: the first, then the last twice), scaled down with the smoke run's."""
    shipped = list(sizes.widths or (64, 128, 256))
    return shipped, [shipped[0], shipped[-1], shipped[-1]]


def pool_first(stage_widths: list[int]) -> dict[str, Any]:
    """The TrainConfig update that trains the built-in CNN with `pool_first = true` at `stage_widths`, 2 convs each
    (the network measured as a user model, bench/cifar_nets.py, before it was built in)."""
    return {"pool_first": True, "widths": tuple(stage_widths), "blocks_per_stage": 2}


def variants(sizes: Sizes) -> list[tuple[str, dict[str, Any], Callable[[], contextlib.AbstractContextManager[Any]]]]:
    """(name, TrainConfig update, context) for each variant."""
    shipped, airbench = widths(sizes)
    named = {"shipped": "-".join(map(str, shipped)), "airbench": "-".join(map(str, airbench))}
    plain = contextlib.nullcontext
    graphs = functools.partial(compile_mode, "reduce-overhead")  # CUDA graphs: one launch replays a step
    big = 2 * sizes.batch_size
    compiled = [] if sizes.device == "cpu" else [  # compiling takes 20-30 s a network: GPU runs only
        ("shipped, compiled", {"compile": True}, plain),
        (f"pool-first {named['airbench']} x2, compiled", {**pool_first(airbench), "compile": True}, plain),
        ("shipped, compiled with CUDA graphs", {"compile": True}, graphs),
        (f"batch {big}, compiled with CUDA graphs", {"compile": True, "batch_size": big}, graphs),
        (f"pool-first {named['airbench']} x2, compiled with CUDA graphs",
         {**pool_first(airbench), "compile": True}, graphs),
    ]
    # `cuda_graphs = true`: the training loop replays each step as one CUDA graph (objectives/step_graph.py)
    step_graphs = [
        ("shipped, cuda_graphs", {"cuda_graphs": True}, plain),
        (f"batch {big}, cuda_graphs", {"cuda_graphs": True, "batch_size": big}, plain),
        (f"pool-first {named['shipped']} x2, cuda_graphs", {**pool_first(shipped), "cuda_graphs": True}, plain),
    ]
    if sizes.device != "cpu":
        step_graphs += [
            ("shipped, compiled, cuda_graphs", {"compile": True, "cuda_graphs": True}, plain),
            (f"pool-first {named['shipped']} x2, compiled, cuda_graphs",
             {**pool_first(shipped), "compile": True, "cuda_graphs": True}, plain),
            (f"pool-first {named['shipped']} x2, batch {big}, compiled, cuda_graphs",
             {**pool_first(shipped), "compile": True, "cuda_graphs": True, "batch_size": big}, plain),
        ]
    return [
        ("shipped", {}, plain),
        ("NCHW (channels_last off)", {}, nchw),
        (f"batch {big}", {"batch_size": big}, plain),
        ("augmentation off", {"augment": False}, plain),
        ("1 block per stage", {"blocks_per_stage": 1}, plain),
        (f"pool-first {named['shipped']} x2", pool_first(shipped), plain),
        (f"pool-first {named['airbench']} x2 (airbench widths)", pool_first(airbench), plain),
        *compiled,
        *step_graphs,
    ]


def config(sizes: Sizes, update: dict[str, Any]) -> TrainConfig:
    """gpu_check's config (its lr rule for a changed batch size too) with `update` applied."""
    if "batch_size" in update:
        sizes = dataclasses.replace(sizes, batch_size=update["batch_size"])
    return TrainConfig.model_validate({**train_config(sizes).model_dump(), **update})


def kernel_seconds(cfg: TrainConfig) -> float | None:
    """GPU kernel time of one more 1-epoch `fit` under torch.profiler (its caches warm); None on the CPU."""
    if cfg.device != "cuda":
        return None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fit(cfg, 1)
        torch.cuda.synchronize()
    return kernel_time(prof.key_averages())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, to check the script runs")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--only", nargs="*", default=None, metavar="TEXT",
                        help="run only the variants whose name holds one of these (the shipped one always runs)")
    parser.add_argument("--kernel-time", action="store_true",
                        help="also one more epoch per variant under torch.profiler: the GPU's kernel time in it "
                             "(near the epoch's time: the GPU is the limit; far below it: the host)")
    args = parser.parse_args()
    sizes = sizes_for(args.cpu_smoke, "cifar_epoch_variants")
    runtime = resolve_runtime(sizes.device)
    print(f"device {runtime.device}, autocast {runtime.autocast_dtype}, {sizes.train}/{sizes.val} images, "
          f"{sizes.epochs} epochs per variant (the first counted apart)", flush=True)
    rows: list[dict[str, Any]] = []
    chosen = [v for i, v in enumerate(variants(sizes))
              if i == 0 or args.only is None or any(text in v[0] for text in args.only)]
    for name, update, context in chosen:
        start = time.perf_counter()
        try:
            with context():
                r = timed_fit(config(sizes, update), sizes.epochs)
                kernel = kernel_seconds(config(sizes, update)) if args.kernel_time else None
        except Exception as exc:  # one broken variant must not hide the others' figures
            print(f"  {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        rows.append({"variant": name, **r, "kernel_s": kernel, "wall_s": time.perf_counter() - start})
        busy = "" if kernel is None else f", kernels {kernel:.3f} s"
        print(f"  {name}: {r['epoch_s']:.3f} s/epoch (first {r['first_epoch_s']:.2f} s{busy})", flush=True)
    base = rows[0]["epoch_s"]
    print(f"\n{'variant':<58}{'s/epoch':>9}{'kernels s':>10}{'img/s':>11}{'vs shipped':>12}{'peak GiB':>10}")
    for row in rows:
        memory = "n/a" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f}"
        kernel = "n/a" if row["kernel_s"] is None else f"{row['kernel_s']:.3f}"
        print(f"{row['variant']:<58}{row['epoch_s']:>9.3f}{kernel:>10}{row['images_per_s']:>11,.0f}"
              f"{base / row['epoch_s']:>11.2f}x{memory:>10}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
