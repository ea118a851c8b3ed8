"""Train one CNN for up to `max_epochs`, reporting each epoch to a hook that may stop it.

This module must never import optuna or mlflow (nor anything that does): the search layer sees
training only through `on_epoch`, so the loop stays usable and testable on its own.
Out-of-memory errors and exceptions raised by the hook propagate unchanged.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from objectives.augment import augment_batch, default_crop_padding
from objectives.data import DataSplits, batch_indices, load_data
from objectives.errors import ModelError
from objectives.model import use_generator
from objectives.networks import build_network, network_spec
from objectives.optimizer_update import OptimizerUpdate, dynamo_wrappers
from objectives.runtime import Runtime, resolve_runtime, seed_everything
from objectives.schedule import EpochSchedule
from objectives.settings import TrainConfig
from objectives.step_graph import GraphedStep


@dataclass
class TrainingState:
    """What the hook sees after each epoch; `epoch` is the one just finished (counting from 0).

    `model` is the plain module even when `compile = true`, so its state_dict has the usual keys.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: EpochSchedule
    generator: torch.Generator
    spec: dict[str, Any]
    epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        """One dict with everything `fit(..., resume=...)` needs to continue exactly where this left off.

        A snapshot: tensors are copies, so it stays valid while training goes on. It holds only
        tensors and plain Python values, so `torch.load(path, weights_only=True)` reads it back. The
        optimiser's lr is saved as a number even where it trains as a tensor (`lr_as_tensors`), so the
        checkpoint resumes on any device.
        """
        state = {
            "model_spec": self.spec,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "batches": self.generator.get_state(),
            },
        }
        state = copy.deepcopy(state)
        for group in state["optimizer"]["param_groups"]:
            group["lr"] = float(group["lr"])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["model_spec"] != self.spec:
            raise ValueError(f"checkpoint model {state['model_spec']} does not match this config's {self.spec}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.history = [dict(m) for m in state["history"]]
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.generator.set_state(state["rng"]["batches"])


OnEpoch = Callable[[int, dict[str, float], TrainingState], bool]  # return True to stop now


@dataclass
class FitResult:
    """`model` is the plain (uncompiled) module; `epochs_run` and `history` include epochs before a resume."""

    model: nn.Module
    epochs_run: int
    history: list[dict[str, float]]
    stopped_by_hook: bool
    data: DataSplits
    spec: dict[str, Any]


def build_optimizer(cfg: TrainConfig, model: nn.Module, runtime: Runtime) -> torch.optim.Optimizer:
    """AdamW or SGD with two param groups: weight decay on weights, none on biases and norm parameters.

    Decay is decoupled from the gradient for both: AdamW does it itself; for SGD the group carries
    ``sgd_decoupled_wd`` and ``apply_decoupled_decay`` shrinks the weights by ``lr * wd`` after each
    step (torch's SGD would add an L2 term to the gradient, which momentum then mixes in).
    """
    dynamo_wrappers(compiling=cfg.compile)
    params = [p for p in model.parameters() if p.requires_grad]
    sgd = cfg.optimizer == "sgd"
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": 0.0 if sgd else cfg.weight_decay,
         "sgd_decoupled_wd": cfg.weight_decay if sgd else 0.0, "name": "decay"},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "sgd_decoupled_wd": 0.0,
         "name": "no_decay"},
    ]
    fused = True if runtime.fused_optimizer else None
    if sgd:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused)
    # capturable: AdamW refuses to be captured in a CUDA graph otherwise (its step count stays on the device)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused, capturable=runtime.graphs(cfg.cuda_graphs))


def lr_as_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Each param group's lr as a 0-dim tensor on `device`, which the schedule then sets in place: a step captured
    as a CUDA graph reads the lr from there at every replay, so one capture serves every epoch of the trial (a
    float lr is a constant of the captured kernels: every epoch would have to be captured again)."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), device=device)


@torch.no_grad()
def apply_decoupled_decay(optimizer: torch.optim.Optimizer) -> None:
    """w <- w * (1 - lr * wd) for groups with ``sgd_decoupled_wd`` (SGD); a no-op for AdamW."""
    for group in optimizer.param_groups:
        wd = group.get("sgd_decoupled_wd", 0.0)
        if wd and group["params"]:
            torch._foreach_mul_(group["params"], 1.0 - group["lr"] * wd)


def spec_for(cfg: TrainConfig, data: DataSplits) -> dict[str, Any]:
    """The model spec `fit` builds for `cfg` on `data` (and the one the objective checks before any trial)."""
    return network_spec(cfg, num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size, class_names=data.class_names)


