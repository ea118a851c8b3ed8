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
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from torch.optim.adam import adam
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

# The direct call passes AdamW's `decoupled_weight_decay` to the functional `adam`, as AdamW's own step does
# where AdamW is Adam with that flag. An older torch (the project allows 2.4) has no such argument, and its
# AdamW groups no such key: there every step is `optimizer.step()`.
DIRECT_CALL = "decoupled_weight_decay" in inspect.signature(adam).parameters


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
        """Each group with its parameters, moments and step counts, gathered after torch's first `step()` made
        them; None where the direct call is not exact (or the state is not made yet)."""
        opt = self.optimizer
        if (self._lists is not None and self._state is opt.state and len(opt.param_groups) == len(self._lists)
                and all(a is b[0] for a, b in zip(opt.param_groups, self._lists, strict=True))):
            return self._lists
        self._lists = None
        if not self._exact() or any(p not in opt.state or "exp_avg" not in opt.state[p] for p in self.params):
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
