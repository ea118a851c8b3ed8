import contextlib
import random

import pytest
import torch

from objectives.runtime import resolve_runtime, seed_everything

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
needs_cuda = pytest.mark.gpu  # deselected without CUDA (tests/services.py)


def test_cpu_is_fp32_channels_last_with_a_fused_optimizer() -> None:
    rt = resolve_runtime("cpu")
    assert rt.device == torch.device("cpu")
    assert rt.autocast_dtype is None and rt.channels_last is True and rt.fused_optimizer is True
    ctx = rt.autocast()
    assert isinstance(ctx, contextlib.nullcontext)
    with ctx:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


no_mps = pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")


@no_cuda
@no_mps
def test_auto_is_the_cpu_without_an_accelerator() -> None:
    assert resolve_runtime("auto") == resolve_runtime("cpu")
    assert resolve_runtime("auto").device == torch.device("cpu")


@needs_cuda
def test_auto_is_cuda_with_a_cuda_gpu_even_when_mps_is_there_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_runtime("auto").device.type == "cuda"


@no_cuda
def test_auto_is_mps_on_an_apple_gpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """An Apple GPU is not here: the check only says MPS is there, to test the order of preference."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_runtime("auto") == resolve_runtime("mps")
    assert resolve_runtime("auto").device == torch.device("mps")


@no_cuda
def test_missing_cuda_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_runtime("cuda")


@no_mps
def test_missing_mps_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no Apple GPU"):
        resolve_runtime("mps")


def test_unknown_device_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown device"):
        resolve_runtime("tpu")


@needs_cuda
def test_cuda_uses_bf16_autocast_and_channels_last() -> None:
    rt = resolve_runtime("cuda")
    assert rt.device.type == "cuda" and rt.channels_last
    assert torch.backends.cudnn.benchmark
    with rt.autocast():
        out = torch.ones(4, 4, device="cuda") @ torch.ones(4, 4, device="cuda")
    assert out.dtype == rt.autocast_dtype == torch.bfloat16


def test_seed_everything_repeats_python_and_torch_draws() -> None:
    seed_everything(123)
    first = (random.random(), torch.rand(3))
    seed_everything(123)
    second = (random.random(), torch.rand(3))
    assert first[0] == second[0]
    assert torch.equal(first[1], second[1])
    seed_everything(124)
    assert not torch.equal(torch.rand(3), first[1])
