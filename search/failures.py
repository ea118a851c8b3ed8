"""How a trial can fail without failing the study: the exceptions, the trial timeout, out-of-memory.

``TrialSession.__exit__`` maps an exception to a trial state; this module says what each failure is and
records it in words (``failure_reason``), so the session stays a short table of outcomes.
"""

from __future__ import annotations

import gc
import signal
import sys
import threading
import time
import traceback
from typing import Any

from search.errors import first_line

ERROR_PREFIX = "error: "  # what ``failure_reason`` puts before a trial's error (not a timeout, OOM or NaN loss)


class TrialFailed(Exception):
    """A trial failed for a reason recorded on it; the study continues with the next trial."""


class TrialTakenOver(BaseException):  # noqa: N818 - a signal like KeyboardInterrupt, not an error
    """Another worker failed this trial (its heartbeat went stale) and retried it: this worker drops its result.

    A BaseException so that Optuna's ``study.optimize`` does not catch it and try to tell the trial, which is
    already finished and would be refused; ``search.study.run_trials`` catches it and goes on."""


class TrialTimeout(Exception):
    """The trial ran past ``study.trial_timeout`` seconds."""


class TrialInterrupted(Exception):
    """The trial was stopped from outside before its end, for ``reason``, and will resume: it is recorded as
    Ctrl-C records it (FAIL, its MLflow run KILLED, re-enqueued with its params), with that reason. Trial packing
    raises it for the members of a pack whose epoch was cut short by another member's ``trial_timeout``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EpochCutShort(BaseException):  # noqa: N818 - a signal like KeyboardInterrupt, not an error
    """A pack's alarm (``search/packing.py``): its earliest member's ``trial_timeout`` passed inside an epoch. A
    BaseException, so that no member's hook takes it for its own failure."""


def arm_timeout(seconds: float | None, error: type[BaseException] = TrialTimeout) -> bool:
    """Raise ``error`` in the main thread after ``seconds``; False (nothing armed) off the main thread,
    where signals cannot be delivered, or without a timeout."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        return False

    def on_alarm(signum: int, frame: Any) -> None:
        raise error("the trial ran past study.trial_timeout")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return True


def disarm_timeout() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)


class TrialDeadline:
    """A trial's ``study.trial_timeout``, enforced two ways. On the main thread SIGALRM interrupts the trial
    wherever it is (a hung data loader, an endless epoch). A trial run from another thread (a library caller's
    thread pool) gets no signal, so ``check()``, called at the end of every epoch, fails it there: it still times
    out, after the epoch that crossed the limit. The check also catches an alarm that user code swallowed."""

    def __init__(self, seconds: float | None) -> None:
        self.ends = time.monotonic() + seconds if seconds else None
        self.alarm = arm_timeout(seconds)

    def check(self) -> None:
        if self.ends is not None and time.monotonic() >= self.ends:
            raise TrialTimeout("the trial ran past study.trial_timeout")

    def disarm(self) -> None:
        if self.alarm:
            disarm_timeout()
            self.alarm = False


# What torch says when an allocation fails: CUDA and MPS ("... out of memory ..."), the CPU allocator
# ("DefaultCPUAllocator: can't allocate memory" / "not enough memory" in older versions).
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and any(m in text for m in _OOM_MESSAGES)


def release_memory() -> None:
    """Give back what a failed trial held, so the next one starts with the device's memory free (after
    ``drop_frames``: until then the exception's traceback keeps the training frames' tensors alive)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def drop_frames(exc: BaseException) -> None:
    """Clear the locals of the finished frames ``exc`` went through (the training loop's model, optimizer,
    activations), so its memory is freed even while something keeps the exception alive: a library that
    imports lazily while the trial's error is being handled (optuna-dashboard, from the dashboard note) keeps
    its own ImportError, and through that error's context this one, for the life of the process."""
    traceback.clear_frames(exc.__traceback__)


_shown = {"traceback": False}


def own_frames(exc: BaseException) -> list[traceback.FrameSummary]:
    """The frames of an error's traceback in code written for the study (the user's model, data or loop; this
    project's code), not in Python or an installed library, outermost first."""
    import sysconfig

    installed = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})
    return [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(installed)]


def error_site(exc: BaseException) -> str:
    """Where an error was raised in code written for the study: its innermost such frame (``own_frames``),
    '/path/my_models.py line 12, in forward'; "" when there is none."""
    own = own_frames(exc)
    return f"{own[-1].filename} line {own[-1].lineno}, in {own[-1].name}" if own else ""


def show_first_traceback(number: int, exc: BaseException, text: str) -> None:
    """The traceback of a process's first trial that failed with an error, on stderr: a one-line reason does not
    debug a user's model. Later ones are only in their MLflow runs (error.txt), or a broken model would print
    one per trial until max_failures stops the study."""
    if _shown["traceback"]:
        return
    _shown["traceback"] = True
    print(f"trial {number} failed with {type(exc).__name__}; its traceback (the first failed trial's of this run; "
          f"each failed trial's is error.txt in its MLflow run):\n{text.rstrip()}", file=sys.stderr)


def reset_shown() -> None:
    """A command's start (`main` called again in one process, as tests do): no traceback shown yet."""
    _shown["traceback"] = False


def failure_reason(exc: BaseException) -> str:
    """The ``reason`` a failed trial records: trial_timeout, out_of_memory, or the error's first line."""
    if isinstance(exc, TrialTimeout):
        return "trial_timeout"
    if is_out_of_memory(exc):
        return "out_of_memory"
    return f"{ERROR_PREFIX}{type(exc).__name__}: {first_line(exc, empty='')}"[:500]
