"""The CUDA path of training, on a real GPU: data on the device, bf16, channels_last, the fused optimiser,
streamed data, packing and checkpoints. Marked ``gpu``: deselected without CUDA; bench/gpu_check.sh runs them."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch

import objectives.train as train_module
from objectives.packed import fit_packed
from objectives.settings import TrainConfig
from objectives.step_graph import WARMUP, GraphedStep
from objectives.train import FitResult, TrainingState, fit

pytestmark = pytest.mark.gpu
DEVICE = "cuda"  # a name, so the same tests can be tried on the CPU by hand: DEVICE = "cpu"
DIGITS = {"train_subset": 1024, "widths": (16, 32), "batch_size": 64, "lr": 3e-3}


def _cfg(**extra: Any) -> TrainConfig:
    return TrainConfig(**{"device": DEVICE, **DIGITS, **extra})


def _learned(history: list[dict[str, float]]) -> None:
    """Every loss finite, and the last accuracy far above chance (10 digit classes)."""
    assert all(math.isfinite(m["train_loss"]) and math.isfinite(m["val_loss"]) for m in history), history
    assert history[-1]["val_accuracy"] > 0.6, history


def test_a_trial_trains_on_the_gpu_with_its_data_there_in_bf16_channels_last_and_a_fused_step() -> None:
    seen: dict[str, Any] = {}

    def look(epoch: int, metrics: dict[str, float], state: TrainingState) -> bool:
        conv = next(m for m in state.model.modules() if isinstance(m, torch.nn.Conv2d))
        seen["channels_last"] = conv.weight.is_contiguous(memory_format=torch.channels_last)
        seen["fused"] = all(g.get("fused") for g in state.optimizer.param_groups)
        return False

    result = fit(_cfg(), 4, look)
    assert result.data.placement == "device"
    assert result.data.train_x.device.type == DEVICE and result.data.train_y.device.type == DEVICE
    assert next(result.model.parameters()).device.type == DEVICE
    assert seen == {"channels_last": True, "fused": True}
    _learned(result.history)


def test_streamed_data_stays_in_pinned_host_memory_and_trains_as_well() -> None:
    result = fit(_cfg(data_placement="stream"), 4)
    assert result.data.placement == "stream"
    assert result.data.train_x.device.type == "cpu" and result.data.train_y.device.type == DEVICE
    _learned(result.history)


def _whole_and_resumed(cfg: TrainConfig) -> tuple[FitResult, FitResult]:
    """4 epochs of `cfg`, and the same trial resumed from its epoch-1 state saved and loaded like `last.pt`
    (torch.save, then torch.load with weights_only=True)."""
    saved: dict[str, bytes] = {}

    def keep(epoch: int, metrics: dict[str, float], state: TrainingState) -> bool:
        if epoch == 1:
            buffer = io.BytesIO()
            torch.save(state.state_dict(), buffer)
            saved["last.pt"] = buffer.getvalue()
        return False

    whole = fit(cfg, 4, keep)
    return whole, fit(cfg, 4, resume=torch.load(io.BytesIO(saved["last.pt"]), weights_only=True))


def test_a_gpu_checkpoint_saved_and_loaded_like_last_pt_resumes_the_trial() -> None:
    """`last.pt` of a GPU trial, through torch.save/torch.load(weights_only=True), continues where it stopped."""
    whole, resumed = _whole_and_resumed(_cfg(seed=3))
    assert resumed.epochs_run == 4 and resumed.history[:2] == whole.history[:2]
    _learned(resumed.history)
    # cuDNN's autotuned kernels and bf16 need not repeat bit for bit: the resumed curve follows the same course
    assert resumed.history[-1]["val_accuracy"] == pytest.approx(whole.history[-1]["val_accuracy"], abs=0.1)


def test_packed_members_learn_on_the_gpu_as_they_do_alone() -> None:
    cfgs = [_cfg(seed=1), _cfg(seed=2, lr=1e-3, dropout=0.2), _cfg(seed=4, weight_decay=1e-3)]
    packed = fit_packed(cfgs, 3)
    alone = fit(cfgs[0], 3)
    for result in packed:
        assert next(result.model.parameters()).device.type == DEVICE
        _learned(result.history)
    # bf16 and grouped convolutions round differently from plain ones: the same course, not the same bits
    assert packed[0].history[-1]["val_accuracy"] == pytest.approx(alone.history[-1]["val_accuracy"], abs=0.1)
    assert packed[0].history[0]["train_loss"] == pytest.approx(alone.history[0]["train_loss"], rel=0.1)


def test_compiled_training_on_the_gpu_learns() -> None:
    result = fit(_cfg(compile=True), 3)
    _learned(result.history)


class _Recorded(GraphedStep):
    made: list[GraphedStep] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _Recorded.made.append(self)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_cuda_graphs_replay_every_full_step_and_follow_the_eager_curve(
    monkeypatch: pytest.MonkeyPatch, optimizer: str
) -> None:
    """`cuda_graphs = true`: WARMUP eager steps, then one capture for the whole trial, whose lr the schedule sets
    each epoch; the last partial batch (batch 100 of 1024 training images leaves 24) runs eagerly. Without dropout
    the graphed steps compute what eager steps do."""
    monkeypatch.setattr(train_module, "GraphedStep", _Recorded)
    _Recorded.made.clear()
    kw = {"batch_size": 100, "optimizer": optimizer, "dropout": 0.0, "seed": 5, "grad_clip": 1.0,
          **({"lr": 0.05} if optimizer == "sgd" else {})}
    eager = fit(_cfg(**kw), 4)
    graphed = fit(_cfg(cuda_graphs=True, **kw), 4)
    (step,) = _Recorded.made
    assert step.eager_full_steps == WARMUP and step.captures == 1
    _learned(graphed.history)
    for a, b in zip(eager.history, graphed.history, strict=True):  # bf16 and autotuned kernels: close, not equal
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.1, abs=0.02)
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=0.1)


def test_cuda_graphs_with_dropout_compile_and_a_resumed_adamw_trial_learn() -> None:
    whole, resumed = _whole_and_resumed(_cfg(cuda_graphs=True, dropout=0.3, compile=True, seed=2))
    _learned(whole.history)
    assert resumed.epochs_run == 4 and resumed.history[:2] == whole.history[:2]
    _learned(resumed.history)


def test_cuda_graphs_with_streamed_data_replay_every_full_step_and_learn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Data left in pinned host memory (`data_placement = "stream"`): each batch is copied to the GPU, then into
    the graph's static inputs, and replayed; the one capture happens and the trial learns."""
    monkeypatch.setattr(train_module, "GraphedStep", _Recorded)
    _Recorded.made.clear()
    result = fit(_cfg(data_placement="stream", cuda_graphs=True, batch_size=100, dropout=0.0), 4)
    assert result.data.placement == "stream" and result.data.train_x.device.type == "cpu"
    (step,) = _Recorded.made
    assert step.eager_full_steps == WARMUP and step.captures == 1
    _learned(result.history)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_one_captured_step_reads_the_lr_the_schedule_sets_each_epoch(
    monkeypatch: pytest.MonkeyPatch, optimizer: str
) -> None:
    """The step is captured once, in epoch 0; after epoch 1 the schedule's lr drops to 0 (its base lr set to 0),
    so from epoch 2 every replayed and eager step must leave the weights as they are: with the lr a constant of
    the captured kernels they would go on moving. SGD's decoupled decay (1 - lr * wd) included."""
    monkeypatch.setattr(train_module, "GraphedStep", _Recorded)
    _Recorded.made.clear()
    weights: dict[int, list[torch.Tensor]] = {}

    def lr_to_zero(epoch: int, metrics: dict[str, float], state: TrainingState) -> bool:
        weights[epoch] = [p.detach().clone() for p in state.model.parameters()]
        if epoch == 1:
            state.scheduler.base_lr = 0.0
        return False

    kw = {"batch_size": 100, "optimizer": optimizer, "weight_decay": 1e-2, "schedule": "constant", "seed": 6}
    result = fit(_cfg(cuda_graphs=True, **kw), 4, lr_to_zero)
    (step,) = _Recorded.made
    assert step.captures == 1
    assert [m["lr"] for m in result.history][2:] == [0.0, 0.0]
    assert any(not torch.equal(a, b) for a, b in zip(weights[0], weights[1], strict=True))  # it trained at first
    for a, b in zip(weights[1], weights[3], strict=True):
        assert torch.equal(a, b)
