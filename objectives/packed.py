"""Trial packing: K trials of the built-in CNN trained in one forward/backward pass (after HFTA, MLSys 2021).

The members share the architecture, the data and the batch size; everything else is their own. Each member
keeps its own parameter tensors (its own `CNN` module), its own optimiser and schedule (built by `train.py`'s
builders, so per-member lr, weight decay, momentum, schedule), its own generator (batch order, augmentation,
dropout masks) and its own label smoothing and gradient clipping. At forward time the members' weights are
concatenated into grouped convolutions (`groups=K` over `[B, K*C, H, W]`, member k's batch in channels
`k*C..(k+1)*C`), a BatchNorm over the concatenated channels (which is exactly per-member BatchNorm on each
member's own batch), and a batched matmul for the K classifier heads. The loss is the sum of the members'
losses, so each member's gradient is exactly its own loss's gradient.

A member trained here follows the same numbers as `train.fit` with the same config, to float tolerance (a
grouped convolution sums in another order): `tests/objectives/test_packed.py` checks the curves.

Like `train.py` this module never imports optuna or mlflow: each member has its own `on_epoch` hook; a
member whose hook says stop (or raises) leaves the pack at once and the pack shrinks; `add` lets a new
member join between epochs, at its own epoch 0 (or its resumed epoch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from objectives.augment import augment_batch
from objectives.data import DataSplits, batch_indices, load_data
from objectives.model import CNN, dropout_keep, dropout_with
from objectives.optimizer_update import OptimizerUpdate
from objectives.runtime import Runtime, resolve_runtime
from objectives.settings import TrainConfig
from objectives.train import (
    FitResult,
    OnEpoch,
    TrainingState,
    augmentation,
    epoch_metrics,
    new_state,
    optimizer_step,
    scores,
)

# What members of one pack must share: the data, the architecture, how batches are cut and where it runs.
# Every other TrainConfig field (optimiser, schedule, regularisation, augmentation, seed) is per member.
SHARED_FIELDS = (
    "dataset", "data_dir", "data_file", "image_size", "channels", "skip_bad_images", "cache_dir", "data_placement",
    "device_memory_share", "data_budget_mb", "download", "verify_checksums", "val_size", "test_size", "data_seed",
    "train_subset", "synthetic_shape", "synthetic_classes", "synthetic_train", "synthetic_val", "synthetic_test",
    "model", "model_args", "widths", "blocks_per_stage", "activation", "pool_first", "batch_size", "device", "compile",
    "eval_batch_size",
)


def unpackable(cfg: TrainConfig) -> str | None:
    """Why trials of ``cfg`` cannot be packed, or None when they can: only the built-in CNN packs, uncompiled
    and not replayed as CUDA graphs."""
    if cfg.model != "cnn":
        return f"model {cfg.model!r}: only the built-in cnn packs"
    if cfg.compile:
        return "compile = true: a compiled pack would compile again whenever a member leaves"
    if cfg.cuda_graphs:
        return "cuda_graphs = true: a pack's step changes whenever a member leaves, so it is not one graph"
    return None


def shared(cfg: TrainConfig) -> dict[str, Any]:
    """The fields that must be equal for two configs to train in one pack."""
    return {name: getattr(cfg, name) for name in SHARED_FIELDS}


class PackedCNN:
    """K member CNNs of one architecture run as one grouped network. The members' parameters are used as they
    are (concatenated per forward); the BatchNorm running statistics live here, concatenated, while the pack
    trains, and `sync()` writes them back into the members (before anyone reads a member's state_dict)."""

    def __init__(self, members: list[CNN]) -> None:
        self.members = members
        self.template = members[0]
        self.steps = 0  # training forwards since the last sync: each member's num_batches_tracked grows by it
        self.stats: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # (block, layer in it) -> concatenated
        for i, j in _norms(self.template):
            norms = [m.features[i][j] for m in members]
            self.stats[i, j] = (torch.cat([n.running_mean for n in norms]), torch.cat([n.running_var for n in norms]))

    def sync(self) -> None:
        """Copy the packed running statistics back into each member's BatchNorm layers."""
        with torch.no_grad():
            for (i, j), (mean, var) in self.stats.items():
                for m, mean_k, var_k in zip(self.members, mean.chunk(len(self.members)),
                                            var.chunk(len(self.members)), strict=True):
                    norm = m.features[i][j]
                    norm.running_mean.copy_(mean_k)
                    norm.running_var.copy_(var_k)
                    norm.num_batches_tracked += self.steps
        self.steps = 0

    def forward(self, x: Tensor, training: bool, dropout: list[tuple[float, torch.Generator | None]]) -> Tensor:
        """`x`: [B, K*C_in, H, W], member k's images in channels k*C_in..(k+1)*C_in. Returns [K, B, classes]
        logits. `dropout`: each member's (rate, generator), used in training only."""
        k, members = len(self.members), self.members
        h = x
        for i, block in enumerate(self.template.features):
            for j, layer in enumerate(block if isinstance(block, nn.Sequential) else [block]):
                if isinstance(layer, nn.Conv2d):
                    weight = torch.cat([m.features[i][j].weight for m in members])
                    h = F.conv2d(h, weight, None, layer.stride, layer.padding, layer.dilation, groups=k)
                elif isinstance(layer, nn.BatchNorm2d):
                    mean, var = self.stats[i, j]
                    h = F.batch_norm(h, mean, var, torch.cat([m.features[i][j].weight for m in members]),
                                     torch.cat([m.features[i][j].bias for m in members]), training, layer.momentum,
                                     layer.eps)
                else:
                    h = layer(h)  # max-pool and activations: per channel, so per member
        if training:
            self.steps += 1
        h = self.template.pool(h).flatten(1)
        h = h.view(h.shape[0], k, -1).transpose(0, 1)  # [K, B, C]
        if training and any(p > 0 for p, _ in dropout):
            h = _dropout(h, dropout)
        weight = torch.stack([m.classifier.weight for m in members])  # [K, classes, C]
        bias = torch.stack([m.classifier.bias for m in members])  # [K, classes]
        return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))


