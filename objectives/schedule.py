"""Per-epoch learning-rate schedules with linear warmup, behind one object with one state_dict."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

from objectives.settings import TrainConfig


class EpochSchedule:
    """Sets every param group's learning rate at the start of each epoch; the lr is constant within it.

    Warmup is per epoch: epoch e < warmup_epochs runs at lr * (e + 1) / (warmup_epochs + 1). The named
    schedule then starts from the full lr at epoch `warmup_epochs` and runs over the remaining
    T = max_epochs - warmup_epochs epochs (t = epochs since warmup):
    constant 1; step gamma ** (t // step_size); cosine (1 + cos(pi t / T)) / 2; exponential gamma ** t;
    polynomial (1 - t / T) ** power; plateau: torch's ReduceLROnPlateau, stepped with the validation
    loss at the end of each post-warmup epoch (see `end_epoch`).
    """

    def __init__(self, optimizer: Optimizer, cfg: TrainConfig, max_epochs: int) -> None:
        self.optimizer = optimizer
        self.kind = cfg.schedule
        self.base_lr = cfg.lr
        self.warmup = cfg.warmup_epochs
        self.span = max(1, max_epochs - cfg.warmup_epochs)
        self.step_size, self.gamma, self.power = cfg.step_size, cfg.gamma, cfg.power
        self.plateau = (
            ReduceLROnPlateau(optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
            if cfg.schedule == "plateau"
            else None
        )

    def factor(self, t: int) -> float:
        """Multiplier of the base lr `t` epochs after warmup, for every schedule but plateau."""
        if self.kind == "step":
            return self.gamma ** (t // self.step_size)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(t, self.span) / self.span))
        if self.kind == "exponential":
            return self.gamma**t
        if self.kind == "polynomial":
            return max(0.0, 1.0 - t / self.span) ** self.power
        return 1.0

    def start_epoch(self, epoch: int) -> float:
        """Set and return the lr for `epoch`."""
        if epoch < self.warmup:
            lr = self.base_lr * (epoch + 1) / (self.warmup + 1)
        elif self.plateau is None:
            lr = self.base_lr * self.factor(epoch - self.warmup)
        elif epoch == self.warmup:
            lr = self.base_lr
        else:
            return float(self.optimizer.param_groups[0]["lr"])  # whatever the plateau rule left
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], Tensor):  # a graphed step's lr (train.lr_as_tensors): set where it is read
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        return lr

    def end_epoch(self, epoch: int, val_loss: float) -> None:
        """Feed the epoch's validation loss to the plateau rule (a no-op for the other schedules). A group's lr
        held as a tensor (a step captured once as a CUDA graph reads it there) stays that tensor: torch 2.14 sets
        the reduced lr into it, a torch that assigns a number instead would leave the graph on the old lr."""
        if self.plateau is not None and epoch >= self.warmup:
            held = [group["lr"] for group in self.optimizer.param_groups]
            self.plateau.step(val_loss)
            for group, lr in zip(self.optimizer.param_groups, held, strict=True):
                if isinstance(lr, Tensor) and group["lr"] is not lr:
                    lr.fill_(float(group["lr"]))
                    group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        """Only the plateau rule has state; the others are a function of the epoch."""
        return {"kind": self.kind, "plateau": self.plateau.state_dict() if self.plateau is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"checkpoint was trained with schedule {state['kind']!r}, config says {self.kind!r}")
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])
