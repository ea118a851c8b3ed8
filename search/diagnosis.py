"""Fit diagnosis: label a finished trial underfitting, overfitting or good fit from its per-epoch curves.

Pure functions over plain lists, so the rules can be tested without training. The rules, in order
(the first that matches wins; epochs are 0-based, ``b`` is the epoch with the lowest validation loss):

1. **unknown**: fewer than ``MIN_EPOCHS`` epochs with a finite train and validation loss.
2. **underfitting**: the model barely learned the training data (the last train loss is above
   ``UNDERFIT_TRAIN_FRACTION`` of the first epoch's), or it was still improving when the epoch budget ran
   out (it ran all ``max_epochs``, its best validation loss is in the last two epochs, and validation
   loss fell by more than ``STILL_LEARNING`` (relative) over the last ``STILL_LEARNING_EPOCHS`` epochs):
   more epochs, a higher learning rate or a bigger model would help.
3. **overfitting**: validation loss turned back up (the last is more than ``OVERFIT_RISE`` above its
   minimum) while training loss kept falling after ``b``; or a wide generalisation gap at ``b``
   (validation loss more than ``OVERFIT_GAP_RATIO`` times the training loss and more than
   ``OVERFIT_GAP_ABS`` above it): more regularisation or less capacity would help.
4. **good fit**: none of the above.

Training loss is measured with augmentation and dropout on, so it can sit above validation loss in a
good fit; the gap rule only looks at validation loss being *higher*.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

UNKNOWN, UNDERFITTING, OVERFITTING, GOOD_FIT = "unknown", "underfitting", "overfitting", "good fit"
LABELS = (UNDERFITTING, OVERFITTING, GOOD_FIT, UNKNOWN)

MIN_EPOCHS = 3
UNDERFIT_TRAIN_FRACTION = 0.5
STILL_LEARNING = 0.02
STILL_LEARNING_EPOCHS = 3
OVERFIT_RISE = 0.10
OVERFIT_GAP_RATIO = 2.0
OVERFIT_GAP_ABS = 0.10


@dataclass(frozen=True)
class Diagnosis:
    """A label and the numbers that decided it, in one sentence a user can check against the curves."""

    label: str
    reason: str


def _curve(history: Mapping[str, Sequence[float]], key: str) -> list[float]:
    return [float(v) for v in history.get(key, [])]


def diagnose(history: Mapping[str, Sequence[float]], max_epochs: int | None = None) -> Diagnosis:
    """Label one trial from ``{"train_loss": [...], "val_loss": [...]}`` (one value per epoch, from epoch 0)."""
    train, val = _curve(history, "train_loss"), _curve(history, "val_loss")
    n = min(len(train), len(val))
    train, val = train[:n], val[:n]
    if n < MIN_EPOCHS or not all(math.isfinite(v) for v in train + val):
        return Diagnosis(UNKNOWN, f"{n} epochs of finite train/val loss; at least {MIN_EPOCHS} are needed")
    b = min(range(n), key=val.__getitem__)
    last = n - 1
    if train[last] > UNDERFIT_TRAIN_FRACTION * train[0]:
        return Diagnosis(UNDERFITTING, f"train loss only fell from {train[0]:.3g} to {train[last]:.3g} "
                                       f"(kept more than {UNDERFIT_TRAIN_FRACTION:.0%} of it)")
    k = STILL_LEARNING_EPOCHS
    if max_epochs is not None and n >= max_epochs and b >= last - 1 and n > k:
        drop = (val[last - k] - val[last]) / max(abs(val[last - k]), 1e-12)
        if drop > STILL_LEARNING:
            return Diagnosis(UNDERFITTING, f"still learning when the {max_epochs}-epoch budget ran out: val loss "
                                           f"fell {drop:.1%} over the last {k} epochs")
    rise = (val[last] - val[b]) / max(abs(val[b]), 1e-12)
    if b < last and rise > OVERFIT_RISE and train[last] < train[b]:
        return Diagnosis(OVERFITTING, f"val loss rose {rise:.0%} after its minimum at epoch {b} "
                                      f"({val[b]:.3g} -> {val[last]:.3g}) while train loss kept falling")
    if val[b] > OVERFIT_GAP_RATIO * train[b] and val[b] - train[b] > OVERFIT_GAP_ABS:
        return Diagnosis(OVERFITTING, f"at its best epoch {b} val loss {val[b]:.3g} is "
                                      f"{val[b] / max(train[b], 1e-12):.1f}x train loss {train[b]:.3g}")
    return Diagnosis(GOOD_FIT, f"train loss fell to {train[last]:.3g}, val loss best {val[b]:.3g} at epoch {b} "
                               f"and ended {rise:+.0%} from it")
