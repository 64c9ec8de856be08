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
