import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from sklearn.metrics import f1_score
from torch import nn

import objectives.train as train_module
from objectives.data import load_data
from objectives.networks import build_network
from objectives.runtime import resolve_runtime
from objectives.settings import TrainConfig
from objectives.spec import METRIC_KEYS
from objectives.train import (
    TrainingState,
    apply_decoupled_decay,
    build_optimizer,
    evaluate,
    fit,
    lr_as_tensors,
    spec_for,
)

CPU = resolve_runtime("cpu")
SMALL = {"device": "cpu", "train_subset": 256, "widths": (8, 16)}  # ~10 ms an epoch


def _recorder(stop_at: int | None = None) -> tuple[list[tuple[int, dict[str, float]]], Any]:
    calls: list[tuple[int, dict[str, float]]] = []

    def hook(epoch: int, metrics: dict[str, float], state: TrainingState) -> bool:
        calls.append((epoch, dict(metrics)))
        return epoch == stop_at

    return calls, hook


def test_fit_learns_digits_and_reports_every_epoch() -> None:
    calls, hook = _recorder()
    result = fit(TrainConfig(device="cpu"), max_epochs=4, on_epoch=hook)
    assert [epoch for epoch, _ in calls] == [0, 1, 2, 3]
    for _, metrics in calls:
        assert tuple(metrics) == METRIC_KEYS
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
        assert metrics["epoch_seconds"] > 0 and metrics["images_per_second"] > 0
    assert calls[-1][1]["val_accuracy"] > 0.8
    assert calls[-1][1]["train_loss"] < calls[0][1]["train_loss"]
    assert (result.epochs_run, result.stopped_by_hook) == (4, False)
    assert result.history == [m for _, m in calls]
    assert result.spec["image_size"] == 8 and result.data.name == "digits"


def test_hook_returning_true_stops_at_that_epoch() -> None:
    calls, hook = _recorder(stop_at=1)
    result = fit(TrainConfig(**SMALL), max_epochs=5, on_epoch=hook)
    assert [epoch for epoch, _ in calls] == [0, 1]
    assert (result.epochs_run, result.stopped_by_hook, len(result.history)) == (2, True, 2)


def test_fit_learns_synthetic_colour_images() -> None:
    cfg = TrainConfig(
        dataset="synthetic",
        device="cpu",
        synthetic_shape=(3, 16, 16),
        synthetic_classes=4,
        synthetic_train=512,
        synthetic_val=128,
        synthetic_test=32,
        widths=(8, 16),
        lr=1e-2,
    )
    history = fit(cfg, max_epochs=3).history
    assert history[-1]["val_accuracy"] > 0.8  # chance is 0.25


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, (1, False)),  # digits: 1 px crops, never mirrored by default
        ({"dataset": "synthetic", "synthetic_shape": (3, 32, 32)}, (4, True)),
        ({"crop_padding": 3, "flip": True}, (3, True)),
        ({"augment": False}, None),
    ],
)
def test_augmentation_defaults_per_data_set(monkeypatch: pytest.MonkeyPatch, kw: dict[str, Any], expected) -> None:
    seen: set[tuple[int, bool]] = set()

    def record(x: torch.Tensor, padding: int, flip: bool, generator: Any = None) -> torch.Tensor:
        seen.add((padding, flip))
        return x

    monkeypatch.setattr(train_module, "augment_batch", record)
    small = {"synthetic_train": 64, "synthetic_val": 16, "synthetic_test": 16}
    fit(TrainConfig(**{**SMALL, **small, **kw}), max_epochs=1)
    assert seen == ({expected} if expected else set())


def _lrs(**kw: Any) -> list[float]:
    return [m["lr"] for m in fit(TrainConfig(**SMALL, lr=0.01, **kw), max_epochs=4).history]


@pytest.mark.parametrize(
    ("kw", "factors"),
    [
        ({"schedule": "constant"}, [1, 1, 1, 1]),
        ({"schedule": "step", "step_size": 2, "gamma": 0.5}, [1, 1, 0.5, 0.5]),
        ({"schedule": "cosine"}, [1, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]),
        ({"schedule": "exponential", "gamma": 0.5}, [1, 0.5, 0.25, 0.125]),
        ({"schedule": "polynomial", "power": 2.0}, [1, 0.75**2, 0.5**2, 0.25**2]),
        ({"schedule": "cosine", "warmup_epochs": 2}, [1 / 3, 2 / 3, 1, 0.5]),
        ({"schedule": "plateau", "warmup_epochs": 1}, [0.5, 1]),  # first two; later ones depend on val_loss
    ],
)
def test_schedules(kw: dict[str, Any], factors: list[float]) -> None:
    lrs = _lrs(**kw)
    assert lrs[: len(factors)] == pytest.approx([0.01 * f for f in factors])


