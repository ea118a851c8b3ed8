"""Fit diagnosis rules on hand-made curves: each rule, its order, and the numbers in its reason."""

from __future__ import annotations

import math

import pytest

from search.diagnosis import GOOD_FIT, OVERFITTING, UNDERFITTING, UNKNOWN, diagnose

FALLING = [2.0, 1.2, 0.8, 0.5, 0.35, 0.3, 0.28, 0.27, 0.27, 0.27]


def test_plateaued_curves_are_a_good_fit() -> None:
    val = [1.8, 1.1, 0.7, 0.5, 0.4, 0.36, 0.35, 0.35, 0.352, 0.353]
    d = diagnose({"train_loss": FALLING, "val_loss": val}, max_epochs=10)
    assert d.label == GOOD_FIT
    assert "epoch 6" in d.reason  # the best validation epoch is named


def test_val_loss_turning_up_while_train_falls_is_overfitting() -> None:
    train = [2.0, 1.0, 0.6, 0.4, 0.3, 0.2, 0.15, 0.1]
    val = [1.9, 1.0, 0.7, 0.6, 0.62, 0.68, 0.74, 0.8]
    d = diagnose({"train_loss": train, "val_loss": val}, max_epochs=20)
    assert d.label == OVERFITTING
    assert "rose 33%" in d.reason and "epoch 3" in d.reason


def test_a_wide_generalisation_gap_is_overfitting() -> None:
    train = [2.0, 0.8, 0.3, 0.1, 0.05, 0.04]
    val = [2.0, 1.0, 0.5, 0.40, 0.39, 0.395]
    assert diagnose({"train_loss": train, "val_loss": val}, max_epochs=20).label == OVERFITTING


def test_train_loss_that_barely_fell_is_underfitting() -> None:
    train = [2.3, 2.2, 2.1, 2.0, 1.9]
    val = [2.3, 2.2, 2.15, 2.1, 2.05]
    d = diagnose({"train_loss": train, "val_loss": val}, max_epochs=20)
    assert d.label == UNDERFITTING and "2.3 to 1.9" in d.reason


def test_still_learning_at_the_end_of_the_budget_is_underfitting_but_not_with_epochs_left() -> None:
    train = [2.0, 1.2, 0.8, 0.6, 0.5, 0.45]
    val = [1.9, 1.1, 0.8, 0.6, 0.5, 0.4]
    assert diagnose({"train_loss": train, "val_loss": val}, max_epochs=6).label == UNDERFITTING
    # the same curves ended early (say, by a time limit) with budget left: no evidence of too few epochs
    assert diagnose({"train_loss": train, "val_loss": val}, max_epochs=20).label == GOOD_FIT


@pytest.mark.parametrize("history", [
    {"train_loss": [1.0, 0.5], "val_loss": [1.0, 0.6]},
    {"train_loss": [1.0, 0.5, 0.3], "val_loss": [1.0, math.nan, 0.3]},
    {},
])
def test_too_little_or_non_finite_data_is_unknown(history: dict) -> None:
    assert diagnose(history, max_epochs=10).label == UNKNOWN
