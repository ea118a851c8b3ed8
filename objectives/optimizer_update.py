"""A training step's optimiser update without `Optimizer.step`'s per-call wrapping, where that is exact.

`torch.optim.AdamW.step()` rebuilds its lists of parameters, gradients and moments, opens a profiler range,
imports dynamo's graph-break helper, checks hooks and graph capture on every call: on the quickstart's CNN
(8 parameter tensors in two groups) about 0.2 ms a step on the CPU, against 2-3 ms for the whole step at batch
32, and on a GPU the host time a packed step (one optimiser per member) waits on. `OptimizerUpdate` gathers the
lists once and calls torch's own functional AdamW (`torch.optim.adam.adam`, the function `step()` calls, with
the same arguments) on them: the same kernel on the same tensors, so the result is bit for bit `step()`'s, and
the optimiser's state, param groups and `state_dict` stay torch's own (checkpoints do not change).

It does this only for the case it can vouch for: AdamW with the fused kernel, no amsgrad, no capture, no
hooks, every parameter with a dense gradient. Anything else (SGD, a parameter without a gradient this step,
a CUDA-graphed step, an optimiser whose state was reloaded since) goes to `optimizer.step()` as before.

A process that trains this way never loads Dynamo (``torch._dynamo``, 0.8-1 s of CPU to import, paid before the
first trial; the launcher of `hpo run --workers` imported it for its workers before they forked). `step()` imports
it on every call, for its graph breaks; the first update makes the moments with AdamW's own ``_init_group``
(what `step()` calls first) instead of a first `step()`; and `dynamo_wrappers` keeps the optimiser's other
methods from importing it (below).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

# The direct call passes AdamW's `decoupled_weight_decay` to the functional `adam`, as AdamW's own step does
# where AdamW is Adam with that flag. An older torch (the project allows 2.4) has no such argument, and its
# AdamW groups no such key: there every step is `optimizer.step()`.
DIRECT_CALL = "decoupled_weight_decay" in inspect.signature(adam).parameters

# The first update makes AdamW's state with its own ``_init_group``, called by the names of its parameters in
# torch 2.11 (the GPU image's: the same names and body, read from its wheel) to 2.14; a torch whose signature
# differs (older ones also take ``amsgrad``) leaves the first update to `step()`, which imports Dynamo then.
_INIT_GROUP_ARGS = ["self", "group", "params_with_grad", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                    "state_steps"]
OWN_FIRST_STEP = list(inspect.signature(torch.optim.Adam._init_group).parameters) == _INIT_GROUP_ARGS

# `torch.optim.Optimizer`'s add_param_group, state_dict, load_state_dict and zero_grad are wrapped in
# `torch._disable_dynamo`, which imports Dynamo at the first call, wraps the method in `torch._dynamo.disable`
# (so that a compiled region calling it runs it eagerly), and keeps that on the method as ``__dynamo_disable``.
_DISABLE_WRAPPER = torch._disable_dynamo(lambda: None).__code__


def _wrapped_methods() -> list[Callable[..., Any]]:
    return [attr.__wrapped__ for attr in vars(torch.optim.Optimizer).values()
            if getattr(attr, "__code__", None) is _DISABLE_WRAPPER and hasattr(attr, "__wrapped__")]


def dynamo_wrappers(compiling: bool) -> None:
    """Before an optimiser is made. Not compiling, in a process that has not loaded Dynamo: the optimiser's
    wrapped methods run as themselves, without importing Dynamo (its `disable` changes nothing where nothing is
    compiled). Compiling: undo that, so that the methods are out of Dynamo's reach again."""
    for fn in _wrapped_methods():
        if compiling and getattr(fn, "__dynamo_disable", None) is fn:
            del fn.__dynamo_disable  # type: ignore[attr-defined]
        elif not compiling and "torch._dynamo" not in sys.modules and not hasattr(fn, "__dynamo_disable"):
            fn.__dynamo_disable = fn  # type: ignore[attr-defined]


class OptimizerUpdate:
    """``zero_grad()`` then, after the backward pass, ``step()``, for one optimiser of one trial."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self._lists: list[tuple[dict, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]] | None = None
        self._state: object = None

    def zero_grad(self) -> None:
        """``optimizer.zero_grad(set_to_none=True)``."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """``optimizer.step()``, by the direct call where it is exact (module docstring)."""
        lists = self._direct_lists()
        if lists is None:
            self.optimizer.step()
            return
        grads = [[p.grad for p in params] for _, params, *_ in lists]
        if any(g is None or g.is_sparse for group in grads for g in group):
            self.optimizer.step()  # torch skips a parameter without a gradient; its lists would differ from ours
            return
        with torch.no_grad():
            for (group, params, exp_avgs, exp_avg_sqs, steps), group_grads in zip(lists, grads, strict=True):
                beta1, beta2 = group["betas"]
                adam(params, group_grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, has_complex=False,
                     beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                     maximize=False, foreach=group["foreach"], capturable=False, differentiable=False, fused=True,
                     grad_scale=None, found_inf=None, decoupled_weight_decay=group["decoupled_weight_decay"])

    def _direct_lists(self) -> list[tuple[dict, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]] | None:
        """Each group with its parameters, moments and step counts, gathered once they exist (made here by AdamW's
        ``_init_group`` before the first update, or by a `step()`, or loaded); None where the direct call is not
        exact (or the state could not be made)."""
        opt = self.optimizer
        if (self._lists is not None and self._state is opt.state and len(opt.param_groups) == len(self._lists)
                and all(a is b[0] for a, b in zip(opt.param_groups, self._lists, strict=True))):
            return self._lists
        self._lists = None
        if not self._exact():
            return None
        if OWN_FIRST_STEP and not any(p in opt.state for p in self.params) and all(p.grad is not None
                                                                                     for p in self.params):
            for group in opt.param_groups:  # what `step()` does first, on the same lists, before its update
                opt._init_group(group, params_with_grad=[], grads=[], exp_avgs=[], exp_avg_sqs=[],  # type: ignore[attr-defined]
                                max_exp_avg_sqs=[], state_steps=[])
        if any(p not in opt.state or "exp_avg" not in opt.state[p] for p in self.params):
            return None
        self._lists = [(g, list(g["params"]), [opt.state[p]["exp_avg"] for p in g["params"]],
                        [opt.state[p]["exp_avg_sq"] for p in g["params"]], [opt.state[p]["step"] for p in g["params"]])
                       for g in opt.param_groups]
        self._state = opt.state
        return self._lists

    def _exact(self) -> bool:
        opt = self.optimizer
        if not DIRECT_CALL or type(opt) is not torch.optim.AdamW or getattr(opt, "grad_scale", None) is not None:
            return False
        if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks:
            return False
        if _global_optimizer_pre_hooks or _global_optimizer_post_hooks:
            return False
        if sum(len(g["params"]) for g in opt.param_groups) != len(self.params):
            return False
        return all(g["fused"] and "decoupled_weight_decay" in g
                   and not (g["amsgrad"] or g["capturable"] or g["differentiable"] or g["maximize"])
                   and not isinstance(g["lr"], Tensor) and not any(p.is_complex() for p in g["params"])
                   for g in opt.param_groups)