def test_plateau_reduces_lr_after_a_bad_epoch_before_the_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    # A validation loss that never improves makes the rule fire deterministically.
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: {"loss": 1.0, "accuracy": 0.5, "f1": 0.5})
    seen: list[float] = []  # (lr during the epoch, lr after its end) pairs, flattened

    def hook(epoch: int, metrics: dict[str, float], state: TrainingState) -> bool:
        seen.extend([metrics["lr"], state.optimizer.param_groups[0]["lr"]])
        return False

    cfg = TrainConfig(**SMALL, lr=0.01, schedule="plateau", plateau_patience=1, plateau_factor=0.5)
    fit(cfg, max_epochs=5, on_epoch=hook)
    # patience 1: epochs 1 and 2 are bad; the cut happens at the end of epoch 2, visible to its hook.
    assert seen == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.01, 0.005, 0.005, 0.005, 0.005, 0.0025])


def test_a_plateau_cut_lands_in_the_lr_tensor_a_captured_step_reads_even_where_torch_assigns_a_number(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With `cuda_graphs` each group's lr is a tensor the captured step reads (`lr_as_tensors`). torch 2.14's
    ReduceLROnPlateau sets its cut into that tensor; one that assigned a number instead would leave the tensor,
    and so every replayed step, on the old lr. Here torch's cut is replaced by one that assigns numbers."""
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    def assigns_numbers(self: ReduceLROnPlateau, epoch: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = float(group["lr"]) * self.factor

    monkeypatch.setattr(ReduceLROnPlateau, "_reduce_lr", assigns_numbers)
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: {"loss": 1.0, "accuracy": 0.5, "f1": 0.5})
    built = train_module.new_state
    tensors: list[torch.Tensor] = []

    def with_lr_tensors(*args: Any, **kwargs: Any) -> TrainingState:
        state = built(*args, **kwargs)
        lr_as_tensors(state.optimizer, CPU.device)
        tensors.extend(g["lr"] for g in state.optimizer.param_groups)
        return state

    same: list[bool] = []
    lrs: list[float] = []

    def look(epoch: int, metrics: dict[str, float], state: TrainingState) -> bool:
        same.extend(g["lr"] is t for g, t in zip(state.optimizer.param_groups, tensors, strict=True))
        lrs.extend(float(g["lr"]) for g in state.optimizer.param_groups)
        return False

    monkeypatch.setattr(train_module, "new_state", with_lr_tensors)
    fit(TrainConfig(**SMALL, lr=0.01, schedule="plateau", plateau_patience=0, plateau_factor=0.5), 3, look)
    assert same == [True] * 6  # after each epoch's cut, still the tensors the captured step reads
    assert lrs == pytest.approx([0.01] * 2 + [0.005] * 2 + [0.0025] * 2)


@pytest.mark.parametrize(
    "kw",
    [
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
        {"grad_clip": 0.5, "lr": 3e-3},
        {"label_smoothing": 0.1, "lr": 3e-3, "dropout": 0.3, "activation": "silu"},
    ],
)
def test_optimiser_variants_train(kw: dict[str, Any]) -> None:
    history = fit(TrainConfig(**{**SMALL, "train_subset": 512}, **kw), max_epochs=3).history
    assert all(math.isfinite(m["train_loss"]) for m in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_grad_clip_is_applied_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    norms: list[float] = []
    original = nn.utils.clip_grad_norm_

    def spy(params: Any, max_norm: float, *args: Any, **kwargs: Any) -> torch.Tensor:
        norms.append(max_norm)
        return original(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(nn.utils, "clip_grad_norm_", spy)
    fit(TrainConfig(**SMALL, batch_size=64, grad_clip=0.25), max_epochs=2)
    assert norms == [0.25] * 8  # 256 examples / 64 per batch * 2 epochs


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_an_lr_held_as_tensors_trains_as_numbers_do_and_is_saved_as_a_number(
    monkeypatch: pytest.MonkeyPatch, optimizer: str
) -> None:
    """`lr_as_tensors` (how a step captured once as a CUDA graph reads each epoch's lr), here on the CPU: the
    schedule sets each group's tensor in place, the fused step and SGD's decoupled decay read it, and the trial
    trains exactly as with numbers (rates that are powers of two, exact in float32); its checkpoint holds numbers
    and resumes a trial whose lr is a number."""
    cfg = TrainConfig(**SMALL, optimizer=optimizer, lr=2**-6, weight_decay=1e-2, schedule="step", step_size=1,
                      gamma=0.5, seed=3)
    plain = fit(cfg, 3)
    built = train_module.new_state
    seen: list[tuple[int, float]] = []
    saved: dict[str, Any] = {}

    def with_lr_tensors(*args: Any, **kwargs: Any) -> TrainingState:
        state = built(*args, **kwargs)
        lr_as_tensors(state.optimizer, CPU.device)
        return state

    def look(epoch: int, metrics: dict[str, float], state: TrainingState) -> bool:
        lrs = [g["lr"] for g in state.optimizer.param_groups]
        assert all(isinstance(lr, torch.Tensor) and lr.item() == metrics["lr"] for lr in lrs)
        seen.extend((id(lr), metrics["lr"]) for lr in lrs)
        if epoch == 1:
            saved["state"] = state.state_dict()
        return False

    monkeypatch.setattr(train_module, "new_state", with_lr_tensors)
    tensors = fit(cfg, 3, look)
    assert tensors.history == [{**m, "epoch_seconds": t["epoch_seconds"], "images_per_second": t["images_per_second"]}
                               for m, t in zip(plain.history, tensors.history, strict=True)]
    assert len({lr_id for lr_id, _ in seen}) == 2  # one tensor per group, set in place every epoch
    assert [lr for _, lr in seen] == [2**-6] * 2 + [2**-7] * 2 + [2**-8] * 2
    groups = saved["state"]["optimizer"]["param_groups"]
    assert [type(g["lr"]) for g in groups] == [float, float] and groups[0]["lr"] == 2**-7
    monkeypatch.setattr(train_module, "new_state", built)
    resumed = fit(cfg, 3, resume=saved["state"])
    assert resumed.history[2]["val_loss"] == pytest.approx(plain.history[2]["val_loss"], rel=1e-5)


def test_nesterov_sgd_is_configured() -> None:
    cfg = TrainConfig(optimizer="sgd", momentum=0.8, nesterov=True, lr=0.1, weight_decay=1e-3)
    opt = build_optimizer(cfg, nn.Linear(3, 2), resolve_runtime("cpu"))
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["nesterov"] and g["momentum"] == 0.8 and g["lr"] == 0.1 for g in opt.param_groups)


def test_sgd_weight_decay_is_decoupled_from_the_gradient() -> None:
    cfg = TrainConfig(optimizer="sgd", momentum=0.9, nesterov=True, lr=0.1, weight_decay=0.01)
    layer = nn.Linear(3, 2)
    opt = build_optimizer(cfg, layer, resolve_runtime("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.0 and decay["sgd_decoupled_wd"] == 0.01
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.weight.grad = torch.zeros_like(layer.weight)  # no gradient: only the decay moves the weights
    layer.bias.grad = torch.zeros_like(layer.bias)
    opt.step()
    apply_decoupled_decay(opt)
    assert torch.allclose(layer.weight, weight * (1 - 0.1 * 0.01))
    assert torch.equal(layer.bias, bias)
    assert opt.state[layer.weight]["momentum_buffer"].abs().sum() == 0  # decay never enters momentum


def test_biases_and_norm_params_are_not_decayed() -> None:
    cfg = TrainConfig(weight_decay=0.1)
    model = build_network(spec_for(cfg, load_data(cfg, CPU.device)))
    opt = build_optimizer(cfg, model, resolve_runtime("cpu"))
    decay, no_decay = opt.param_groups
    assert (decay["name"], decay["weight_decay"], no_decay["name"], no_decay["weight_decay"]) == (
        "decay",
        0.1,
        "no_decay",
        0.0,
    )
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decayed | not_decayed == set(names.values()) and not decayed & not_decayed
    assert decayed == {n for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1}
    assert {n for n in not_decayed if "bias" in n} == {n for n in names.values() if "bias" in n}
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert {f"{n}.weight" for n in norms} <= not_decayed


def test_non_finite_train_loss_is_reported_not_raised() -> None:
    cfg = TrainConfig(**SMALL, optimizer="sgd", lr=1e38, momentum=0.0, nesterov=False, schedule="constant")
    history = fit(cfg, max_epochs=2).history
    assert len(history) == 2 and not math.isfinite(history[-1]["train_loss"])


def _comparable(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k not in ("epoch_seconds", "images_per_second")}


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path: Path, schedule: str) -> None:
    # Dropout, crops and (by default, off for digits) flips all draw random numbers that must be restored.
    cfg = TrainConfig(**SMALL, dropout=0.2, flip=True, schedule=schedule, plateau_patience=0, lr=3e-3, seed=5)
    snapshots: dict[int, dict[str, Any]] = {}

    def keep_epoch_1(epoch: int, metrics: dict[str, float], state: TrainingState) -> bool:
        if epoch == 1:
            snapshots[epoch] = state.state_dict()
        return False  # keep training: the snapshot must not change under it

    full = fit(cfg, max_epochs=4, on_epoch=keep_epoch_1).history
    path = tmp_path / "checkpoint.pt"
    torch.save(snapshots[1], path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["model_spec"]["widths"] == [8, 16]

    calls, hook = _recorder()
    resumed = fit(cfg, max_epochs=4, on_epoch=hook, resume=checkpoint)
    assert [epoch for epoch, _ in calls] == [2, 3]
    assert [_comparable(m) for _, m in calls] == [_comparable(m) for m in full[2:]]
    assert resumed.epochs_run == 4 and len(resumed.history) == 4
    assert [_comparable(m) for m in resumed.history] == [_comparable(m) for m in full]


def test_resume_with_a_different_model_is_refused() -> None:
    states: list[dict[str, Any]] = []
    fit(TrainConfig(**SMALL), max_epochs=1, on_epoch=lambda e, m, s: states.append(s.state_dict()) or False)
    with pytest.raises(ValueError, match="does not match"):
        fit(TrainConfig(**{**SMALL, "widths": (8, 32)}), max_epochs=2, resume=states[0])


def test_evaluate_matches_sklearn() -> None:
    cfg = TrainConfig()
    data = load_data(cfg, CPU.device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    model.train()
    result = evaluate(model, data.val_x, data.val_y, CPU, batch_size=50, num_classes=10, prepare=data.inputs)
    assert model.training  # mode restored
    with torch.no_grad():
        logits = model(data.inputs(data.val_x))
    pred = logits.argmax(1)
    assert result["accuracy"] == pytest.approx((pred == data.val_y).float().mean().item())
    assert result["f1"] == pytest.approx(f1_score(data.val_y.numpy(), pred.numpy(), average="macro"))
    assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, data.val_y).item(), rel=1e-5)
    inputs = data.inputs(data.val_x)
    assert evaluate(model, inputs, data.val_y, CPU)["f1"] == pytest.approx(result["f1"])  # K inferred


def test_training_code_never_imports_optuna_or_mlflow() -> None:
    code = (
        "import sys, objectives.train, objectives.data, objectives.settings, objectives.runtime, objectives.user_data;"
        "bad = [m for m in ('optuna', 'mlflow') if m in sys.modules]; assert not bad, bad"
    )
    _in_a_new_interpreter(code)


def test_a_study_of_the_built_in_cnn_never_imports_torchvision() -> None:
    """torchvision is imported only for torchvision models (it costs the commands that read a study about 1 s):
    a digits study's imports (the CLI, the objective) and a whole fit of the built-in CNN must not import it."""
    code = (
        "import sys, search.cli, search.launch, search.study, objectives.objective\n"
        "from objectives.settings import TrainConfig\n"
        "from objectives.train import fit\n"
        "fit(TrainConfig(device='cpu', train_subset=64, widths=(4,)), 1)\n"
        "assert 'torchvision' not in sys.modules, sorted(m for m in sys.modules if 'torchvision' in m)[:5]"
    )
    _in_a_new_interpreter(code)
    _in_a_new_interpreter(  # and a torchvision model still finds it
        "import sys, objectives.networks as n; n.build_network({'model': 'torchvision:resnet18', 'model_args': {}, "
        "'num_classes': 3, 'in_channels': 3, 'image_size': 32, 'dropout': 0.0, 'class_names': ['a', 'b', 'c']}); "
        "assert 'torchvision' in sys.modules")


def test_training_without_compile_never_loads_dynamo_and_compiling_puts_torchs_wrappers_back() -> None:
    """Importing Dynamo costs a worker 0.8-1 s before its first trial; an eager trial's optimiser (made, stepped,
    saved and loaded on a resume) must not import it. Once a trial compiles, the optimiser's methods are wrapped
    in Dynamo's `disable` again, as torch has them."""
    code = (
        "import sys, torch\n"
        "from objectives.settings import TrainConfig\n"
        "from objectives.train import fit\n"
        "from objectives import optimizer_update as ou\n"
        "cfg = TrainConfig(device='cpu', train_subset=64, widths=(4,))\n"
        "saved = []\n"
        "fit(cfg, 2, lambda e, m, s: saved.append(s.state_dict()) or False)\n"
        "fit(cfg, 3, resume=saved[0])\n"
        "assert 'torch._dynamo' not in sys.modules, 'dynamo was imported'\n"
        "ou.dynamo_wrappers(compiling=True)\n"
        "torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()).state_dict()\n"
        "assert 'torch._dynamo' in sys.modules\n"
        "fns = ou._wrapped_methods()\n"
        "assert len(fns) >= 4 and all(getattr(f, '__dynamo_disable', None) is not f for f in fns), fns\n"
        "state_dict = torch.optim.Optimizer.state_dict.__wrapped__\n"
        "assert callable(state_dict.__dynamo_disable) and state_dict.__dynamo_disable is not state_dict\n"
    )
    _in_a_new_interpreter(code)


def _in_a_new_interpreter(code: str) -> None:
    """Run ``code`` in a new Python process from the project's root (what it imports starts from nothing there);
    its assertions fail the test with the process's error."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_compiled_training_follows_the_eager_curve_with_one_static_graph_per_batch_shape() -> None:
    """`compile = true`: the same curve as eager (to float tolerance: the compiled kernels fuse and round
    differently), and no graph compiled for dynamic shapes (the last partial batch gets its own static graph)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = {**SMALL, "train_subset": 200, "batch_size": 64, "seed": 3}  # 3 full batches and one of 8
    eager = fit(TrainConfig(**cfg), 2)
    # Inductor's on-disk caches off: a graph found there is not lowered again, and then counts no matmuls
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = fit(TrainConfig(**cfg, compile=True), 2)
    for a, b in zip(eager.history, compiled.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    assert counters["stats"]["unique_graphs"] >= 3  # training at 64 and at 8, evaluation
    # the classifier's matmuls, named by their sizes: a graph for dynamic shapes names a symbol (aten.mm_s77_...)
    matmuls = set(counters["aten_mm_info"])
    assert {"aten.addmm_64_10_16", "aten.addmm_8_10_16"} <= matmuls, matmuls
    assert not [name for name in matmuls if re.search(r"_s\d+", name)], matmuls


def test_cuda_graphs_off_a_cuda_gpu_train_exactly_as_eager() -> None:
    """One study file serves a laptop and a GPU machine: on the CPU `cuda_graphs = true` changes nothing, dropout
    masks included (they come from the trial's own generator as without it)."""
    cfg = {**SMALL, "batch_size": 48, "dropout": 0.3, "optimizer": "adamw", "seed": 4}
    assert not CPU.graphs(True)
    eager = fit(TrainConfig(**cfg), 2)
    asked = fit(TrainConfig(**cfg, cuda_graphs=True), 2)
    for a, b in zip(eager.history, asked.history, strict=True):
        assert {k: v for k, v in a.items() if "second" not in k} == {k: v for k, v in b.items() if "second" not in k}
    assert all(torch.equal(p, q) for p, q in zip(eager.model.parameters(), asked.model.parameters(), strict=True))


def test_compiled_trials_in_one_process_stay_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each trial compiles its own versions of the forward (its batch sizes and dropout rate, training and
    evaluation). Without a reset between trials a process passed torch's limit of 8 versions at its fifth trial,
    and from there torch ran the forward uncompiled without an error; here passing it is made an error. Dynamo's
    own ``eager`` backend stands in for Inductor (the same guards and limit, no code generation)."""
    import functools

    import torch._dynamo

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for k in range(1, 8):
            result = fit(TrainConfig(**{**SMALL, "compile": True, "dropout": 0.05 * k,
                                        "batch_size": (32, 48, 64, 96, 128)[k % 5]}), max_epochs=1)
            assert math.isfinite(result.history[-1]["train_loss"])
