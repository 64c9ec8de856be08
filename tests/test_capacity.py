"""``hat.capacity``: per layer and trained task, the units used, shared with earlier tasks and
added, and the units still free, read from the hard masks of a model trained on digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hat
from hat import HATConfig

from helpers import tensor_forward, train_task


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 2))
    return hat.convert(net, HATConfig(num_tasks=3))


def test_capacity_counts_each_trained_tasks_units_against_the_hard_masks(digit_tasks):
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    assert all(layer.tasks == () and layer.free == layer.units for layer in hat.capacity(model))
    for t in (0, 1):
        train_task(model, optimizer, digit_tasks[t][0], digit_tasks[t][1], t, epochs=1, forward=tensor_forward)
    report = hat.capacity(model)
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "task_embedding")}
    assert [r.name for r in report] == list(layers)
    for r in report:
        on = layers[r.name].task_embedding.detach() > 0
        assert [t.task for t in r.tasks] == [0, 1]  # task 2 never trained: not reported
        t0, t1 = r.tasks
        assert (t0.used, t0.shared, t0.added) == (int(on[0].sum()), 0, int(on[0].sum()))
        assert t1.used == int(on[1].sum()) and t1.shared == int((on[0] & on[1]).sum())
        assert t1.added == t1.used - t1.shared
        assert r.free == int((~(on[0] | on[1])).sum()) == r.units - t0.added - t1.added
        assert r.used == r.units - r.free


def test_capacity_of_a_model_without_hat_layers_is_empty_and_bad_input_is_an_error():
    assert hat.capacity(nn.Linear(3, 2)) == []
    with pytest.raises(hat.HATTypeError, match=r"model must be a torch\.nn\.Module; got str"):
        hat.capacity("model")
