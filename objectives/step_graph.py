"""A training step replayed as one CUDA graph (`cuda_graphs = true`): one launch per batch instead of the few
hundred kernel launches a CNN's forward, backward and optimiser step take, which is what sets a small CNN's pace
on a fast GPU (the CIFAR-shaped CNN on an H100: 0.33 s of kernels in a 0.39-0.52 s epoch; with this, 1.31x on an
H200, and 0.132 s an epoch with `pool_first` and `compile`: BENCHMARKS.md section 9).

When: the first WARMUP full-size batches of a trial run eagerly on a side stream (cuDNN's autotuning, the
optimiser's lazily made state and compiling happen there, outside any capture); then the step is captured once,
at the next full batch, and replayed for every full batch of the trial. The learning rate is a tensor on the GPU
(`train.lr_as_tensors`) that the schedule sets in place each epoch and the replays read; as a number it would be
a constant of the captured kernels, and each epoch would cost a new capture (11-14 ms on an H100). An epoch's
last, partial batch runs eagerly: a graph has one shape.

What the step must obey: it reads only `x`, `y` and tensors that live as long as the graph (model, optimiser
state, the trial's loss total); it starts from `zero_grad(set_to_none=True)` so its backward allocates the
gradients the replays then overwrite; autocast runs without its weight cache (`Runtime.autocast(cache=False)`);
random draws inside it come from torch's default CUDA generator, which a graph advances on each replay.

An error inside a capture (an out-of-memory in the graph's own memory pool, the trial's timeout alarm) comes out
as the step raised it, so the trial fails with its reason, and the GPU serves the next trial
(tests/search/test_gpu_memory.py, run on an H100).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

WARMUP = 3  # eager steps before the first capture, as in torch's whole-network capture example

Step = Callable[[Tensor, Tensor], None]


_SIDE: dict[int, torch.cuda.Stream] = {}


def side_stream() -> torch.cuda.Stream:
    """The current device's one side stream for warm-ups and captures, made once per process: each stream that
    runs a matrix product gets its own cuBLAS workspace (65 MiB measured on an H100), held for the process's
    life, so a stream per trial would keep one more for every trial a worker runs."""
    device = torch.cuda.current_device()
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream(device)
    return _SIDE[device]


class GraphedStep:
    """Calls `step(x, y)` for a batch, through a CUDA graph for batches of `batch_size` images.

    `zero_grad` runs before every eager step and before the capture (never inside the graph)."""

    def __init__(self, step: Step, zero_grad: Callable[[], None], batch_size: int) -> None:
        self.step, self.zero_grad, self.batch_size = step, zero_grad, batch_size
        self.side = side_stream()  # warm-up and every capture on one stream
        self.eager_full_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.captures = 0

    def __call__(self, x: Tensor, y: Tensor) -> None:
        if len(y) != self.batch_size:
            self._eager(x, y)
        elif self.eager_full_steps < WARMUP:
            self._on_side_stream(x, y)
        elif self.graph is None:
            self._capture(x, y)
            assert self.graph is not None
            self.graph.replay()  # capturing ran nothing: this batch is trained by the first replay
        else:
            assert self.x is not None and self.y is not None
            self.x.copy_(x)
            self.y.copy_(y)
            self.graph.replay()

    def _on_side_stream(self, x: Tensor, y: Tensor) -> None:
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            self._eager(x, y)
        torch.cuda.current_stream().wait_stream(self.side)
        self.eager_full_steps += 1

    def _eager(self, x: Tensor, y: Tensor) -> None:
        with warnings.catch_warnings():  # AdamW's warning that a capturable optimiser runs uncaptured: planned here
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            self.zero_grad()
            self.step(x, y)

    def _capture(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x.clone(), y.clone()  # static inputs: later batches are copied into them
        self.zero_grad()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work (none of this project's, but a user's hook may start one) does
        # not break this capture
        with torch.cuda.graph(graph, stream=self.side, capture_error_mode="thread_local"):
            self.step(self.x, self.y)
        self.graph = graph
        self.captures += 1
