"""What a failed trial records, and the timeout alarm: pure pieces of TrialSession's exception table."""

from __future__ import annotations

import threading
import time

import pytest

from search.failures import TrialTimeout, arm_timeout, disarm_timeout, failure_reason, is_out_of_memory


def test_failure_reasons() -> None:
    assert failure_reason(TrialTimeout("late")) == "trial_timeout"
    assert failure_reason(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "out_of_memory"
    assert failure_reason(MemoryError("out of memory")) == "out_of_memory"
    cpu = "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"
    assert failure_reason(RuntimeError(cpu)) == "out_of_memory"  # torch's CPU allocator says it so
    assert failure_reason(ValueError("first line\nsecond line")) == "error: ValueError: first line"
    assert failure_reason(KeyError()) == "error: KeyError: "
    assert len(failure_reason(RuntimeError("x" * 2000))) == 500
    assert not is_out_of_memory(ValueError("out of memory"))  # only the errors torch raises for it


def test_timeout_fires_in_the_main_thread_and_not_elsewhere() -> None:
    assert arm_timeout(None) is False
    assert arm_timeout(0.05) is True
    with pytest.raises(TrialTimeout):
        time.sleep(1)
    disarm_timeout()
    armed: list[bool] = []
    worker = threading.Thread(target=lambda: armed.append(arm_timeout(0.05)))
    worker.start()
    worker.join()
    assert armed == [False]
