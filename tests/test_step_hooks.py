"""The optimizer step hooks: installed when a task-aware module is made, not by ``import hat``;
install and uninstall are idempotent."""

from __future__ import annotations

import subprocess
import sys

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


def test_protection_conditions_exactly_the_entries_of_used_rows_and_columns_and_keeps_no_full_size_mask():
    """A weight's protected entries are (output unit used) and (input unit used) by the trained
    tasks: conditioning zeroes exactly those gradient entries, including in a grouped conv, and
    the cached protection holds unit vectors, not a mask of the weight's size."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    model = hat.convert(plain, HATConfig(num_tasks=2))
    convs = [m for m in model.modules() if isinstance(m, hat.modules.HATConv2d)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,))

    def backward(task):
        hat.set_task(model, task, mask_scale=50.0)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()

    for _ in range(3):
        backward(0)
        optimizer.step()
    t0 = torch.tensor([True, False])
    for how in ("optimizer.step", "hat.condition_gradients"):
        backward(1)
        raw = {id(m): m.weight.grad.clone() for m in convs}
        optimizer.step() if how == "optimizer.step" else hat.condition_gradients(model)  # conditions .grad in place
        checked_grouped = False
        for prev, m in zip(convs, convs[1:]):
            rows = m.used_units(t0)
            cols_of_group = prev.used_units(t0).view(m.groups, -1)  # input unit g * in_per_group + j
            cols = cols_of_group.repeat_interleave(m.out_channels // m.groups, dim=0)
            protected = (rows[:, None] & cols)[:, :, None, None].expand_as(m.weight)
            assert bool(protected.any()) and not bool(protected.all())
            expected = torch.where(protected, torch.zeros_like(raw[id(m)]), raw[id(m)])
            assert torch.equal(m.weight.grad, expected), how
            checked_grouped |= m.groups > 1
        assert checked_grouped
    for m in convs:
        for split in m.__dict__["_hat_mask_cache"].values():
            if split is not None:
                assert all(f.numel() * 4 <= m.weight.numel() for f in split if f is not None)
