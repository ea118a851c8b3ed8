"""bench/cifar_epoch_variants.py --cpu-smoke end to end, and its two patches of the training loop, so the
GPU comparison still runs when a GPU is lent. Asserts on the rows written, not on how fast they were."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import objectives.train as train_module
from bench.cifar_epoch_variants import compile_mode, nchw
from tests.benches import run_bench


@pytest.mark.slow
def test_cpu_smoke_writes_one_row_per_variant(tmp_path: Path) -> None:
    out = tmp_path / "variants.json"
    stdout = run_bench("cifar_epoch_variants.py", "--cpu-smoke", "--kernel-time", "--json", str(out))
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == [
        "shipped", "NCHW (channels_last off)", "batch 256", "augmentation off", "1 block per stage",
        "pool-first 8-16 x2", "pool-first 8-16-16 x2 (airbench widths)", "shipped, cuda_graphs",
        "batch 256, cuda_graphs", "pool-first 8-16 x2, cuda_graphs"]  # compiled variants: GPU only
    for row in rows:
        assert row["epoch_s"] > 0 and row["images_per_s"] > 0 and row["first_epoch_s"] > 0
        assert row["kernel_s"] is None and row["peak_memory_gib"] is None  # CPU: no kernel time, no CUDA memory
        assert 0.0 <= row["val_accuracy"] <= 1.0
    assert "FAILED" not in stdout
    assert "vs shipped" in stdout  # the table printed last


@pytest.mark.slow
def test_only_keeps_the_shipped_row_and_the_named_ones(tmp_path: Path) -> None:
    out = tmp_path / "variants.json"
    run_bench("cifar_epoch_variants.py", "--cpu-smoke", "--only", "NCHW", "--json", str(out))
    assert [r["variant"] for r in json.loads(out.read_text())] == ["shipped", "NCHW (channels_last off)"]


def test_nchw_turns_channels_last_off_for_the_loop_and_restores_it() -> None:
    assert train_module.resolve_runtime("cpu").channels_last
    with nchw():
        runtime = train_module.resolve_runtime("cpu")
        assert not runtime.channels_last and runtime.device.type == "cpu"
    assert train_module.resolve_runtime("cpu").channels_last


def test_compile_mode_passes_the_mode_to_torch_compile_and_restores_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []

    def recorder(model: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", recorder)
    with compile_mode("reduce-overhead"):
        model = torch.nn.Linear(2, 2)
        assert torch.compile(model, dynamic=False) is model  # as objectives/train.py calls it
    assert calls == [{"mode": "reduce-overhead", "dynamic": False}]
    assert torch.compile is recorder
