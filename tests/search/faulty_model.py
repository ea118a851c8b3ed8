"""A user's model factory (``model = "faulty_model.py:build"``) whose training fails on cue, for the failure-path
tests: real errors raised from inside training through `hpo run`, no mocks.

``build(num_classes, in_channels, dropout, plan=[...], log=PATH, at_epoch=K)``: a tiny CNN. The n-th model
of the process that trains takes mode ``plan[n]`` (the last one repeats; models built only to check shapes or to
score the test set never train and take none):

* ``ok``: trains normally;
* ``cuda_oom``: its first training batch raises ``torch.cuda.OutOfMemoryError``, as CUDA does;
* ``oom_message``: raises ``RuntimeError("CUDA out of memory. ...")``, the form older torch raised, string-matched;
* ``cpu_oom``: a real failed allocation on the CPU (``torch.empty`` of 2**62 bytes);
* ``sigterm``: sends SIGTERM to its own process at the start of training epoch ``at_epoch`` (counted from the
  model's first epoch), once per ``log`` file, like a scheduler stopping the job there;
* ``hold``: waits at the start of epoch ``at_epoch`` until the file ``log`` with suffix ``.go`` exists, so a test
  can signal or kill its worker while the trial is known to be RUNNING with epochs before ``at_epoch`` reported.

Before failing, a model holds a 4 MiB tensor (an activation, as a real forward would), and every model that starts
training appends to ``log`` one JSON line: its mode, and whether the tensor of the previous failed model is still
alive (it must not be: hpo releases a failed trial's memory before the next trial). Automatic garbage collection is
off in a process that uses ``log``, so that answer depends on hpo's release, not on when the interpreter collects.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import time
import weakref
from pathlib import Path

import torch
from torch import nn

_trained = 0  # models of this process that started training
_held: weakref.ref[torch.Tensor] | None = None  # the tensor the last failed model held


class Faulty(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, dropout: float, plan: list[str], log: str | None,
                 at_epoch: int | None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Dropout(dropout), nn.Linear(8, num_classes))
        self.plan, self.log, self.at_epoch = plan, log, at_epoch
        self.mode: str | None = None
        self.epoch = -1
        self.was_training = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.was_training:  # the first batch of a training epoch
            self.epoch += 1
            if self.mode is None:
                self._start()
            if self.mode == "sigterm" and self.epoch == self.at_epoch and self.log:
                sent = Path(self.log).with_suffix(".sigterm")
                if not sent.exists():
                    sent.touch()
                    os.kill(os.getpid(), signal.SIGTERM)
            if self.mode == "hold" and self.epoch == self.at_epoch and self.log:
                while not Path(self.log).with_suffix(".go").exists():
                    time.sleep(0.05)
        self.was_training = self.training
        if self.training and self.mode in ("cuda_oom", "oom_message", "cpu_oom"):
            self._fail()
        return self.body(x)

    def _start(self) -> None:
        global _trained
        self.mode = self.plan[min(_trained, len(self.plan) - 1)]
        _trained += 1
        if self.log:
            alive = _held is not None and _held() is not None
            with open(self.log, "a") as f:
                f.write(json.dumps({"mode": self.mode, "previous_failure_held": alive}) + "\n")

    def _fail(self) -> None:
        global _held
        held = torch.ones(1 << 20)  # what a forward holds when an allocation fails
        _held = weakref.ref(held)
        if self.mode == "cuda_oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB "
                                              "total capacity; 6.10 GiB already allocated)")
        if self.mode == "oom_message":
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 1.95 GiB total capacity)")
        torch.empty(1 << 62, dtype=torch.uint8)  # raises: DefaultCPUAllocator: can't allocate memory


def build(num_classes: int, in_channels: int, dropout: float, plan: list[str] | None = None, log: str | None = None,
          at_epoch: int | None = None) -> nn.Module:
    if log:
        gc.disable()
    return Faulty(num_classes, in_channels, dropout, plan or ["ok"], log, at_epoch)
