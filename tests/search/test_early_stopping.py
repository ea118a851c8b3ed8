"""Hand-worked sequences pinning the exact epoch at which EarlyStopping says stop.

Values are chosen to be exact in binary floating point (halves, quarters, eighths) so that the
comparisons below are exactly the ones worked out in the comments.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest

from search.early_stopping import EarlyStopping

NAN = math.nan
INF = math.inf


def stop_epoch(stopper: EarlyStopping, values: list[float]) -> int | None:
    """Feed values one epoch at a time; the epoch at which update first returns True, or None."""
    for epoch, value in enumerate(values):
        if stopper.update(value):
            assert stopper.stopped_epoch == epoch
            return epoch
    assert stopper.stopped_epoch is None
    return None


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    # allow_nan=False: the state must be strict JSON, not Python's NaN/Infinity extension.
    return json.loads(json.dumps(state, allow_nan=False))


# --- defaults and patience -------------------------------------------------------------------------


def test_initial_state() -> None:
    stopper = EarlyStopping()
    assert (stopper.monitor, stopper.mode, stopper.patience) == ("val_loss", "min", 5)
    assert stopper.best == INF
    assert stopper.best_epoch is None and stopper.stopped_epoch is None and stopper.reason is None
    assert (stopper.wait, stopper.epoch, stopper.improved) == (0, -1, False)
    assert stopper.restore_best is True
    assert EarlyStopping(mode="max").best == -INF


def test_patience_min_mode() -> None:
    # e0 1.0 best | e1 0.8 best | e2 0.9 wait 1 | e3 0.85 wait 2 | e4 0.8 equals best, not better: wait 3
    stopper = EarlyStopping(patience=3)
    assert stop_epoch(stopper, [1.0, 0.8, 0.9, 0.85, 0.8, 0.1]) == 4
    assert (stopper.best, stopper.best_epoch, stopper.wait, stopper.reason) == (0.8, 1, 3, "patience")
    assert stopper.epoch == 4
    assert stopper.improved is False


def test_patience_max_mode_wait_resets_on_improvement() -> None:
    # e0 .5 best | e1 .625 best | e2 .625 wait 1 | e3 .75 best, wait 0 | e4 .5 wait 1 | e5 .625 wait 2
    stopper = EarlyStopping(monitor="val_accuracy", mode="max", patience=2)
    assert stop_epoch(stopper, [0.5, 0.625, 0.625, 0.75, 0.5, 0.625, 1.0]) == 5
    assert (stopper.best, stopper.best_epoch, stopper.reason) == (0.75, 3, "patience")


@pytest.mark.parametrize(("patience", "expected"), [(1, 2), (2, 3), (3, 4), (4, None)])
def test_patience_counts_epochs_without_improvement(patience: int, expected: int | None) -> None:
    # Best at e1, then flat: the stop comes `patience` epochs after e1.
    assert stop_epoch(EarlyStopping(patience=patience), [2.0, 1.0, 1.0, 1.0, 1.0]) == expected


def test_improved_flag_follows_each_update() -> None:
    stopper = EarlyStopping(patience=5)
    flags = []
    for value in [1.0, 0.5, 0.75, 0.25]:
        stopper.update(value)
        flags.append(stopper.improved)
    assert flags == [True, True, False, True]


def test_restore_best_does_not_change_the_decision() -> None:
    values = [1.0, 0.5, 0.75, 0.75, 0.75]
    assert stop_epoch(EarlyStopping(patience=2, restore_best=False), values) == 3
    assert stop_epoch(EarlyStopping(patience=2, restore_best=True), values) == 3


# --- min_delta --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        # 0.75 is exactly min_delta below 1.0: not an improvement, so patience 1 stops at e1.
        ("min", [1.0, 0.75, 0.0], 1),
        # 0.625 beats 1.0 by 0.375 > 0.25; 0.375 beats 0.625 by exactly 0.25: stop at e2.
        ("min", [1.0, 0.625, 0.375, 0.0], 2),
        ("max", [0.0, 0.25, 1.0], 1),
        ("max", [0.0, 0.5, 0.75, 1.0], 2),
    ],
)
def test_change_equal_to_min_delta_is_not_an_improvement(
    mode: str, values: list[float], expected: int
) -> None:
    stopper = EarlyStopping(mode=mode, patience=1, min_delta=0.25)
    assert stop_epoch(stopper, values) == expected
    assert stopper.best == values[expected - 1]


def test_min_delta_is_measured_from_best_not_from_last_value() -> None:
    # min_delta 0.25, patience 2: e1 0.875 is within 0.25 of best 1.0 (wait 1, best stays 1.0);
    # e2 0.625 is only 0.25 below e1 but 0.375 below best, so it improves. e3, e4 flat: stop at e4.
    stopper = EarlyStopping(patience=2, min_delta=0.25)
    assert stop_epoch(stopper, [1.0, 0.875, 0.625, 0.5, 0.5]) == 4
    assert (stopper.best, stopper.best_epoch) == (0.625, 2)


# --- smoothing --------------------------------------------------------------------------------------


def test_smoothing_outlasts_a_lucky_dip() -> None:
    values = [4.0, 1.0, 3.0, 2.0, 2.0, 3.0, 3.0]
    # Raw, patience 2: best 1.0 at e1, e2 3.0 and e3 2.0 do not beat it -> stop at e3.
    assert stop_epoch(EarlyStopping(patience=2), values) == 3
    # EMA with smoothing 0.5, s_t = 0.5 * s_{t-1} + 0.5 * v_t:
    #   s0 = 4 | s1 = 2 + 0.5 = 2.5 best | s2 = 1.25 + 1.5 = 2.75 wait 1 | s3 = 1.375 + 1 = 2.375 best
    #   s4 = 1.1875 + 1 = 2.1875 best | s5 = 1.09375 + 1.5 = 2.59375 wait 1
    #   s6 = 1.296875 + 1.5 = 2.796875 wait 2 -> stop at e6.
    stopper = EarlyStopping(patience=2, smoothing=0.5)
    assert stop_epoch(stopper, values) == 6
    assert (stopper.best, stopper.best_epoch) == (2.1875, 4)


def test_smoothing_delays_the_stopping_threshold() -> None:
    values = [2.0, 0.5, 0.5, 0.5]
    # Raw: 0.5 <= 1.0 at e1.
    assert stop_epoch(EarlyStopping(patience=5, stopping_threshold=1.0), values) == 1
    # Smoothed: s0 = 2 | s1 = 1 + 0.25 = 1.25 > 1.0 | s2 = 0.625 + 0.25 = 0.875 <= 1.0 -> e2.
    stopper = EarlyStopping(patience=5, stopping_threshold=1.0, smoothing=0.5)
    assert stop_epoch(stopper, values) == 2
    assert (stopper.best, stopper.reason) == (0.875, "stopping_threshold")


def test_smoothing_with_uneven_weight() -> None:
    # smoothing 0.75: s0 = 8 | s1 = 6 + 0.25 * 0 = 6 best | s2 = 4.5 + 0.25 * 8 = 6.5 wait 1
    # -> stop at e2 with patience 1.
    stopper = EarlyStopping(patience=1, smoothing=0.75)
    assert stop_epoch(stopper, [8.0, 0.0, 8.0]) == 2
    assert stopper.best == 6.0


# --- non-finite values ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("mode", ["min", "max"])
def test_non_finite_stops_at_once_and_keeps_best(bad: float, mode: str) -> None:
    good = [1.0, 0.5] if mode == "min" else [0.5, 1.0]
    stopper = EarlyStopping(mode=mode, patience=5, smoothing=0.5)
    assert stop_epoch(stopper, [*good, bad, good[-1]]) == 2
    assert stopper.reason == "non_finite"
    assert stopper.best_epoch == 1 and math.isfinite(stopper.best)
    assert (stopper.wait, stopper.improved) == (0, False)


def test_non_finite_checked_before_thresholds() -> None:
    # +inf is past the divergence threshold and -inf meets the stopping threshold, but non-finite wins.
    stopper = EarlyStopping(stopping_threshold=0.0, divergence_threshold=10.0)
    assert stop_epoch(stopper, [1.0, INF]) == 1
    assert stopper.reason == "non_finite"
    stopper = EarlyStopping(stopping_threshold=0.0, divergence_threshold=10.0)
    assert stop_epoch(stopper, [1.0, -INF]) == 1
    assert stopper.reason == "non_finite"


def test_check_finite_false_treats_non_finite_as_a_plain_bad_epoch() -> None:
    # patience 2: e1 NaN wait 1 | e2 0.5 best | e3 NaN wait 1 | e4 inf wait 2 -> patience.
    stopper = EarlyStopping(patience=2, check_finite=False)
    assert stop_epoch(stopper, [1.0, NAN, 0.5, NAN, INF]) == 4
    assert (stopper.reason, stopper.best, stopper.best_epoch) == ("patience", 0.5, 2)


def test_check_finite_false_minus_inf_is_never_an_improvement() -> None:
    stopper = EarlyStopping(patience=1, check_finite=False)
    assert stop_epoch(stopper, [1.0, -INF]) == 1
    assert (stopper.best, stopper.reason) == (1.0, "patience")


def test_check_finite_false_keeps_nan_out_of_the_moving_average() -> None:
    # e1 NaN is skipped, so s2 = 0.5 * 1.0 + 0.5 * 0.5 = 0.75 rather than NaN forever.
    stopper = EarlyStopping(patience=3, smoothing=0.5, check_finite=False)
    assert stop_epoch(stopper, [1.0, NAN, 0.5]) is None
    assert (stopper.best, stopper.best_epoch, stopper.improved) == (0.75, 2, True)


def test_check_finite_false_leading_nan() -> None:
    stopper = EarlyStopping(patience=3, check_finite=False)
    assert stop_epoch(stopper, [NAN]) is None
    assert (stopper.best, stopper.best_epoch, stopper.wait) == (INF, None, 1)
    assert stop_epoch(stopper, [2.0]) is None
    assert (stopper.best, stopper.best_epoch, stopper.wait) == (2.0, 1, 0)


def test_check_finite_false_inf_still_trips_divergence() -> None:
    stopper = EarlyStopping(patience=5, check_finite=False, divergence_threshold=10.0)
    assert stop_epoch(stopper, [1.0, NAN, INF]) == 2
    assert stopper.reason == "divergence_threshold"


# --- thresholds -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "threshold", "values", "expected"),
    [
        ("min", 0.5, [1.0, 0.75, 0.5, 0.25], 2),  # reaching the threshold exactly counts
        ("min", 0.5, [1.0, 0.25], 1),
        ("max", 0.875, [0.5, 0.75, 0.875], 2),
        ("max", 0.875, [0.5, 1.0], 1),
    ],
)
def test_stopping_threshold(mode: str, threshold: float, values: list[float], expected: int) -> None:
    stopper = EarlyStopping(mode=mode, patience=10, stopping_threshold=threshold)
    assert stop_epoch(stopper, values) == expected
    assert stopper.reason == "stopping_threshold"
    # The value that met the target is also the best: the caller saves those weights.
    assert (stopper.best, stopper.best_epoch, stopper.improved) == (values[expected], expected, True)


@pytest.mark.parametrize(
    ("mode", "threshold", "values", "expected"),
    [
        ("min", 10.0, [1.0, 2.0, 10.0, 10.5], 3),  # equal to the threshold is not past it
        ("max", 0.125, [0.5, 0.125, 0.0625], 2),
    ],
)
def test_divergence_threshold(mode: str, threshold: float, values: list[float], expected: int) -> None:
    stopper = EarlyStopping(mode=mode, patience=10, divergence_threshold=threshold)
    assert stop_epoch(stopper, values) == expected
    assert (stopper.reason, stopper.best, stopper.best_epoch) == ("divergence_threshold", values[0], 0)


def test_divergence_on_the_first_epoch() -> None:
    # The first finite value is still recorded as best, whatever the stop reason.
    stopper = EarlyStopping(divergence_threshold=10.0)
    assert stop_epoch(stopper, [20.0]) == 0
    assert (stopper.reason, stopper.best, stopper.best_epoch) == ("divergence_threshold", 20.0, 0)


def test_stopping_threshold_is_checked_before_patience() -> None:
    # e1 0.75 is not an improvement (min_delta 0.5), so patience 1 would stop too, but the target wins.
    stopper = EarlyStopping(patience=1, min_delta=0.5, stopping_threshold=0.75)
    assert stop_epoch(stopper, [1.0, 0.75]) == 1
    assert (stopper.reason, stopper.improved, stopper.best, stopper.wait) == (
        "stopping_threshold",
        False,
        1.0,
        1,
    )


def test_divergence_threshold_is_checked_before_patience() -> None:
    stopper = EarlyStopping(patience=1, divergence_threshold=4.0)
    assert stop_epoch(stopper, [1.0, 5.0]) == 1
    assert stopper.reason == "divergence_threshold"


def test_equal_thresholds_are_allowed_and_never_both_met() -> None:
    stopper = EarlyStopping(patience=10, stopping_threshold=1.0, divergence_threshold=1.0)
    assert stop_epoch(stopper, [2.0]) == 0
    assert stopper.reason == "divergence_threshold"
    stopper = EarlyStopping(patience=10, stopping_threshold=1.0, divergence_threshold=1.0)
    assert stop_epoch(stopper, [1.0]) == 0
    assert stopper.reason == "stopping_threshold"


# --- after the stop ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "values", "reason"),
    [
        ({"patience": 1}, [1.0, 1.0], "patience"),
        ({}, [1.0, NAN], "non_finite"),
        ({"stopping_threshold": 0.5}, [1.0, 0.5], "stopping_threshold"),
        ({"divergence_threshold": 2.0}, [1.0, 3.0], "divergence_threshold"),
    ],
)
def test_updates_after_stop_return_true_and_change_nothing(
    kwargs: dict[str, Any], values: list[float], reason: str
) -> None:
    stopper = EarlyStopping(**kwargs)
    assert stop_epoch(stopper, values) == 1
    assert stopper.reason == reason
    frozen = stopper.state_dict()
    for value in [0.0, -5.0, NAN]:
        assert stopper.update(value) is True
    assert stopper.state_dict() == frozen


# --- weighted monitor -------------------------------------------------------------------------------


def test_value_from_single_metric() -> None:
    stopper = EarlyStopping(monitor="val_loss")
    assert stopper.value_from({"val_loss": 0.25, "val_accuracy": 0.5}) == 0.25


def test_value_from_weighted_sum() -> None:
    stopper = EarlyStopping(monitor={"val_accuracy": 0.75, "val_f1": 0.25}, mode="max")
    # 0.75 * 0.5 + 0.25 * 1.0 = 0.625; val_loss is ignored.
    assert stopper.value_from({"val_accuracy": 0.5, "val_f1": 1.0, "val_loss": 3.0}) == 0.625


def test_weighted_monitor_drives_the_stop() -> None:
    stopper = EarlyStopping(monitor={"val_accuracy": 0.75, "val_f1": 0.25}, mode="max", patience=1)
    epochs = [
        {"val_accuracy": 0.5, "val_f1": 0.5},  # 0.5 best
        {"val_accuracy": 0.75, "val_f1": 0.25},  # 0.5625 + 0.0625 = 0.625 best
        {"val_accuracy": 0.5, "val_f1": 1.0},  # 0.375 + 0.25 = 0.625, accuracy down, f1 up: no gain
    ]
    assert stop_epoch(stopper, [stopper.value_from(metrics) for metrics in epochs]) == 2
    assert (stopper.best, stopper.best_epoch) == (0.625, 1)


def test_negative_weight_folds_a_loss_into_a_max_objective() -> None:
    stopper = EarlyStopping(monitor={"val_accuracy": 1.0, "val_loss": -0.5}, mode="max")
    assert stopper.value_from({"val_accuracy": 0.75, "val_loss": 0.5}) == 0.5


@pytest.mark.parametrize(
    ("monitor", "match"),
    [
        ("val_loss", r"\['val_loss'\] not found in metrics; available: \['train_loss', 'val_acc'\]"),
        ({"val_acc": 0.5, "val_f1": 0.5}, r"\['val_f1'\] not found in metrics; available: \['train_loss'"),
    ],
)
def test_value_from_missing_metric(monitor: str | dict[str, float], match: str) -> None:
    stopper = EarlyStopping(monitor=monitor)
    with pytest.raises(ValueError, match=match):
        stopper.value_from({"val_acc": 0.5, "train_loss": 1.0})


# --- adaptive patience ------------------------------------------------------------------------------


def patience_history(stopper: EarlyStopping, values: list[float]) -> tuple[int | None, list[int]]:
    history = []
    for epoch, value in enumerate(values):
        stopped = stopper.update(value)
        history.append(stopper.patience)
        if stopped:
            return epoch, history
    return None, history


def test_adaptive_patience_grows_with_quick_improvements_up_to_max() -> None:
    values = [10.0, 9.0, 8.0, 7.0, 6.0, 6.0, 6.0, 6.0, 6.0]
    # e0 baseline, p 2 | e1..e4 improve with wait 0 < ceil(p/2): p 3, 4, 4 (max), 4
    # e5 wait 1 | e6 wait 2 = ceil(4/2): p 3 | e7 wait 3 >= 3 -> stop.
    stopper = EarlyStopping(patience=2, adaptive_patience=True, min_patience=1, max_patience=4)
    assert patience_history(stopper, values) == (7, [2, 3, 4, 4, 4, 4, 3, 3])
    assert stopper.reason == "patience"
    # Fixed patience 2 stops at e6.
    assert stop_epoch(EarlyStopping(patience=2), values) == 6


def test_adaptive_patience_shrinks_over_long_plateaus_down_to_min() -> None:
    values = [10.0, 10.0, 10.0, 10.0, 9.0, 9.0, 9.0, 9.0, 8.0, 8.0, 8.0] + [7.0] * 7
    # e1-e3 wait 1..3; at 3 = ceil(6/2) p 5 | e4 improves late (3 >= ceil(5/2)): p stays 5
    # e5-e7 wait 1..3; at 3 = ceil(5/2) p 4 | e8 improves late (3 >= 2): p 4
    # e9-e10 wait 1..2; at 2 = ceil(4/2) p 3 (min) | e11 improves late (2 >= 2): p 3
    # e12-e13 wait 1..2; at 2 = ceil(3/2) p would be 2 but is floored at 3 | e14 wait 3 >= 3 -> stop.
    stopper = EarlyStopping(patience=6, adaptive_patience=True, min_patience=3, max_patience=8)
    expected_history = [6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 3, 3, 3, 3, 3]
    assert patience_history(stopper, values) == (14, expected_history)
    assert (stopper.best, stopper.best_epoch) == (7.0, 11)
    # Fixed patience 6: every plateau is shorter than 6 until the last, which runs e12..e17.
    assert stop_epoch(EarlyStopping(patience=6), values) == 17


def test_adaptive_patience_short_plateau_still_earns() -> None:
    values = [5.0, 4.0, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0]
    # e1 wait 0 < 2: p 4 | e2 wait 1 | e3 improves, wait 1 < ceil(4/2): p 5
    # e4-e6 wait 1..3; at 3 = ceil(5/2) p 4 | e7 wait 4 >= 4 -> stop.
    stopper = EarlyStopping(patience=3, adaptive_patience=True, min_patience=2, max_patience=5)
    assert patience_history(stopper, values) == (7, [3, 4, 4, 5, 5, 5, 4, 4])


def test_adaptive_patience_shrink_can_end_the_plateau_on_the_same_epoch() -> None:
    # p 3: wait 2 = ceil(3/2) shrinks p to 2, and wait 2 >= 2 stops that same epoch.
    stopper = EarlyStopping(patience=3, adaptive_patience=True, min_patience=1, max_patience=3)
    assert patience_history(stopper, [1.0, 1.0, 1.0]) == (2, [3, 3, 2])


def test_adaptive_patience_default_bounds() -> None:
    stopper = EarlyStopping(patience=5, adaptive_patience=True)
    assert (stopper.min_patience, stopper.max_patience) == (2, 10)
    stopper = EarlyStopping(patience=1, adaptive_patience=True)
    assert (stopper.min_patience, stopper.max_patience) == (1, 2)


def test_fixed_patience_never_changes() -> None:
    stopper = EarlyStopping(patience=3)
    _, history = patience_history(stopper, [5.0, 4.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0])
    assert set(history) == {3}


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize(("patience", "low", "high"), [(1, 1, 1), (3, 1, 6), (5, 3, 7), (4, 4, 9)])
def test_adaptive_patience_stays_in_bounds(seed: int, patience: int, low: int, high: int) -> None:
    rng = random.Random(seed)
    stopper = EarlyStopping(
        patience=patience, adaptive_patience=True, min_patience=low, max_patience=high, check_finite=False
    )
    for _ in range(200):
        value = rng.choice([rng.random(), rng.random() * 0.1, NAN])
        stopped = stopper.update(value)
        assert low <= stopper.patience <= high
        if stopped:
            assert stopper.wait >= stopper.patience or stopper.reason != "patience"
            break


# --- state_dict / load_state_dict -------------------------------------------------------------------


def noisy_curve(seed: int, length: int = 80) -> list[float]:
    rng = random.Random(seed)
    return [1.0 / (1 + 0.2 * epoch) + rng.uniform(-0.05, 0.05) for epoch in range(length)]


ROUNDTRIP_CASES = [
    ({"patience": 4}, noisy_curve(0)),
    ({"patience": 3, "min_delta": 0.01, "smoothing": 0.6}, noisy_curve(1)),
    ({"patience": 4, "adaptive_patience": True, "min_patience": 2, "max_patience": 7}, noisy_curve(2)),
    (
        {"mode": "max", "patience": 3, "smoothing": 0.3, "adaptive_patience": True},
        [-value for value in noisy_curve(3)],
    ),
    ({"patience": 3, "check_finite": False}, [NAN, NAN, *noisy_curve(4)[:10], NAN, *noisy_curve(5)]),
    ({"patience": 50, "stopping_threshold": 0.3}, noisy_curve(6)),
    ({"monitor": {"val_loss": 0.5, "val_aux": 0.5}, "patience": 3}, noisy_curve(7)),
]


@pytest.mark.parametrize(("kwargs", "values"), ROUNDTRIP_CASES)
def test_state_dict_roundtrip_continues_to_the_same_stop(kwargs: dict[str, Any], values: list[float]) -> None:
    reference = EarlyStopping(**kwargs)
    expected = stop_epoch(reference, values)
    assert expected is not None, "the case should stop within its sequence"

    for cut in range(expected + 2):  # every cut, including before the first update and after the stop
        first = EarlyStopping(**kwargs)
        stop_epoch(first, values[:cut])
        resumed = EarlyStopping(**kwargs)
        resumed.load_state_dict(roundtrip(first.state_dict()))
        assert resumed.state_dict() == first.state_dict()

        if resumed.stopped_epoch is None:
            stopped_at = next(
                (cut + i for i, value in enumerate(values[cut:]) if resumed.update(value)), None
            )
        else:  # cut after the stop: the resumed instance must stay stopped
            assert resumed.update(values[cut]) is True
            stopped_at = resumed.stopped_epoch
        assert stopped_at == expected
        assert resumed.state_dict() == reference.state_dict()
        assert (resumed.best, resumed.best_epoch, resumed.reason) == (
            reference.best,
            reference.best_epoch,
            reference.reason,
        )


def test_state_dict_before_any_improvement_is_strict_json() -> None:
    stopper = EarlyStopping(mode="max", check_finite=False)
    stopper.update(NAN)
    state = roundtrip(stopper.state_dict())
    assert state["best"] is None and state["smoothed"] is None
    resumed = EarlyStopping(mode="max", check_finite=False)
    resumed.load_state_dict(state)
    assert (resumed.best, resumed.wait, resumed.epoch) == (-INF, 1, 0)


def test_load_state_dict_rejects_mismatched_or_incomplete_state() -> None:
    state = EarlyStopping().state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['wait'\]"):
        EarlyStopping().load_state_dict({k: v for k, v in state.items() if k != "wait"})
    with pytest.raises(ValueError, match="saved in mode 'min', this instance uses 'max'"):
        EarlyStopping(mode="max").load_state_dict(state)
    with pytest.raises(ValueError, match="saved for monitor 'val_loss'"):
        EarlyStopping(monitor="val_accuracy").load_state_dict(state)


# --- argument validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "mean"}, "mode must be 'min' or 'max', got 'mean'"),
        ({"patience": 0}, "patience must be an integer >= 1, got 0"),
        ({"patience": 2.5}, "patience must be an integer >= 1, got 2.5"),
        ({"patience": True}, "patience must be an integer >= 1, got True"),
        ({"min_delta": -0.1}, "min_delta must be a finite number >= 0"),
        ({"min_delta": NAN}, "min_delta must be a finite number >= 0"),
        ({"smoothing": 1.0}, r"smoothing must be in \[0, 1\), got 1.0"),
        ({"smoothing": -0.1}, r"smoothing must be in \[0, 1\)"),
        ({"monitor": ""}, "monitor must be a non-empty metric name"),
        ({"monitor": 42}, "monitor must be a metric name or a mapping"),
        ({"monitor": {}}, "monitor mapping must name at least one metric"),
        ({"monitor": {"val_f1": NAN}}, "monitor weight for 'val_f1' must be a finite number"),
        ({"monitor": {"val_f1": INF}}, "monitor weight for 'val_f1' must be a finite number"),
        ({"monitor": {"val_f1": "0.5"}}, "monitor weight for 'val_f1' must be a finite number"),
        ({"monitor": {"": 1.0}}, "monitor keys must be non-empty metric names"),
        ({"stopping_threshold": INF}, "stopping_threshold must be a finite number or None"),
        ({"divergence_threshold": NAN}, "divergence_threshold must be a finite number or None"),
        (
            {"stopping_threshold": 1.0, "divergence_threshold": 0.5},
            "in min mode divergence_threshold must be >= stopping_threshold",
        ),
        (
            {"mode": "max", "stopping_threshold": 0.5, "divergence_threshold": 1.0},
            "in max mode divergence_threshold must be <= stopping_threshold",
        ),
        ({"min_patience": 2}, r"only apply with adaptive_patience=True"),
        ({"max_patience": 9}, r"only apply with adaptive_patience=True"),
        (
            {"patience": 5, "adaptive_patience": True, "min_patience": 6},
            "min_patience <= patience <= max_patience, got 6 <= 5 <= 10",
        ),
        (
            {"patience": 5, "adaptive_patience": True, "max_patience": 4},
            "min_patience <= patience <= max_patience, got 2 <= 5 <= 4",
        ),
        ({"adaptive_patience": True, "min_patience": 0}, "min_patience must be an integer >= 1, got 0"),
        ({"adaptive_patience": True, "max_patience": 7.5}, "max_patience must be an integer >= 1, got 7.5"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EarlyStopping(**kwargs)
