"""Issue 11's 0.15 s CIFAR epoch: what replaying each training step as one CUDA graph would give.

On one H100 (BENCHMARKS.md section 9) the shipped CIFAR-shaped CNN's epoch took 0.39-0.52 s while its GPU
kernels took 0.33 s: the host launching about 300 kernels a step sets the pace, and the pool-first network
of bench/cifar_nets.py halves the kernels (0.165 s compiled) without making the epoch shorter. A CUDA graph
replays a whole step (forward, backward, optimiser step) from one launch. This bench measures that before
the training loop is changed: its own loop, `objectives.train`'s pieces (the data, the model, the optimiser,
the schedule, the same augmentation), with the step captured once per epoch (the learning rate is a number
baked into the captured optimiser kernels, so each epoch's rate needs its own capture; the capture's time is
reported apart and counted in the epoch).

What differs from `fit`, on purpose: the last, partial batch of each epoch is left out (a graph has one
shape), so figures are images per second; dropout draws from torch's default generator (a graph-safe one);
three untimed warm-up steps on the first batch before the first capture (cuDNN's autotuning, compiling).
`torch.cuda.graph` synchronises, collects garbage and empties the allocator's cache before each capture: that
is in the capture's time, and the table shows the epoch without it too (what one capture for all epochs, the
learning rate as a tensor, would cost).

    python bench/cuda_graph_epoch.py               # CUDA GPU: the shipped CNN and the pool-first one,
                                                   # eager and graphed, plain and compiled
    python bench/cuda_graph_epoch.py --cpu-smoke   # anywhere: the same loop without graphs, tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cifar_epoch_variants import config, pool_first, widths  # noqa: E402
from bench.gpu_check import Sizes, sizes_for  # noqa: E402
from objectives.augment import augment_batch  # noqa: E402
from objectives.data import batch_indices, load_data  # noqa: E402
from objectives.model import GeneratorDropout  # noqa: E402
from objectives.runtime import resolve_runtime  # noqa: E402
from objectives.settings import TrainConfig  # noqa: E402
from objectives.train import augmentation, evaluate, new_state, optimizer_step  # noqa: E402


def run(cfg: TrainConfig, epochs: int, graphed: bool) -> dict[str, Any]:
    """`epochs` epochs of this bench's loop; per epoch: seconds (training + validation), capture seconds,
    images trained, validation accuracy."""
    runtime = resolve_runtime(cfg.device)
    cuda = runtime.device.type == "cuda"
    graphed = graphed and cuda
    data = load_data(cfg, runtime.device)
    state = new_state(cfg, data, runtime, epochs)
    model, optimizer, generator = state.model, state.optimizer, state.generator
    for module in model.modules():  # torch's default generator: a graph replays its draws with fresh offsets
        if isinstance(module, GeneratorDropout):
            module.generator = None
    forward = torch.compile(model, dynamic=False) if cfg.compile else model
    padding, flip = augmentation(cfg, data)
    dtype = runtime.autocast_dtype

    def autocast() -> contextlib.AbstractContextManager[Any]:  # no weight-cast cache: a graph must recast
        return torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext()

    def batch(idx: Tensor) -> tuple[Tensor, Tensor]:
        x, y = data.take(data.train_x, idx), data.train_y[idx.to(runtime.device)]
        if padding or flip:
            x = augment_batch(x, padding, flip, generator)
        return (x.contiguous(memory_format=torch.channels_last) if runtime.channels_last else x), y

    total = torch.zeros((), device=runtime.device)

    def step(x: Tensor, y: Tensor) -> None:
        with autocast():
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        loss.backward()
        optimizer_step(cfg, model, optimizer)
        total.add_(loss.detach())

    n, size = len(data.train_y), cfg.batch_size
    static_x, static_y = batch(batch_indices(n, size, generator, data.x_device)[0])
    side = torch.cuda.Stream() if graphed else None  # warm-up and every capture on one stream (its cuBLAS handle)
    if side is not None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                optimizer.zero_grad(set_to_none=True)
                step(static_x, static_y)
        torch.cuda.current_stream().wait_stream(side)

    rows = []
    for epoch in range(epochs):
        state.scheduler.start_epoch(epoch)
        full = [idx for idx in batch_indices(n, size, generator, data.x_device) if len(idx) == size]
        _sync(cuda)
        start = time.perf_counter()
        total.zero_()
        replay: Callable[[], None] | None = None
        capture_s = 0.0
        if graphed:
            optimizer.zero_grad(set_to_none=True)  # the graph's backward writes the gradients it allocates
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                step(static_x, static_y)
            _sync(cuda)
            capture_s = time.perf_counter() - start
            total.zero_()  # capturing ran nothing, but keep the count exact
            replay = graph.replay
        for idx in full:
            x, y = batch(idx)
            if replay is not None:
                static_x.copy_(x)
                static_y.copy_(y)
                replay()
            else:
                optimizer.zero_grad(set_to_none=True)
                step(x, y)
        val = evaluate(forward, data.val_x, data.val_y, runtime, cfg.eval_batch_size, data.num_classes, data.inputs)
        _sync(cuda)
        seconds = time.perf_counter() - start
        trained = len(full) * size
        rows.append({"epoch_s": seconds, "capture_s": capture_s, "images": trained,
                     "images_per_s": trained / seconds, "train_loss": total.item() / max(1, len(full)),
                     "val_accuracy": val["accuracy"]})
    return {"epochs": rows, "graphed": graphed}


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def summary(name: str, result: dict[str, Any], full_epoch_images: int) -> dict[str, Any]:
    """Steady figures (first epoch apart), with the seconds an epoch of all `full_epoch_images` would take."""
    rows = result["epochs"]
    steady = rows[1:] or rows
    rate = statistics.median(r["images_per_s"] for r in steady)
    uncaptured = statistics.median(r["images"] / (r["epoch_s"] - r["capture_s"]) for r in steady)
    return {"variant": name, "graphed": result["graphed"], "images_per_s": rate,
            "epoch_s_full": full_epoch_images / rate, "epoch_s_full_no_capture": full_epoch_images / uncaptured,
            "capture_s": statistics.median(r["capture_s"] for r in steady),
            "first_epoch_s": rows[0]["epoch_s"], "train_loss": rows[-1]["train_loss"],
            "val_accuracy": rows[-1]["val_accuracy"]}


def variants(sizes: Sizes) -> list[tuple[str, dict[str, Any], bool]]:
    airbench = pool_first(widths(sizes)[1])
    rows = [("shipped, eager", {}, False), ("shipped, graphed", {}, True),
            ("pool-first airbench widths, eager", airbench, False),
            ("pool-first airbench widths, graphed", airbench, True)]
    if sizes.device == "cuda":  # compiling takes 20-30 s a network: GPU runs only
        rows += [("shipped, compiled + graphed", {"compile": True}, True),
                 ("pool-first airbench widths, compiled + graphed", {**airbench, "compile": True}, True)]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, no graphs")
    parser.add_argument("--epochs", type=int, default=4, help="per variant, the first counted apart (default 4)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    sizes = sizes_for(args.cpu_smoke, "cuda_graph_epoch")
    print(f"device {sizes.device}, {sizes.train}/{sizes.val} images, batch {sizes.batch_size}, {args.epochs} epochs "
          "per variant (the first apart); the last partial batch is left out, so 's/epoch' is the full epoch's "
          "images at the measured rate", flush=True)
    rows, failed = [], False
    for name, update, graphed in variants(sizes):
        try:
            result = run(config(sizes, update), args.epochs, graphed)
        except Exception as exc:  # one broken variant must not hide the others' figures
            print(f"  {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            failed = True
            continue
        row = summary(name, result, sizes.train)
        rows.append(row)
        print(f"  {name}: {row['epoch_s_full']:.3f} s/epoch, capture {row['capture_s']:.3f} s, first epoch "
              f"{row['first_epoch_s']:.2f} s, train loss {row['train_loss']:.3f}", flush=True)
    print(f"\n{'variant':<50}{'s/epoch':>9}{'no capture':>12}{'capture s':>11}{'img/s':>11}{'val acc':>9}")
    for row in rows:
        if "graphed" in row["variant"] and not row["graphed"]:
            row["variant"] += " (eager here: no CUDA)"
        print(f"{row['variant']:<50}{row['epoch_s_full']:>9.3f}{row['epoch_s_full_no_capture']:>12.3f}"
              f"{row['capture_s']:>11.3f}{row['images_per_s']:>11,.0f}{row['val_accuracy']:>9.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
