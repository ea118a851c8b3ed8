"""Your own training loop for `hpo run`: an MLP on scikit-learn's digits, with its own loss and metrics.

hpo calls `train(config, on_epoch)` once per trial. `config.params` holds the sampled [space] values,
`config.settings` the fixed [objective.settings]; report every epoch to `on_epoch` and stop when it says so.
hpo does the rest: early stopping, pruning, MLflow, checkpoints of the best weights, dashboard notes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

if TYPE_CHECKING:  # types only: this file needs nothing from hpo at run time
    from objectives.custom import OnEpoch, TrialConfig


def build_model(hidden: int, dropout: float) -> nn.Module:
    """8x8 digit images (64 pixels) -> 10 class scores; the test rebuilds it to load a checkpoint."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))


def digits(device: torch.device) -> tuple[torch.Tensor, ...]:
    """Train and validation tensors on the device; the split is fixed so every trial is scored alike."""
    x, y = load_digits(return_X_y=True)
    parts = train_test_split(x / 16.0, y, test_size=0.25, random_state=0, stratify=y)
    return tuple(torch.as_tensor(p, dtype=torch.float32 if p.ndim == 2 else torch.long, device=device)
                 for p in parts)


def train(config: TrialConfig, on_epoch: OnEpoch) -> nn.Module:
    x_train, x_val, y_train, y_val = digits(config.device)
    model = build_model(config.get("hidden", 64), config.get("dropout", 0.0)).to(config.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.get("lr", 1e-3),
                                  weight_decay=config.get("weight_decay", 0.0))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.get("label_smoothing", 0.0))  # your own loss here
    batch_size = config.get("batch_size", 64)
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.max_epochs):
        model.train()
        total = 0.0
        for batch in torch.randperm(len(x_train), generator=generator).to(config.device).split(batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        model.eval()
        with torch.no_grad():
            logits = model(x_val)
            metrics = {
                "train_loss": total / len(x_train),
                "val_loss": loss_fn(logits, y_val).item(),
                "val_accuracy": (logits.argmax(1) == y_val).float().mean().item(),
            }
        if on_epoch(epoch, metrics, model):  # True: early stopping or max_epochs says stop (pruning raises)
            break
    return model