def new_state(cfg: TrainConfig, data: DataSplits, runtime: Runtime, max_epochs: int) -> TrainingState:
    """A fresh model, optimiser, schedule and generator for `cfg`: the weights come from the global generator
    seeded with `cfg.seed` just before they are built, and every later random draw (batches, augmentation,
    dropout masks) from the state's own generator, so a trial trains the same alone or in a pack."""
    seed_everything(cfg.seed)
    spec = spec_for(cfg, data)
    model = build_network(spec).to(runtime.device)
    _materialize(model, data)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model, runtime)
    generator = torch.Generator(device=runtime.device if runtime.device.type == "cuda" else "cpu")
    generator.manual_seed(cfg.seed)
    if not runtime.graphs(cfg.cuda_graphs):  # a graph replays draws of torch's default generator only
        use_generator(model, generator)
    return TrainingState(model, optimizer, EpochSchedule(optimizer, cfg, max_epochs), generator, spec)


def _materialize(model: nn.Module, data: DataSplits) -> None:
    """Give a user's lazy layers (``nn.LazyLinear``, ``nn.LazyConv2d``, ...) their shapes with one forward pass
    on two training images, in evaluation mode and without gradients: the memory-format conversion and the
    optimiser cannot take uninitialised parameters. Their weights are drawn then, from the seeded generator."""
    from torch.nn.modules.lazy import LazyModuleMixin

    if not any(isinstance(m, LazyModuleMixin) and m.has_uninitialized_params() for m in model.modules()):
        return
    model.eval()
    with torch.no_grad():
        model(data.inputs(data.train_x[:2]))
    model.train()


def augmentation(cfg: TrainConfig, data: DataSplits) -> tuple[int, bool]:
    """(crop padding, flip) for `cfg` on `data`: the data set's defaults unless set; (0, False) with augment off."""
    if not cfg.augment:
        return 0, False
    padding = cfg.crop_padding if cfg.crop_padding is not None else default_crop_padding(data.image_size)
    return padding, cfg.flip if cfg.flip is not None else data.flip_ok


def compiled(model: nn.Module) -> nn.Module:
    """``torch.compile`` for one trial's model. ``dynamic=False``: one static graph per batch shape (full, the last
    partial batch, evaluation); the default recompiled the model for dynamic shapes at the first partial batch, a
    graph whose guards accept every batch size: on the CPU 33 s of compiling instead of 19 s, epochs no faster
    (BENCHMARKS.md section 9). Dynamo's caches are reset first: a process keeps at most ``recompile_limit`` (8)
    compiled versions of the forward, each trial adds its own (its batch sizes and dropout rate, training and
    evaluation), and past the limit torch runs the forward uncompiled without an error, which a worker's fifth
    trial did. One trial's versions fit; what Inductor cached on disk is still reused."""
    torch.compiler.reset()
    return torch.compile(model, dynamic=False)  # type: ignore[return-value]


def fit(
    cfg: TrainConfig, max_epochs: int, on_epoch: OnEpoch | None = None, *, resume: dict[str, Any] | None = None
) -> FitResult:
    """Train on `cfg.dataset` for epochs 0..max_epochs-1 (or from `resume["epoch"] + 1`).

    After each epoch the validation metrics (keys in METRIC_KEYS) go to `on_epoch(epoch, metrics,
    state)`; a True return stops training there. `lr` is the rate used throughout the epoch,
    `epoch_seconds` covers training and validation, `images_per_second` training alone. A non-finite
    train_loss is reported, not raised: the caller decides what it means.
    """
    runtime = resolve_runtime(cfg.device)
    data = load_data(cfg, runtime.device)
    state = new_state(cfg, data, runtime, max_epochs)
    model, optimizer, generator = state.model, state.optimizer, state.generator
    forward = compiled(model) if cfg.compile else model
    graphed = runtime.graphs(cfg.cuda_graphs)
    if resume is not None:
        state.load_state_dict(resume)
        if graphed and cfg.optimizer == "adamw":
            for group in optimizer.param_groups:  # a checkpoint's groups replace ours, flags included
                group["capturable"] = True
    if graphed:
        lr_as_tensors(optimizer, runtime.device)
    padding, flip = augmentation(cfg, data)
    graph = _graphed_step(forward, model, optimizer, runtime, cfg) if graphed else None

    stopped = False
    for epoch in range(state.epoch + 1, max_epochs):
        lr = state.scheduler.start_epoch(epoch)
        start = time.perf_counter()
        train_loss = _train_epoch(forward, model, optimizer, data, runtime, cfg, generator, padding, flip, graph)
        train_seconds = time.perf_counter() - start
        val = evaluate(forward, data.val_x, data.val_y, runtime, cfg.eval_batch_size, data.num_classes, data.inputs)
        epoch_seconds = time.perf_counter() - start
        state.scheduler.end_epoch(epoch, val["loss"])
        metrics = epoch_metrics(train_loss, val, lr, epoch_seconds, len(data.train_y) / train_seconds)
        state.epoch = epoch
        state.history.append(metrics)
        if on_epoch is not None and on_epoch(epoch, metrics, state):
            stopped = True
            break
    return FitResult(model, state.epoch + 1, state.history, stopped, data, state.spec)


