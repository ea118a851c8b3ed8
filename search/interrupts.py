"""Ctrl-C and SIGTERM held while a finished trial's result is being recorded.

A trial that trained to its end is COMPLETE (or PRUNED) only once its session has written its record and Optuna
has told the state. An interrupt raised in between escaped to Optuna, which recorded the trial FAIL, and the
session's interrupt path, which re-enqueues an interrupted trial, never ran: a finished result lost for good,
its MLflow run left RUNNING. So from the moment a session starts recording a finished trial until its caller has
told Optuna (``release``), the signal handler (search/cli.py ``_terminate``) only notes the interrupt, and
``release`` raises it: the run then stops between trials, as after any Ctrl-C. The same holds for the end of a
study (the test score and the best model's logging). Signals arrive on the main thread, where trials run, so
module state is enough.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

_state = {"holding": False, "pending": False, "signalled": False}


def signalled() -> None:
    """The signal handler's first call: remembered, so that ``check`` can raise it again if it was lost."""
    _state["signalled"] = True


def check() -> None:
    """At each epoch's end: a Ctrl-C or SIGTERM that arrived but did not stop training (its KeyboardInterrupt
    raised inside a finalizer, where Python only prints "Exception ignored", so a worker trained on and its
    launcher waited for ever) is raised now."""
    if _state["signalled"]:
        raise KeyboardInterrupt


def cause(exc: BaseException) -> BaseException:
    """The KeyboardInterrupt behind ``exc`` if there is one, else ``exc``. An interrupt raised in the middle of a
    write can make the writer's clean-up raise its own error (torch.save's zip writer: "unexpected pos ..."), which
    then hides the interrupt: the trial would be recorded as failed with that error, not interrupted and resumed."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, KeyboardInterrupt):
            return link
        seen.add(id(link))
        link = link.__context__
    return exc


def reset() -> None:
    """A command's start (`main` called again in one process, as tests do): nothing held, nothing signalled."""
    _state.update(holding=False, pending=False, signalled=False)


def hold() -> None:
    """From now until ``release``, an interrupt is noted, not raised."""
    _state["holding"] = True


def release() -> None:
    """Stop holding; raise KeyboardInterrupt if one came meanwhile."""
    _state["holding"] = False
    if _state["pending"]:
        _state["pending"] = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def held() -> Iterator[None]:
    """``hold`` for the block; an interrupt noted meanwhile is raised when the block ends (even if it raised)."""
    hold()
    try:
        yield
    finally:
        release()


def noted() -> bool:
    """For the signal handler: True (and the interrupt kept for ``release``) while holding, else False."""
    if not _state["holding"]:
        return False
    _state["pending"] = True
    print("\ninterrupted: finishing the record of a finished trial first, then stopping", file=sys.stderr, flush=True)
    return True


LAUNCHER_ENV = "HPO_LAUNCHER_PID"  # set by `hpo run --workers` for each worker it starts (forked or new)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def follow_launcher() -> None:
    """A worker of `hpo run --workers` stops as on its launcher's SIGTERM (its trials failed and re-enqueued, its
    MLflow runs KILLED) when the launcher dies without stopping it (kill -9, the kernel's out-of-memory killer),
    instead of training on unseen: Linux sends the signal when the parent exits. If the launcher is gone before
    this runs, the signal is sent now. Elsewhere a worker outlives its launcher and finishes its trials."""
    launcher = os.environ.pop(LAUNCHER_ENV, None)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0 and \
            os.getppid() != int(launcher):
        os.kill(os.getpid(), signal.SIGTERM)