def _norms(cnn: CNN) -> list[tuple[int, int]]:
    """(block, index in the block) of every BatchNorm in `cnn.features` (its place moves with `pool_first`)."""
    return [(i, j) for i, block in enumerate(cnn.features) if isinstance(block, nn.Sequential)
            for j, layer in enumerate(block) if isinstance(layer, nn.BatchNorm2d)]


def _dropout(h: Tensor, dropout: list[tuple[float, torch.Generator | None]]) -> Tensor:
    """`dropout_with` on each member's [B, C] slice of `h` ([K, B, C]), with the same masks and the same
    arithmetic (mask, then divide by 1 - p in the float32 the scalar division computes in), as one multiply and
    one divide. A member without its own generator (none in a PackedFit) falls back to one call per member."""
    if any(g is None and p > 0 for p, g in dropout):
        return torch.stack([dropout_with(h[j], p, g) for j, (p, g) in enumerate(dropout)])
    keep = torch.stack([dropout_keep(h.shape[1:], p, g, h.device) for p, g in dropout])  # type: ignore[arg-type]
    scale = torch.tensor([1.0 - p for p, _ in dropout], device=h.device).view(-1, 1, 1)
    return ((h * keep.to(h.dtype)) / scale).to(h.dtype)


@dataclass
class PackMember:
    """One trial in a pack: its config, training state (model, optimiser, schedule, generator, history), hook.

    `key` is the caller's handle. After it leaves: `stopped_by_hook` (its hook returned True), `error` (what its
    hook raised, which the caller re-raises in the trial's own context), or neither (it ran to max_epochs)."""

    cfg: TrainConfig
    state: TrainingState
    on_epoch: OnEpoch | None
    padding: int
    flip: bool
    key: Any = None
    stopped_by_hook: bool = False
    error: Exception | None = None
    last_lr: float = field(default=0.0)
    update: OptimizerUpdate = field(init=False)

    def __post_init__(self) -> None:
        self.update = OptimizerUpdate(self.state.optimizer)

    @property
    def model(self) -> nn.Module:
        return self.state.model