def epoch_metrics(train_loss: float, val: dict[str, float], lr: float, epoch_seconds: float,
                  images_per_second: float) -> dict[str, float]:
    """One epoch's METRIC_KEYS, as `fit` and a pack (objectives/packed.py) report them to the hook."""
    return {"train_loss": train_loss, "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_f1": val["f1"],
            "lr": lr, "epoch_seconds": epoch_seconds, "images_per_second": images_per_second}


def optimizer_step(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                   update: OptimizerUpdate | None = None) -> None:
    """A training step's update once the gradients are in: clip (when set), step, SGD's decoupled decay.
    ``update``: the optimiser's direct update (objectives/optimizer_update.py), where the caller keeps one."""
    if cfg.grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if update is None:
        optimizer.step()
    else:
        update.step()
    if cfg.optimizer == "sgd":
        apply_decoupled_decay(optimizer)


def _train_epoch(
    forward: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DataSplits,
    runtime: Runtime,
    cfg: TrainConfig,
    generator: torch.Generator,
    padding: int,
    flip: bool,
    graph: tuple[GraphedStep, Tensor] | None = None,
) -> float:
    """One pass over the shuffled training tensor; the loss is summed on the device, read once at the end.

    With `graph` (see `_graphed_step`) the step runs through it and the sum is its static total."""
    forward.train()
    n = len(data.train_y)
    if graph is not None:
        step, total = graph
        total.zero_()
    else:
        total = torch.zeros((), device=runtime.device)
        step = _step_fn(forward, model, optimizer, runtime, cfg, total, zero_grad=True, cache=True)
    for idx in batch_indices(n, cfg.batch_size, generator, data.x_device):
        x, y = data.take(data.train_x, idx), data.train_y[idx.to(runtime.device)]
        if padding or flip:
            x = augment_batch(x, padding, flip, generator)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        step(x, y)
    return (total / n).item()


def _step_fn(
    forward: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime, cfg: TrainConfig,
    total: Tensor, *, zero_grad: bool, cache: bool,
) -> Callable[[Tensor, Tensor], None]:
    """One training step on a prepared batch, its loss x batch size added to `total` (on the device)."""
    update = OptimizerUpdate(optimizer)

    def step(x: Tensor, y: Tensor) -> None:
        with runtime.autocast(cache=cache):
            logits = forward(x)
        if not isinstance(logits, Tensor):
            raise ModelError(
                f"model {cfg.model!r} returns a value of type {type(logits).__name__} in training mode; the training "
                "loop needs the logits tensor only (evaluation mode gave one). Make forward() return only the logits "
                "while training too."
            )
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if zero_grad:
            update.zero_grad()
        loss.backward()
        optimizer_step(cfg, model, optimizer, update)
        total.add_(loss.detach() * len(y))

    return step


def _graphed_step(forward: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime,
                  cfg: TrainConfig) -> tuple[GraphedStep, Tensor]:
    """The trial's step as a CUDA graph, and the loss total it adds to (static: the graph holds its address)."""
    total = torch.zeros((), device=runtime.device)
    step = _step_fn(forward, model, optimizer, runtime, cfg, total, zero_grad=False, cache=False)
    return GraphedStep(step, lambda: optimizer.zero_grad(set_to_none=True), cfg.batch_size), total


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    runtime: Runtime,
    batch_size: int = 1024,
    num_classes: int | None = None,
    prepare: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Mean cross-entropy (no label smoothing), accuracy and macro F1 of `model` on (x, y).

    Macro F1 averages over the classes present in y or in the predictions, like sklearn's
    `f1_score(average="macro")`. `prepare` turns a slice of stored images into model inputs (a data set's
    `inputs`: to the device, float, normalised); without it `x` is used as it is. The model's train/eval
    mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=y.device)
    preds = []
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        if prepare is not None:
            xb = prepare(xb)
        if runtime.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        preds.append(logits.argmax(dim=1))
    model.train(was_training)
    return scores(loss_sum, torch.cat(preds), y, num_classes)


def scores(loss_sum: Tensor, pred: Tensor, y: Tensor, num_classes: int | None) -> dict[str, float]:
    """Mean loss, accuracy and macro F1 from the summed cross-entropy and the predicted classes of (x, y)."""
    k = num_classes if num_classes is not None else int(max(y.max(), pred.max())) + 1
    confusion = torch.bincount(y * k + pred, minlength=k * k).reshape(k, k).double()
    true_pos = confusion.diagonal()
    actual, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
    f1 = torch.where(actual + predicted > 0, 2 * true_pos / (actual + predicted).clamp_min(1), 0.0)
    present = (actual + predicted) > 0
    out = torch.stack([loss_sum.double() / len(y), true_pos.sum() / len(y), f1[present].mean()]).tolist()
    return {"loss": out[0], "accuracy": out[1], "f1": out[2]}
