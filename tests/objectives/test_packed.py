"""Trial packing on the objectives side: a packed member trains exactly as it would alone."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from objectives.data import load_data
from objectives.model import build_model, dropout_with
from objectives.packed import PackedCNN, PackedFit, _dropout, fit_packed, shared, unpackable
from objectives.runtime import resolve_runtime
from objectives.settings import TrainConfig
from objectives.train import TrainingState, fit, spec_for

SMALL = {"device": "cpu", "train_subset": 256, "widths": (8, 16), "batch_size": 32}
CURVE_KEYS = ("train_loss", "val_loss", "val_accuracy", "val_f1", "lr")


def _curves(history: list[dict[str, float]]) -> list[list[float]]:
    return [[m[k] for k in CURVE_KEYS] for m in history]


def _assert_same_curves(a: list[dict[str, float]], b: list[dict[str, float]]) -> None:
    assert len(a) == len(b)
    for epoch, (x, y) in enumerate(zip(_curves(a), _curves(b), strict=True)):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5), f"epoch {epoch}: packed {y} != alone {x}"


def test_packed_forward_equals_the_members_forwards() -> None:
    cfg = TrainConfig(**SMALL, blocks_per_stage=2)
    data = load_data(cfg, torch.device("cpu"))
    spec = spec_for(cfg, data)
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model({k: spec[k] for k in ("in_channels", "num_classes", "widths", "blocks_per_stage",
                                                 "activation", "dropout", "image_size")})
        for module in model.modules():  # non-trivial running statistics, different per member
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
        members.append(model.eval())
    x = [data.inputs(data.val_x[i * 16 : (i + 1) * 16]) for i in range(3)]
    packed = PackedCNN(members)
    with torch.no_grad():
        together = packed.forward(torch.cat(x, dim=1), False, [])
        alone = torch.stack([m(xi) for m, xi in zip(members, x, strict=True)])
    assert together.shape == (3, 16, data.num_classes)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_packed_training_step_updates_each_members_batchnorm_like_alone() -> None:
    cfg = TrainConfig(**SMALL)
    data = load_data(cfg, torch.device("cpu"))
    spec = {k: v for k, v in spec_for(cfg, data).items() if k not in ("model", "model_args", "class_names")}
    torch.manual_seed(0)
    members = [build_model(spec), build_model(spec)]
    copies = [build_model(spec), build_model(spec)]
    for c, m in zip(copies, members, strict=True):
        c.load_state_dict(m.state_dict())
    x = [data.inputs(data.train_x[:8]), data.inputs(data.train_x[8:16])]
    packed = PackedCNN(members)
    packed.forward(torch.cat(x, dim=1), True, [(0.0, None), (0.0, None)])
    packed.sync()
    for c, xi in zip(copies, x, strict=True):
        c.train()(xi)
    for c, m in zip(copies, members, strict=True):
        for (name, a), b in zip(c.state_dict().items(), m.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, msg=name)


OTHERS: list[dict[str, Any]] = [
    {"lr": 3e-3, "weight_decay": 1e-2, "dropout": 0.4, "seed": 7},
    {"optimizer": "sgd", "lr": 0.05, "momentum": 0.8, "schedule": "step", "step_size": 1, "seed": 3,
     "label_smoothing": 0.1, "grad_clip": 1.0},
    {"augment": True, "crop_padding": 1, "flip": True, "dropout": 0.1, "schedule": "plateau", "seed": 11},
]


@pytest.mark.parametrize(("extra", "shape"), [
    ({"dropout": 0.3, "flip": True, "crop_padding": 1, "lr": 2e-3}, {}),
    ({"optimizer": "sgd", "lr": 0.03, "weight_decay": 1e-3, "grad_clip": 0.5, "label_smoothing": 0.05}, {}),
    ({"dropout": 0.2, "lr": 2e-3}, {"pool_first": True, "blocks_per_stage": 2}),  # BatchNorm after the pool
])
def test_a_packed_member_trains_exactly_as_alone(extra: dict[str, Any], shape: dict[str, Any]) -> None:
    cfg = TrainConfig(**SMALL, **shape, **extra, seed=5)
    alone = fit(cfg, max_epochs=3)
    others = [TrainConfig(**SMALL, **shape, **o) for o in OTHERS]
    packed = fit_packed([others[0], cfg, *others[1:]], max_epochs=3)
    _assert_same_curves(alone.history, packed[1].history)
    for name, value in alone.model.state_dict().items():
        torch.testing.assert_close(packed[1].model.state_dict()[name], value, rtol=1e-3, atol=1e-4, msg=name)
    for other, result in zip(others, [packed[0], *packed[2:]], strict=True):  # and each other member too
        _assert_same_curves(fit(other, max_epochs=3).history, result.history)
    assert alone.model.features[0][1].__class__.__name__ == ("MaxPool2d" if shape else "BatchNorm2d")


def test_a_member_stopped_by_its_hook_leaves_and_the_others_go_on_unchanged() -> None:
    cfgs = [TrainConfig(**SMALL, seed=s, lr=1e-3 * (s + 1)) for s in range(3)]
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    sizes: list[int] = []

    def hook(i: int, stop_at: int | None) -> Any:
        def on_epoch(epoch: int, metrics: dict[str, float], state: TrainingState) -> bool:
            seen[i].append(epoch)
            if i == 2 and epoch == 0:
                raise RuntimeError("member 2's hook fails")
            return epoch == stop_at
        return on_epoch

    pack = PackedFit(cfgs[0], max_epochs=4)
    members = [pack.add(c, hook(i, 1 if i == 0 else None), key=i) for i, c in enumerate(cfgs)]
    while len(pack):
        sizes.append(len(pack))
        pack.run_epoch()
    assert sizes == [3, 2, 1, 1]  # member 2 left after epoch 0, member 0 after epoch 1
    assert seen == {0: [0, 1], 1: [0, 1, 2, 3], 2: [0]}
    assert members[0].stopped_by_hook and not members[1].stopped_by_hook
    assert isinstance(members[2].error, RuntimeError)
    _assert_same_curves(fit(cfgs[1], max_epochs=4).history, members[1].state.history)


def test_a_member_joining_later_and_a_resumed_member_train_as_alone() -> None:
    cfg, late = TrainConfig(**SMALL, seed=1), TrainConfig(**SMALL, seed=2, lr=4e-3, dropout=0.2)
    saved: dict[str, Any] = {}

    def keep(epoch: int, metrics: dict[str, float], state: TrainingState) -> bool:
        if epoch == 1:
            saved["state"] = state.state_dict()  # what the session writes as last.pt
        return False

    pack = PackedFit(cfg, max_epochs=4)
    first = pack.add(cfg, keep)
    pack.run_epoch()
    joined = pack.add(late)
    while len(pack):
        pack.run_epoch()
    _assert_same_curves(fit(cfg, max_epochs=4).history, first.state.history)
    _assert_same_curves(fit(late, max_epochs=4).history, joined.state.history)
    resumed = fit_packed([late, cfg], max_epochs=4, resumes=[None, saved["state"]])
    _assert_same_curves(first.state.history, resumed[1].history)


def test_a_members_state_is_an_ordinary_checkpoint() -> None:
    cfg = TrainConfig(**SMALL, dropout=0.2)
    result = fit_packed([cfg, TrainConfig(**SMALL, seed=3)], max_epochs=2)[0]
    model = build_model({k: v for k, v in result.spec.items() if k not in ("model", "model_args", "class_names")})
    model.load_state_dict(result.model.state_dict())  # same keys and shapes as an unpacked CNN
    assert int(model.features[0][1].num_batches_tracked) == 2 * math.ceil(256 / 32)
    runtime = resolve_runtime("cpu")
    from objectives.train import evaluate

    scores = evaluate(model, result.data.val_x, result.data.val_y, runtime, prepare=result.data.inputs)
    assert scores["accuracy"] == pytest.approx(result.history[-1]["val_accuracy"], abs=1e-6)


def test_configs_that_differ_in_shared_fields_are_refused() -> None:
    pack = PackedFit(TrainConfig(**SMALL), max_epochs=1)
    with pytest.raises(ValueError, match="batch_size"):
        pack.add(TrainConfig(**{**SMALL, "batch_size": 64}))
    assert shared(TrainConfig(**SMALL, lr=0.1)) == shared(TrainConfig(**SMALL, lr=0.2))


@pytest.mark.parametrize(("extra", "why"), [({"compile": True}, "compile = true"),
                                           ({"cuda_graphs": True}, "cuda_graphs = true"),
                                           ({"model": "torchvision:resnet18", "widths": (32, 64)},  # cnn's default
                                            "model 'torchvision:resnet18'")])
def test_compiled_graphed_and_other_models_do_not_pack_and_say_why(extra: dict[str, Any], why: str) -> None:
    assert unpackable(TrainConfig(**SMALL)) is None
    reason = unpackable(TrainConfig(**{**SMALL, **extra}))
    assert reason is not None and reason.startswith(why)
    with pytest.raises(ValueError, match=f"cannot be packed: {why}"):
        PackedFit(TrainConfig(**{**SMALL, **extra}), max_epochs=1)


def test_a_member_resumed_after_its_last_epoch_trains_no_more() -> None:
    cfg = TrainConfig(**SMALL)
    saved: dict[str, Any] = {}

    def keep(epoch: int, metrics: dict[str, float], state: TrainingState) -> bool:
        saved["state"] = state.state_dict()
        return False

    fit(cfg, max_epochs=2, on_epoch=keep)
    pack = PackedFit(cfg, max_epochs=2)
    done = pack.add(cfg, resume=saved["state"])
    assert len(pack) == 1 and pack.run_epoch() == [done] and len(pack) == 0
    assert len(done.state.history) == 2  # as fit(..., resume=...) would: no third epoch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_dropout_draws_each_members_own_masks_and_equals_dropout_with_bit_for_bit(dtype: torch.dtype) -> None:
    h = torch.randn(3, 16, 8).to(dtype)
    rates = [0.3, 0.0, 0.5]
    generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    twins = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    together = _dropout(h, list(zip(rates, generators, strict=True)))
    alone = torch.stack([dropout_with(h[j], p, g) for j, (p, g) in enumerate(zip(rates, twins, strict=True))])
    assert together.dtype == dtype and torch.equal(together, alone)
    assert torch.equal(together[1], h[1])  # p = 0: untouched, and its generator drew nothing
    for a, b in zip(generators, twins, strict=True):  # each generator advanced exactly as alone
        assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
