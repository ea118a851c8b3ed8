"""OptimizerUpdate: bit for bit `optimizer.step()`, by the direct call only where that is exact."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from objectives import optimizer_update
from objectives.optimizer_update import OptimizerUpdate


class Net(nn.Module):
    def __init__(self, unused: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.spare = nn.Linear(2, 2) if unused else None  # in the optimiser, never in forward: no gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def model(unused: bool = False) -> Net:
    torch.manual_seed(0)
    return Net(unused)


def adamw(net: Net, **kw: object) -> torch.optim.Optimizer:
    params = list(net.parameters())
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.05},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.01, **{"fused": True, **kw})  # type: ignore[arg-type]


def counted(opt: torch.optim.Optimizer) -> list[int]:
    """Count the calls of ``opt.step`` (this instance only; torch's own wrapping stays in place)."""
    calls = [0]
    inner = opt.step

    def step(*a: object, **k: object) -> object:
        calls[0] += 1
        return inner(*a, **k)

    opt.step = step  # type: ignore[method-assign]
    return calls


def train(net: Net, zero: Callable[[], None], step: Callable[[], None], opt: torch.optim.Optimizer,
          steps: int, start: int = 0) -> None:
    gen = torch.Generator().manual_seed(1)
    for i in range(start + steps):
        x, y = torch.randn(8, 1, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        if i < start:
            continue
        for group in opt.param_groups:
            group["lr"] = 0.01 * (1 + i % 3) / 3  # the schedule moves the lr, as EpochSchedule does
        zero()
        F.cross_entropy(net(x), y).backward()
        step()


def same(a: Net, b: Net, oa: torch.optim.Optimizer, ob: torch.optim.Optimizer) -> bool:
    params = all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    moments = sa.keys() == sb.keys() and all(
        torch.equal(sa[k][name], sb[k][name]) for k in sa for name in ("exp_avg", "exp_avg_sq", "step"))
    return params and moments


def side_by_side(steps: int, unused: bool = False) -> tuple[Net, torch.optim.Optimizer, list[int]]:
    """``steps`` of torch's step on one copy and of the direct update on another; the second copy, its
    optimiser and the count of its ``step()`` calls, after checking both copies are bit for bit alike."""
    ref, net = model(unused), model(unused)
    ref_opt, opt = adamw(ref), adamw(net)
    calls = counted(opt)
    update = OptimizerUpdate(opt)
    train(ref, lambda: ref_opt.zero_grad(set_to_none=True), ref_opt.step, ref_opt, steps)
    train(net, update.zero_grad, update.step, opt, steps)
    assert same(ref, net, ref_opt, opt)
    return net, opt, calls


def test_the_direct_update_is_bit_for_bit_torchs_step_from_the_first_update_on() -> None:
    assert optimizer_update.OWN_FIRST_STEP  # this torch's `_init_group` takes the names the update passes
    _, opt, calls = side_by_side(12)
    assert calls[0] == 0  # the state made by AdamW's _init_group before the first update, every update direct
    assert float(opt.state[opt.param_groups[0]["params"][0]]["step"]) == 12


def test_on_a_torch_with_another_init_group_the_first_update_is_torchs_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optimizer_update, "OWN_FIRST_STEP", False)
    _, _, calls = side_by_side(6)
    assert calls[0] == 1  # torch made the state at the first step; the other 5 went direct


def test_a_parameter_without_a_gradient_goes_to_torchs_step_which_skips_it() -> None:
    net, opt, calls = side_by_side(5, unused=True)
    assert calls[0] == 5
    assert net.spare is not None and net.spare.weight not in opt.state


def test_a_reloaded_state_is_gathered_again_and_trains_on_exactly() -> None:
    """A resume loads the optimiser's state after the update was made: the old lists must not be used."""
    ref, net = model(), model()
    ref_opt, opt = adamw(ref), adamw(net)
    update = OptimizerUpdate(opt)
    train(ref, lambda: ref_opt.zero_grad(set_to_none=True), ref_opt.step, ref_opt, 4)
    train(net, update.zero_grad, update.step, opt, 7)  # ahead of the reference, then set back to it
    net.load_state_dict(ref.state_dict())
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # as a checkpoint holds it
    calls = counted(opt)
    train(ref, lambda: ref_opt.zero_grad(set_to_none=True), ref_opt.step, ref_opt, 6, start=4)
    train(net, update.zero_grad, update.step, opt, 6, start=4)
    assert same(ref, net, ref_opt, opt)
    assert calls[0] == 0  # the loaded state already had its moments: gathered from it, no torch step needed


@pytest.mark.parametrize("case", ["sgd", "amsgrad", "not fused", "step hook", "older torch"])
def test_what_the_direct_call_does_not_cover_goes_to_torchs_step(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert optimizer_update.DIRECT_CALL  # this torch takes the direct call: the other tests here cover it
    if case == "older torch":  # a functional `adam` without decoupled_weight_decay (AdamW apart from Adam)
        monkeypatch.setattr(optimizer_update, "DIRECT_CALL", False)
    net = model()
    if case == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = adamw(net, amsgrad=case == "amsgrad", fused=case != "not fused") if case != "step hook" else adamw(net)
    hooked = [0]
    if case == "step hook":
        opt.register_step_post_hook(lambda *_: hooked.__setitem__(0, hooked[0] + 1))
    calls = counted(opt)
    update = OptimizerUpdate(opt)
    train(net, update.zero_grad, update.step, opt, 4)
    assert calls[0] == 4
    assert hooked[0] == (4 if case == "step hook" else 0)
