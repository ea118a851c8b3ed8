"""A real CUDA out-of-memory, on a real GPU: recognised as one, its memory given back, the next trial trains.
Marked ``gpu``: deselected without CUDA; bench/gpu_check.sh runs it. tests/search/test_failure_paths.py covers the
same path through a whole study with a model that raises the error CUDA raises."""

from __future__ import annotations

import math

import pytest
import torch

from objectives.data import clear_data_cache
from objectives.settings import TrainConfig
from objectives.train import fit
from search.failures import drop_frames, failure_reason, is_out_of_memory, release_memory

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
