"""A real CUDA out-of-memory, on a real GPU: recognised as one, its memory given back, the next trial trains; the
same, and the trial's timeout alarm, inside a CUDA graph capture (`cuda_graphs = true`).
Marked ``gpu``: deselected without CUDA; bench/gpu_check.sh runs it. tests/search/test_failure_paths.py covers the
same path through a whole study with a model that raises the error CUDA raises."""

from __future__ import annotations

import math
import signal
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch

import objectives.train as train_module
from objectives.data import clear_data_cache
from objectives.settings import TrainConfig
from objectives.step_graph import GraphedStep
from objectives.train import fit
from search.failures import (
    arm_timeout,
    disarm_timeout,
    drop_frames,
    failure_reason,
    is_out_of_memory,
    release_memory,
)

pytestmark = pytest.mark.gpu
HEADROOM = 1 << 30  # what the capped allocator may hold beyond what was in use before


def test_a_real_cuda_out_of_memory_fails_with_its_reason_frees_the_memory_and_the_next_trial_trains() -> None:
    clear_data_cache()
    release_memory()
    before = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + HEADROOM) / total))
    try:
        # 64x64 images, batch 4096, 64 channels: one activation alone is 2 GiB in bf16, over the 1 GiB headroom
        big = TrainConfig(device="cuda", dataset="synthetic", synthetic_shape=(3, 64, 64), synthetic_train=4096,
                          synthetic_val=256, synthetic_test=256, widths=(64, 128), batch_size=4096)
        with pytest.raises(Exception) as caught:
            fit(big, 1)
        assert is_out_of_memory(caught.value) and failure_reason(caught.value) == "out_of_memory"
        drop_frames(caught.value)
        del caught
        clear_data_cache()
        release_memory()
        assert torch.cuda.memory_allocated() <= before + (16 << 20)  # nothing of the failed trial is left

        small = fit(TrainConfig(device="cuda", train_subset=1024, widths=(16, 32), batch_size=64, lr=3e-3), 4)
        assert all(math.isfinite(m["train_loss"]) for m in small.history)
        assert small.history[-1]["val_accuracy"] > 0.6  # 10 digit classes: far above chance
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        clear_data_cache()
        release_memory()


class _FailsInItsCapture(GraphedStep):
    """A GraphedStep whose capture fails inside the captured step, as `fail` arranges: `fail(step)` is called just
    before the capture and may wrap `step.step`. Records the error the capture raised (the trial ends there)."""

    fail: Callable[[GraphedStep], None] = staticmethod(lambda step: None)  # type: ignore[assignment]
    raised: list[BaseException] = []

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        _FailsInItsCapture.fail(self)
        try:
            super()._capture(x, y)
        except BaseException as exc:
            _FailsInItsCapture.raised.append(exc)
            raise


def _cap_the_allocator_here(step: GraphedStep) -> None:
    """Nothing beyond what the allocator holds now: a capture allocates from its own pool, so it must ask for more."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_reserved() / total)


def _alarm_after_the_step(step: GraphedStep) -> None:
    """SIGALRM (the trial's timeout, armed by search.failures.arm_timeout) arrives inside the captured step."""
    inner = step.step

    def step_then_alarm(x: torch.Tensor, y: torch.Tensor) -> None:
        inner(x, y)
        signal.raise_signal(signal.SIGALRM)

    step.step = step_then_alarm


def _in_the_captured_step(exc: BaseException) -> bool:
    return any(frame.name == "step_then_alarm" or frame.name == "step" and frame.filename.endswith("train.py")
               for frame in traceback.extract_tb(exc.__traceback__))


@pytest.mark.parametrize("failure", ["out_of_memory", "trial_timeout"])
def test_an_error_inside_a_cuda_graph_capture_fails_the_trial_with_its_reason_and_the_next_graphed_trial_trains(
    monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """`cuda_graphs = true`: the first capture of a trial meets a real out-of-memory (the allocator capped at what
    it holds, so the graph's own memory pool cannot grow) or the trial's timeout alarm. The trial fails with that
    error, recognised for what it is; nothing of it stays in GPU memory; the next graphed trial on the same GPU
    captures its step and learns."""
    cfg = TrainConfig(device="cuda", train_subset=1024, widths=(16, 32), batch_size=64, lr=3e-3, cuda_graphs=True)
    fit(cfg.model_copy(update={"train_subset": 512}), 1)  # the process's side stream made, its cuBLAS workspace too
    clear_data_cache()
    release_memory()
    before = torch.cuda.memory_allocated()  # what a failed trial must not add to: its side stream is the same one
    monkeypatch.setattr(train_module, "GraphedStep", _FailsInItsCapture)
    _FailsInItsCapture.raised = []
    _FailsInItsCapture.fail = _cap_the_allocator_here if failure == "out_of_memory" else _alarm_after_the_step
    handler = signal.getsignal(signal.SIGALRM)
    armed = arm_timeout(3600.0) if failure == "trial_timeout" else False
    try:
        with pytest.raises(BaseException) as caught:
            fit(cfg, 2)
    finally:
        disarm_timeout()
        signal.signal(signal.SIGALRM, handler)
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert failure == "out_of_memory" or armed
    (raised,) = _FailsInItsCapture.raised
    assert caught.value is raised and _in_the_captured_step(raised), traceback.format_exception(raised)
    assert failure_reason(raised) == failure
    drop_frames(caught.value)
    del caught, raised
    _FailsInItsCapture.raised = []
    clear_data_cache()
    release_memory()
    assert torch.cuda.memory_allocated() <= before + (16 << 20)

    made: list[GraphedStep] = []

    class Counted(GraphedStep):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(train_module, "GraphedStep", Counted)
    again = fit(cfg, 4)
    assert [s.captures for s in made] == [1]
    assert all(math.isfinite(m["train_loss"]) for m in again.history)
    assert again.history[-1]["val_accuracy"] > 0.6
