"""The process-wide state in one object: ``RUNTIME.reset()`` drops caches without losing
protection, and one model's cache invalidation leaves another model's step plans alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import hat
from hat import HATConfig
from hat._runtime import RUNTIME


def _model() -> nn.Module:
    return hat.convert(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2)),
                       HATConfig(num_tasks=2))


def _train(model, optimizer, x, y, task, steps=3):
    model.train()
    for b in range(steps):
        hat.set_task(model, task, mask_scale=10.0 * (b + 1))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _logits(model, x, task):
    model.eval()
    with torch.no_grad(), hat.task(model, task):
        return model(x)


def test_reset_drops_caches_and_protection_stays_exact(digit_tasks):
    torch.manual_seed(0)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    _train(model, optimizer, digit_tasks[0][0][:32], digit_tasks[0][1][:32], 0)
    before = _logits(model, digit_tasks[0][2], 0)
    assert RUNTIME.plans.get(optimizer) is not None
    RUNTIME.reset()
    assert RUNTIME.plans.get(optimizer) is None and not RUNTIME.mask_groups and not RUNTIME.one_hots
    assert model[1] in RUNTIME.live  # the live modules are facts, not caches: they stay
    _train(model, optimizer, digit_tasks[1][0][:32], digit_tasks[1][1][:32], 1)
    assert torch.equal(_logits(model, digit_tasks[0][2], 0), before)
    assert hat.trained_tasks(model) == [0, 1]


def test_moving_one_model_keeps_another_models_step_plan(digit_tasks):
    torch.manual_seed(0)
    model, other = _model(), _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = digit_tasks[0][0][:32], digit_tasks[0][1][:32]
    _train(model, optimizer, x, y, 0)
    _train(model, optimizer, digit_tasks[1][0][:32], y, 1, steps=1)  # task 0 protected: a protection is built
    plan = RUNTIME.plans[optimizer]
    built = dict(plan.protections)
    assert built
    other.double()  # another model's parameters cast: its caches move, not this model's
    _train(model, optimizer, digit_tasks[1][0][:32], y, 1, steps=1)
    assert all(plan.protections.get(k) is v for k, v in built.items())
    model.load_state_dict(model.state_dict())  # a load into this model rebuilds its protection
    _train(model, optimizer, digit_tasks[1][0][:32], y, 1, steps=1)
    assert all(plan.protections.get(k) is not v for k, v in built.items())
