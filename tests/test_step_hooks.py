"""The optimizer step hooks: installed when a task-aware module is made, not by ``import hat``;
install and uninstall are idempotent."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import hat
from hat import HATConfig
from hat.protect import hooks as _protect


def test_importing_hat_installs_no_step_hook_until_a_task_aware_module_is_made():
    code = ("import torch, hat, hat.protect.hooks as p; a = p.installed(); "
            "hat.convert(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), "
            "hat.HATConfig(num_tasks=2)); print(a, p.installed())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_install_and_uninstall_are_idempotent_and_uninstalled_steps_protect_nothing():
    model = hat.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), HATConfig(num_tasks=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))

    def step(task):
        hat.set_task(model, task, mask_scale=10.0)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    try:
        _protect.install()
        _protect.install()
        assert len(_protect._HANDLES) == 2
        step(0)
        assert hat.trained_tasks(model) == [0]
        _protect.uninstall()
        _protect.uninstall()
        assert not _protect.installed()
        step(1)
        assert hat.trained_tasks(model) == [0]  # no hook saw the step: task 1 not recorded
    finally:
        _protect.install()
    step(1)
    assert hat.trained_tasks(model) == [0, 1]


class _MySGD(torch.optim.SGD):
    """A subclass may couple entries: the step hooks condition its gradients."""


def _protected_weights(seed: int = 0, init_strat: str = "normal"):
    torch.manual_seed(seed)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    model = hat.convert(plain, HATConfig(num_tasks=2, init_strat=init_strat))
    convs = [m for m in model.modules() if isinstance(m, hat.modules.HATConv2d)]
    return model, convs


def _expected_protected(convs):
    """Per conv after the first: its entries that task 0 uses (output unit and input unit)."""
    t0 = torch.tensor([True, False])
    out = []
    for prev, m in zip(convs, convs[1:]):
        rows = m.used_units(t0)
        cols_of_group = prev.used_units(t0).view(m.groups, -1)  # input unit g * in_per_group + j
        cols = cols_of_group.repeat_interleave(m.out_channels // m.groups, dim=0)
        protected = (rows[:, None] & cols)[:, :, None, None].expand_as(m.weight)
        assert bool(protected.any()) and not bool(protected.all())
        out.append((m, protected))
    assert any(m.groups > 1 for m, _ in out)
    return out


@pytest.mark.parametrize("how", ["Adafactor step", "SGD subclass step", "hat.condition_gradients",
                                 "hat.condition_gradients, every output of the last conv used"])
def test_protection_conditions_exactly_the_entries_of_used_rows_and_columns_and_keeps_no_full_size_mask(how):
    """A weight's protected entries are (output unit used) and (input unit used) by the trained
    tasks: conditioning zeroes exactly those gradient entries, including in a grouped conv, and
    the cached protection holds unit vectors, not a mask of the weight's size. The step of an
    optimizer that is not elementwise (Adafactor, any subclass) conditions the gradient itself."""
    model, convs = _protected_weights()
    if how == "Adafactor step":
        optimizer = torch.optim.Adafactor(model.parameters(), lr=0.05)
    else:
        optimizer = _MySGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,))

    def backward(task):
        hat.set_task(model, task, mask_scale=50.0)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()

    for _ in range(3):
        backward(0)
        optimizer.step()
    if how.endswith("used"):  # its protection is then the input units' factor alone
        with torch.no_grad():
            convs[-1].task_embedding[0] = 3.0
    backward(1)
    raw = {id(m): m.weight.grad.clone() for m in convs}
    before = {id(m): m.weight.detach().clone() for m in convs}
    stepped = how.endswith("step")
    optimizer.step() if stepped else hat.condition_gradients(model)  # .grad in place
    for m, protected in _expected_protected(convs):
        expected = torch.where(protected, torch.zeros_like(raw[id(m)]), raw[id(m)])
        assert torch.equal(m.weight.grad, expected), how
        if stepped:
            assert torch.equal(m.weight[protected], before[id(m)][protected])
            assert not torch.equal(m.weight[~protected], before[id(m)][~protected])
    for m in convs:
        for split in m.__dict__["_hat_mask_cache"].values():
            if split is not None:
                assert all(f.numel() * 4 <= m.weight.numel() for f in split if f is not None)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda ps: torch.optim.AdamW(ps, lr=0.01),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True),
    lambda ps: torch.optim.Rprop(ps, lr=0.01),
], ids=["sgd-momentum-wd", "adamw", "adamw-fused", "rprop"])
def test_an_elementwise_optimizer_is_protected_by_the_restore_alone_and_its_gradient_left_as_backward_made_it(make):
    """SGD, Adam and the other elementwise torch.optim optimizers update an entry from its own
    gradient and state only: the step leaves the gradient unconditioned (two passes fewer over
    it) and puts exactly the protected entries back, while the free entries move."""
    model, convs = _protected_weights(1)
    optimizer = make(model.parameters())
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,))
    for task in (0, 0, 0, 1, 1):
        if task == 1:
            with torch.no_grad():
                for m in convs:
                    m.task_embedding[1] = 3.0  # task 1 uses every unit, task 0's too
        hat.set_task(model, task, mask_scale=50.0)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        raw = {id(m): m.weight.grad.clone() for m in convs}
        before = {id(m): m.weight.detach().clone() for m in convs}
        optimizer.step()
    for m, protected in _expected_protected(convs):
        assert torch.equal(m.weight.grad, raw[id(m)])
        assert bool(raw[id(m)][protected].ne(0).any())  # the gradient did reach protected entries
        assert torch.equal(m.weight[protected], before[id(m)][protected])
        assert not torch.equal(m.weight[~protected], before[id(m)][~protected])
