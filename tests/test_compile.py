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


# -- per-sample task ids under torch.compile ----------------------------------------------------
IDS = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1, 0, 2, 1])


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))


def _trained(make, digit_tasks, tasks=(0, 1, 2)):
    """A converted model with ``tasks`` trained a few steps each (so their masks and norm rows differ)."""
    torch.manual_seed(0)
    model = hat.convert(make(), HATConfig(num_tasks=3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for t in tasks:
        for b in range(3):
            _step(model, model, optimizer, digit_tasks[t][0][:32], digit_tasks[t][1][:32], t, 10.0 * (b + 1))
    return model


def _alone(model, x, ids):
    """Each sample's output in a batch of its task alone (eager)."""
    out = None
    for t in ids.unique().tolist():
        index = (ids == t).nonzero().flatten()
        with hat.task(model, t):
            y = model(x[index])
        out = y.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
        out[index] = y
    return out


def _mlp_ln() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 2))


def _cnn_gn() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 36, 2))


@pytest.mark.parametrize("make", [_mlp, sequential_cnn, _mlp_ln, _cnn_gn], ids=["mlp", "cnn-bn", "mlp-ln", "cnn-gn"])
def test_compiled_per_sample_ids_match_each_task_alone_and_recompile_once(digit_tasks, make):
    model = _trained(make, digit_tasks).eval()
    x = torch.cat([t[2] for t in digit_tasks[:3]])[:12]
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        hat.set_task(model, 1)
        torch.testing.assert_close(compiled(x), _alone(model, x, torch.full((12,), 1)), rtol=0, atol=1e-6)
        hat.set_task(model, IDS)  # the one recompile: per-sample ids read another buffer
        torch.testing.assert_close(compiled(x), _alone(model, x, IDS), rtol=0, atol=1e-6)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for ids in (IDS.flip(0), IDS.roll(3), torch.full((12,), 2)):  # new ids, same batch: no recompile
                hat.set_task(model, ids)
                torch.testing.assert_close(compiled(x), _alone(model, x, ids), rtol=0, atol=1e-6)
            for task in (0, 2):  # back to one task: the first graph again
                hat.set_task(model, task)
                torch.testing.assert_close(compiled(x), _alone(model, x, torch.full((12,), task)), rtol=0, atol=1e-6)


def test_compiled_mixed_batch_trains_the_tasks_present_and_keeps_task_0_exact(digit_tasks):
    model = _trained(sequential_cnn, digit_tasks, tasks=(0,))
    probe = digit_tasks[0][2][:32]

    def logits():
        model.eval()
        with torch.no_grad(), hat.task(model, 0):
            out = model(probe)
        model.train()
        return out

    before = logits()
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    x = torch.cat([digit_tasks[1][0][:8], digit_tasks[2][0][:8]])
    y = torch.cat([digit_tasks[1][1][:8], digit_tasks[2][1][:8]])
    ids = torch.tensor([1] * 8 + [2] * 8)
    head = next(p for n, p in model.named_parameters() if n.endswith("task_embedding"))
    rows_before = head.detach().clone()
    for b in range(3):
        _step(model, compiled, optimizer, x, y, ids, 10.0 * (b + 1))
    assert torch.equal(logits(), before)
    assert hat.trained_tasks(model) == [0, 1, 2]
    assert torch.equal(head[0], rows_before[0]) and not torch.equal(head[1:], rows_before[1:])


@pytest.mark.parametrize("name, kwargs", [
    ("hat_resnet18s", {}),
    ("hat_vit_tiny_patch16_224", dict(img_size=32, patch_size=8)),  # per-task class token and position embedding
])
def test_compiled_per_sample_ids_on_timm_models(name, kwargs):
    timm = pytest.importorskip("timm")
    import hat.timm_models

    torch.manual_seed(0)
    model = timm.create_model(name, hat_config=HATConfig(num_tasks=3), num_classes=2, **kwargs).eval()
    for p in model.parameters():  # tasks unlike one another (a fresh model's rows are all equal)
        if p.dim() >= 1 and p.shape[0] in (3, 4):
            torch.nn.init.normal_(p.data)
    x = torch.randn(6, 3, 32, 32)
    ids = torch.tensor([0, 2, 1, 1, 0, 2])
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        hat.set_task(model, 1)
        compiled(x)
        hat.set_task(model, ids)
        torch.testing.assert_close(compiled(x), _alone(model, x, ids), rtol=0, atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            hat.set_task(model, ids.flip(0))
            torch.testing.assert_close(compiled(x), _alone(model, x, ids.flip(0)), rtol=0, atol=1e-5)
            hat.set_task(model, 0)
            torch.testing.assert_close(compiled(x), _alone(model, x, torch.zeros(6, dtype=torch.long)), rtol=0,
                                       atol=1e-5)