class PackedFit:
    """A pack being trained: `add` members, `run_epoch` until `members` is empty.

    Each `run_epoch` trains every member one epoch (each at its own epoch number: a member that joined later or
    resumed is at another one), evaluates them on the validation split, calls each member's hook and returns
    the members that left: stopped by their hook, failed in it, or done with `max_epochs`."""

    def __init__(self, cfg: TrainConfig, max_epochs: int) -> None:
        reason = unpackable(cfg)
        if reason is not None:
            raise ValueError(f"this config cannot be packed: {reason}")
        self.runtime: Runtime = resolve_runtime(cfg.device)
        self.data: DataSplits = load_data(cfg, self.runtime.device)
        self.shared = shared(cfg)
        self.max_epochs = max_epochs
        self.members: list[PackMember] = []
        self.ready: list[PackMember] = []  # resumed after their last epoch: they leave at the next run_epoch
        self.packed: PackedCNN | None = None

    def __len__(self) -> int:
        return len(self.members) + len(self.ready)

    def add(self, cfg: TrainConfig, on_epoch: OnEpoch | None = None, resume: dict[str, Any] | None = None,
            key: Any = None) -> PackMember:
        """A new member, built exactly as `fit` builds a trial (same seed -> same weights), or resumed."""
        reason = unpackable(cfg)
        if reason is not None:
            raise ValueError(f"this config cannot join the pack: {reason}")
        if shared(cfg) != self.shared:
            diff = sorted(k for k, v in shared(cfg).items() if self.shared[k] != v)
            raise ValueError(f"this config cannot join the pack: it differs in {diff}")
        state = new_state(cfg, self.data, self.runtime, self.max_epochs)
        if resume is not None:
            state.load_state_dict(resume)
        padding, flip = augmentation(cfg, self.data)
        member = PackMember(cfg, state, on_epoch, padding, flip, key)
        if state.epoch + 1 >= self.max_epochs:  # `fit` would train no epoch either
            self.ready.append(member)
        else:
            self._regroup([*self.members, member])
        return member

    def remove(self, key: Any) -> None:
        """Take the member with `key` out of the pack (the caller ends its trial); the others go on unchanged."""
        self.ready = [m for m in self.ready if m.key != key]
        self._regroup([m for m in self.members if m.key != key])

    def _regroup(self, members: list[PackMember]) -> None:
        """Pack `members` afresh: the old pack's statistics go back into its members first. Parameters and
        optimiser state are the members' own and are not touched."""
        if self.packed is not None:
            self.packed.sync()
        self.members = members
        self.packed = PackedCNN([m.state.model for m in members]) if members else None  # type: ignore[misc]

    def run_epoch(self) -> list[PackMember]:
        """One epoch of every member; returns (and drops from the pack) the members that left."""
        ready, self.ready = self.ready, []
        if self.packed is None:
            return ready
        members = self.members
        lrs = [m.state.scheduler.start_epoch(m.state.epoch + 1) for m in members]
        start = time.perf_counter()
        losses = self._train_epoch()
        train_seconds = time.perf_counter() - start
        vals = self._evaluate()
        epoch_seconds = time.perf_counter() - start
        self.packed.sync()  # the hooks may save a member's weights: its BatchNorm statistics must be current
        left = []
        n = len(self.data.train_y)
        for m, loss, val, lr in zip(members, losses, vals, lrs, strict=True):
            epoch = m.state.epoch + 1
            m.state.scheduler.end_epoch(epoch, val["loss"])
            metrics = epoch_metrics(loss, val, lr, epoch_seconds, n / train_seconds)
            m.state.epoch = epoch
            m.state.history.append(metrics)
            stop = False
            if m.on_epoch is not None:
                try:
                    stop = bool(m.on_epoch(epoch, metrics, m.state))
                except Exception as exc:  # noqa: BLE001 - the member's own failure (e.g. pruned): it alone leaves
                    m.error, stop = exc, True
            m.stopped_by_hook = stop and m.error is None
            if stop or epoch + 1 >= self.max_epochs:
                left.append(m)
        if left:
            self._regroup([m for m in members if m not in left])
        return ready + left

    def _train_epoch(self) -> list[float]:
        """One pass of every member over its own shuffled training set; mean loss per member."""
        assert self.packed is not None
        data, runtime, members = self.data, self.runtime, self.members
        n = len(data.train_y)
        batch_size = int(self.shared["batch_size"])
        epochs = [batch_indices(n, batch_size, m.state.generator, data.x_device) for m in members]
        dropout = [(m.cfg.dropout, m.state.generator) for m in members]
        smoothing = {m.cfg.label_smoothing for m in members}
        k = len(members)
        totals = torch.zeros(k, device=runtime.device)
        for batches in zip(*epochs, strict=True):
            b = len(batches[0])
            idx = torch.cat(batches)  # one gather for all members: member j's batch in rows j*b..(j+1)*b
            xs = list(data.take(data.train_x, idx).split(b))
            y = data.train_y[idx.to(runtime.device)].view(k, b)
            for j, m in enumerate(members):
                if m.padding or m.flip:
                    xs[j] = augment_batch(xs[j], m.padding, m.flip, m.state.generator)
            x = torch.cat(xs, dim=1)
            if runtime.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with runtime.autocast():
                logits = self.packed.forward(x, True, dropout)
            if len(smoothing) == 1:  # one cross-entropy over all members' rows, each member's mean apart
                ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none",
                                     label_smoothing=next(iter(smoothing)))
                losses = ce.view(k, b).mean(dim=1)
            else:
                losses = torch.stack([
                    F.cross_entropy(logits[j].float(), y[j], label_smoothing=m.cfg.label_smoothing)
                    for j, m in enumerate(members)
                ])
            for m in members:
                m.update.zero_grad()
            losses.sum().backward()
            for m in members:
                optimizer_step(m.cfg, m.state.model, m.state.optimizer, m.update)
            totals += losses.detach() * b
        return (totals / n).tolist()

    @torch.no_grad()
    def _evaluate(self) -> list[dict[str, float]]:
        """Every member on the validation split (the same images, repeated along the channels)."""
        assert self.packed is not None
        data, runtime, k = self.data, self.runtime, len(self.members)
        x, y, batch = data.val_x, data.val_y, int(self.shared["eval_batch_size"])
        loss_sum = torch.zeros(k, device=y.device)
        preds = []
        for start in range(0, len(y), batch):
            xb, yb = data.inputs(x[start : start + batch]), y[start : start + batch]
            xb = xb.repeat(1, k, 1, 1)
            if runtime.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with runtime.autocast():
                logits = self.packed.forward(xb, False, []).float()  # [K, b, classes]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.repeat(k), reduction="none")
            loss_sum += ce.view(k, -1).sum(dim=1)
            preds.append(logits.argmax(dim=2))
        pred = torch.cat(preds, dim=1)
        return [scores(loss_sum[j], pred[j], y, data.num_classes) for j in range(k)]

    def result(self, member: PackMember) -> FitResult:
        """What `fit` returns for this member (its own plain CNN, history and data)."""
        return FitResult(member.state.model, member.state.epoch + 1, member.state.history, member.stopped_by_hook,
                         self.data, member.state.spec)


def fit_packed(cfgs: list[TrainConfig], max_epochs: int, hooks: list[OnEpoch | None] | None = None,
               resumes: list[dict[str, Any] | None] | None = None) -> list[FitResult]:
    """`fit` for several configs at once, packed; a member whose hook raises re-raises here once all are done."""
    hooks = hooks or [None] * len(cfgs)
    resumes = resumes or [None] * len(cfgs)
    pack = PackedFit(cfgs[0], max_epochs)
    members = [pack.add(cfg, hook, resume, key=i)
               for i, (cfg, hook, resume) in enumerate(zip(cfgs, hooks, resumes, strict=True))]
    while len(pack):
        pack.run_epoch()
    for m in members:
        if m.error is not None:
            raise m.error
    return [pack.result(m) for m in members]
