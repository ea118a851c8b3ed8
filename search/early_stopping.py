"""Early stopping as a small decision object, in the spirit of Keras' and Lightning's ``EarlyStopping``.

It holds no model and imports no framework: the training loop feeds it one monitored value per epoch and
it answers "stop now?". Keeping it pure makes the decision easy to test by hand and cheap to checkpoint
(``state_dict`` is plain JSON), so a resumed trial stops at exactly the epoch an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["EarlyStopping"]

_MODES = ("min", "max")
_STATE_KEYS = (
    "mode",
    "monitor",
    "epoch",
    "wait",
    "patience",
    "best",
    "best_epoch",
    "stopped_epoch",
    "reason",
    "improved",
    "smoothed",
)


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but patience=True is a bug, not a patience of 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class EarlyStopping:
    """Decide, one epoch at a time, when a trial should stop training.

    Call ``update(value)`` once per epoch (epochs counted from 0) with the monitored value, for instance
    ``update(stopper.value_from(metrics))``; it returns True when training should stop. After it has
    returned True once, further calls return True again and change nothing, so a loop that keeps asking
    cannot corrupt the record of why and when it stopped.

    Per epoch the value goes through these steps:

    1. A non-finite value (NaN, +/-inf) stops at once with reason ``"non_finite"`` when ``check_finite``
       is set; ``best``, ``wait`` and the moving average are left as they were. With ``check_finite=False``
       it is an ordinary epoch that never improves and is not folded into the moving average (one bad
       epoch must not poison it); it is still compared with the thresholds as it is, so a +inf loss trips
       ``divergence_threshold`` and NaN trips nothing.
    2. ``smoothing`` > 0 replaces the value by its exponential moving average,
       ``s_0 = v_0, s_t = smoothing * s_{t-1} + (1 - smoothing) * v_t``, so that one lucky or unlucky
       epoch on a noisy metric neither resets nor spends patience. Everything below uses ``s``.
    3. ``s`` is an improvement if it beats ``best`` by MORE than ``min_delta`` (min mode:
       ``s < best - min_delta``; max mode: ``s > best + min_delta``); the first finite value always is.
       An improvement sets ``best``, ``best_epoch``, ``wait = 0`` and ``improved = True`` (the caller's
       cue to save the weights); otherwise ``wait += 1``. This bookkeeping happens whatever the stop
       reason, so ``best`` includes a value that also meets ``stopping_threshold``.
    4. Stop reasons are checked in Lightning's order: ``"stopping_threshold"`` (min: ``s <= threshold``,
       max: ``s >= threshold``), then ``"divergence_threshold"`` (min: ``s > threshold``, max:
       ``s < threshold``), then ``"patience"`` (``wait >= patience``).

    Adaptive patience (``adaptive_patience=True``): every stretch of epochs without improvement either
    earns or costs one epoch of patience. When ``wait`` reaches half the current patience (rounded up),
    patience shrinks by one, at most once per stretch, so a long plateau ends sooner; an improvement that
    arrives before that point grows patience by one, so a run that keeps improving gets more room. An
    improvement after the half-way point leaves patience as it is; the first finite value only sets the
    baseline and does not grow it. Patience stays within ``[min_patience, max_patience]``, which default to
    ``max(1, patience // 2)`` and ``2 * patience``; the stop test uses the patience as updated that epoch.

    ``patience`` must be >= 1: ``patience=1`` already stops at the first epoch that does not improve, so
    0 would be a second spelling of the same thing. ``monitor`` is either a metric name or a mapping of
    metric names to weights (``{"val_accuracy": 0.7, "val_f1": 0.3}``); ``mode`` applies to the weighted
    sum, so a negative weight folds a loss into a "max" objective. ``restore_best`` does not change any
    decision: it is kept for the caller, who owns the weights.

    Attributes: ``best`` (best smoothed value, +inf/-inf before the first finite one), ``best_epoch``,
    ``stopped_epoch`` and ``reason`` (None until it stops), ``wait`` (epochs since the last improvement),
    ``epoch`` (index of the last epoch seen, -1 before the first update, so ``epoch + 1`` epochs have been
    seen), ``improved`` (whether the last update improved) and ``patience`` (changes only when adaptive).
    """

    def __init__(
        self,
        monitor: str | Mapping[str, float] = "val_loss",
        mode: str = "min",
        patience: int = 5,
        min_delta: float = 0.0,
        smoothing: float = 0.0,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_finite: bool = True,
        restore_best: bool = True,
        adaptive_patience: bool = False,
        min_patience: int | None = None,
        max_patience: int | None = None,
    ) -> None:
        self.monitor: str | dict[str, float] = self._check_monitor(monitor)
        if mode not in _MODES:
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.mode = mode
        if not _is_int(patience) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        if not _is_real(min_delta) or not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        self.min_delta = float(min_delta)
        if not _is_real(smoothing) or not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        self.smoothing = float(smoothing)
        self.stopping_threshold = self._check_threshold("stopping_threshold", stopping_threshold)
        self.divergence_threshold = self._check_threshold("divergence_threshold", divergence_threshold)
        if self.stopping_threshold is not None and self.divergence_threshold is not None:
            # Overlapping thresholds would make a value both "good enough" and "diverged".
            if mode == "min" and self.divergence_threshold < self.stopping_threshold:
                raise ValueError(
                    "in min mode divergence_threshold must be >= stopping_threshold, got "
                    f"divergence_threshold={divergence_threshold!r} < "
                    f"stopping_threshold={stopping_threshold!r}"
                )
            if mode == "max" and self.divergence_threshold > self.stopping_threshold:
                raise ValueError(
                    "in max mode divergence_threshold must be <= stopping_threshold, got "
                    f"divergence_threshold={divergence_threshold!r} > "
                    f"stopping_threshold={stopping_threshold!r}"
                )
        self.check_finite = bool(check_finite)
        self.restore_best = bool(restore_best)
        self.adaptive_patience = bool(adaptive_patience)
        if not self.adaptive_patience:
            if min_patience is not None or max_patience is not None:
                raise ValueError("min_patience and max_patience only apply with adaptive_patience=True")
            self.min_patience = self.max_patience = patience
        else:
            self.min_patience = max(1, patience // 2) if min_patience is None else min_patience
            self.max_patience = 2 * patience if max_patience is None else max_patience
            for name, bound in (("min_patience", self.min_patience), ("max_patience", self.max_patience)):
                if not _is_int(bound) or bound < 1:
                    raise ValueError(f"{name} must be an integer >= 1, got {bound!r}")
            if not self.min_patience <= patience <= self.max_patience:
                raise ValueError(
                    "adaptive patience needs min_patience <= patience <= max_patience, got "
                    f"{self.min_patience} <= {patience} <= {self.max_patience}"
                )

        self.patience: int = patience
        self.best: float = math.inf if mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self.reason: str | None = None
        self.wait: int = 0
        self.epoch: int = -1
        self.improved: bool = False
        self._smoothed: float | None = None

    @staticmethod
    def _check_monitor(monitor: str | Mapping[str, float]) -> str | dict[str, float]:
        if isinstance(monitor, str):
            if not monitor:
                raise ValueError("monitor must be a non-empty metric name or a mapping of names to weights")
            return monitor
        if not isinstance(monitor, Mapping):
            raise ValueError(
                f"monitor must be a metric name or a mapping of names to weights, got {monitor!r}"
            )
        if not monitor:
            raise ValueError("monitor mapping must name at least one metric")
        weights: dict[str, float] = {}
        for name, weight in monitor.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"monitor keys must be non-empty metric names, got {name!r}")
            if not _is_real(weight) or not math.isfinite(weight):
                raise ValueError(f"monitor weight for {name!r} must be a finite number, got {weight!r}")
            weights[name] = float(weight)
        return weights

    @staticmethod
    def _check_threshold(name: str, value: float | None) -> float | None:
        if value is None:
            return None
        if not _is_real(value) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number or None, got {value!r}")
        return float(value)

    def value_from(self, metrics: Mapping[str, float]) -> float:
        """The monitored value in ``metrics``: the named metric, or the weighted sum of several."""
        names = [self.monitor] if isinstance(self.monitor, str) else list(self.monitor)
        missing = [name for name in names if name not in metrics]
        if missing:
            # A typo in the monitor name should fail loudly, not silently never improve.
            raise ValueError(
                f"monitored metric(s) {missing} not found in metrics; available: {sorted(metrics)}"
            )
        if isinstance(self.monitor, str):
            return float(metrics[self.monitor])
        return math.fsum(weight * float(metrics[name]) for name, weight in self.monitor.items())

    def update(self, value: float) -> bool:
        """Record this epoch's monitored value; return True when training should stop now."""
        if self.stopped_epoch is not None:
            return True
        self.epoch += 1
        self.improved = False
        value = float(value)
        finite = math.isfinite(value)
        if not finite and self.check_finite:
            return self._stop("non_finite")

        current = self._smooth(value) if finite else value
        if finite and self._is_improvement(current):
            if self.adaptive_patience and self.best_epoch is not None and self.wait < self._half_patience():
                self.patience = min(self.max_patience, self.patience + 1)
            self.best, self.best_epoch, self.wait, self.improved = current, self.epoch, 0, True
        else:
            self.wait += 1
            if self.adaptive_patience and self.wait == self._half_patience():
                self.patience = max(self.min_patience, self.patience - 1)

        if self.stopping_threshold is not None and self._reached(current, self.stopping_threshold):
            return self._stop("stopping_threshold")
        if self.divergence_threshold is not None and self._diverged(current, self.divergence_threshold):
            return self._stop("divergence_threshold")
        if self.wait >= self.patience:
            return self._stop("patience")
        return False

    def _smooth(self, value: float) -> float:
        if self._smoothed is None or self.smoothing == 0.0:
            self._smoothed = value
        else:
            self._smoothed = self.smoothing * self._smoothed + (1.0 - self.smoothing) * value
        return self._smoothed

    def _is_improvement(self, current: float) -> bool:
        if self.best_epoch is None:
            return True
        if self.mode == "min":
            return current < self.best - self.min_delta
        return current > self.best + self.min_delta

    def _reached(self, current: float, threshold: float) -> bool:
        return current <= threshold if self.mode == "min" else current >= threshold

    def _diverged(self, current: float, threshold: float) -> bool:
        return current > threshold if self.mode == "min" else current < threshold

    def _half_patience(self) -> int:
        return (self.patience + 1) // 2

    def _stop(self, reason: str) -> bool:
        self.stopped_epoch = self.epoch
        self.reason = reason
        return True

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly; strict JSON (no NaN/inf), so it fits any checkpoint."""
        return {
            "mode": self.mode,
            "monitor": self.monitor if isinstance(self.monitor, str) else dict(self.monitor),
            "epoch": self.epoch,
            "wait": self.wait,
            "patience": self.patience,
            # best is +/-inf exactly when nothing has improved yet; None keeps the dict strict JSON.
            "best": None if self.best_epoch is None else self.best,
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
            "reason": self.reason,
            "improved": self.improved,
            "smoothed": self._smoothed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()``; refuses a state from a different mode or monitor."""
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"early stopping state is missing keys {missing}")
        if state["mode"] != self.mode:
            raise ValueError(f"state was saved in mode {state['mode']!r}, this instance uses {self.mode!r}")
        if state["monitor"] != self.monitor:
            raise ValueError(
                f"state was saved for monitor {state['monitor']!r}, this instance monitors {self.monitor!r}"
            )
        self.epoch = int(state["epoch"])
        self.wait = int(state["wait"])
        self.patience = int(state["patience"])
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        if state["best"] is None:
            self.best = math.inf if self.mode == "min" else -math.inf
        else:
            self.best = float(state["best"])
        self.stopped_epoch = None if state["stopped_epoch"] is None else int(state["stopped_epoch"])
        self.reason = state["reason"]
        self.improved = bool(state["improved"])
        self._smoothed = None if state["smoothed"] is None else float(state["smoothed"])

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(monitor={self.monitor!r}, mode={self.mode!r}, patience={self.patience}, "
            f"best={self.best!r}, best_epoch={self.best_epoch}, wait={self.wait}, epoch={self.epoch}, "
            f"stopped_epoch={self.stopped_epoch}, reason={self.reason!r})"
        )
