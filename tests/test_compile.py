"""torch.compile on converted models: no recompiles on task/scale changes, eager gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import hat
from hat import HATConfig

from convert_models import SmallResNet, sequential_cnn


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _step(model, call, optimizer, x, y, task, scale):
    hat.set_task(model, task, mask_scale=scale)  # the model or its compiled wrapper
    loss = F.cross_entropy(call(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.slow
def test_inductor_trains_without_recompiling_when_task_and_scale_change(digit_tasks):
    torch.manual_seed(0)
    model = hat.convert(sequential_cnn(), HATConfig(num_tasks=3))
    compiled = torch.compile(model)  # the default compiler (inductor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    x, y = digit_tasks[0][0][:16], digit_tasks[0][1][:16]
    _step(model, compiled, optimizer, x, y, 0, 1.0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for task, scale in [(0, 5.0), (1, 2.0), (2, 50.0), (1, 400.0), (0, 0.01)]:
            _step(model, compiled, optimizer, x, y, task, scale)
    assert hat.trained_tasks(model) == [0, 1, 2]


@pytest.mark.filterwarnings("ignore:hat. 2 plain")  # the resnet's head 1 serves tasks 0 and 2 here
@pytest.mark.parametrize("make, call", [
    (sequential_cnn, lambda m: m),
    (lambda: SmallResNet(3), lambda m: (lambda x: m(x, 1))),
], ids=["sequential", "resnet"])
def test_compiled_gradients_match_eager_and_earlier_tasks_stay_identical(digit_tasks, make, call):
    torch.manual_seed(0)
    model = hat.convert(make(), HATConfig(num_tasks=3))
    x, y = digit_tasks[1][0][:16], digit_tasks[1][1][:16]
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    for m, fn in [(eager, call(eager)), (model, call(compiled))]:
        hat.set_task(m, 1, mask_scale=7.0)
        m.train()
        F.cross_entropy(fn(x), y).backward()
    for (name, p_eager), (_, p_comp) in zip(eager.named_parameters(), model.named_parameters()):
        if p_eager.grad is None:
            assert p_comp.grad is None, name
        else:
            torch.testing.assert_close(p_comp.grad, p_eager.grad, msg=name)
    # train task 0, record it, train task 2 compiled: task 0's eval logits stay bit-identical
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    fn = call(compiled)
    for _ in range(3):
        _step(compiled, fn, optimizer, digit_tasks[0][0][:32], digit_tasks[0][1][:32], 0, 50.0)
    probe = digit_tasks[0][2][:32]

    def logits(task):
        model.eval()
        with torch.no_grad(), hat.task(model, task):
            out = fn(probe)
        model.train()
        return out

    before = logits(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for b in range(3):
            _step(model, fn, optimizer, digit_tasks[2][0][:32], digit_tasks[2][1][:32], 2, 10.0 * (b + 1))
    assert torch.equal(logits(0), before)
