"""hat.compress: after a task trains, the units it added that it needs least are released for later
tasks; every other task stays bit-identical, under every optimizer, through the fine-tune pass and
later tasks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hat
from hat import training
from hat.compress import compress

from convert_models import sequential_cnn
from models import OPTIMIZERS  # the invariant tests' optimizers


def _mlp() -> nn.Module:
    return hat.convert(nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                     nn.Linear(64, 2)), hat.HATConfig(num_tasks=4))


def _train(model, opt, task, t, epochs=3):
    x, y = task[:2]
    training.train_task(model, opt, (x, y), t, epochs=epochs, batch_size=32, forward="set_task", max_scale=100,
                        generator=torch.Generator().manual_seed(t))


def _out(model, x, t):
    return training.predict(model, x, t, forward="set_task")




@pytest.mark.parametrize("arch", ["mlp", "cnn_bn"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_compress_finetune_and_later_tasks_keep_the_others_bit_identical(digit_tasks, arch, optimizer):
    torch.manual_seed(0)
    model = _mlp() if arch == "mlp" else hat.convert(sequential_cnn(), hat.HATConfig(num_tasks=4))
    opt = OPTIMIZERS[optimizer](model.parameters())
    probe = digit_tasks[0][2][:32]
    _train(model, opt, digit_tasks[0], 0)
    task_0 = _out(model, probe, 0)
    from hat.compress import switch_on_free_units

    assert switch_on_free_units(model, 1, reinit=True, optimizer=opt) > 0
    assert torch.equal(_out(model, probe, 0), task_0)
    _train(model, opt, digit_tasks[1], 1)
    result = compress(model, 1, digit_tasks[1][:2], budget=0.5, forward="set_task")
    assert sum(r for r, _ in result.released.values()) > 0
    assert torch.equal(_out(model, probe, 0), task_0)
    training.finetune_task(model, opt, digit_tasks[1][:2], 1, batch_size=32, forward="set_task", max_scale=100)
    task_1 = _out(model, probe, 1)
    assert torch.equal(_out(model, probe, 0), task_0)
    switch_on_free_units(model, 2, reinit=True, optimizer=opt)
    assert torch.equal(_out(model, probe, 0), task_0)
    assert torch.equal(_out(model, probe, 1), task_1)
    _train(model, opt, digit_tasks[2], 2)
    assert torch.equal(_out(model, probe, 0), task_0)
    assert torch.equal(_out(model, probe, 1), task_1)


def test_released_units_are_free_and_the_next_task_takes_them(digit_tasks):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, digit_tasks[0], 0)
    free_before = {layer.name: layer.free for layer in hat.capacity(model)}
    added_before = {layer.name: layer.tasks[0].added for layer in hat.capacity(model)}
    result = compress(model, 0, digit_tasks[0][:2], budget=0.5, forward="set_task")
    for layer in hat.capacity(model):
        released, had = result.released[layer.name]
        assert had == added_before[layer.name]
        assert layer.free == free_before[layer.name] + released
        # the budget: half of the fair share of the free units (64 units, 4 tasks to come)
        assert layer.tasks[0].added <= max(1, round(0.5 * 64 / 4)) < had
    released_units = {name: (model.get_submodule(name).task_embedding.detach()[0] <= 0) for name in result.released}
    _train(model, opt, digit_tasks[1], 1)
    taken = sum(int(((model.get_submodule(n).task_embedding.detach()[1] > 0) & off).sum())
                for n, off in released_units.items())
    assert taken > 0  # task 1 switched on units task 0 gave back


def test_tolerance_keeps_the_training_accuracy(digit_tasks):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, digit_tasks[0], 0)
    result = compress(model, 0, digit_tasks[0][:2], tolerance=0.0, forward="set_task")
    assert result.accuracy_after >= result.accuracy_before
    x, y = digit_tasks[0][:2]
    assert training.evaluate(model, (x, y), 0, forward="set_task") == result.accuracy_after


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({}, hat.HATValueError, "give budget"),
    ({"budget": 0}, hat.HATValueError, r"budget must be in \(0, 1\]"),
    ({"budget": 1.5}, hat.HATValueError, r"budget must be in \(0, 1\].*got 1.5"),
    ({"budget": "half"}, hat.HATTypeError, "budget must be a number"),
    ({"tolerance": -0.01}, hat.HATValueError, "tolerance must be a finite number >= 0"),
    ({"tolerance": float("nan")}, hat.HATValueError, "tolerance must be a finite number >= 0"),
    ({"budget": 0.5, "samples": 0}, hat.HATValueError, "samples must be a positive int"),
])
def test_bad_settings_are_refused_and_change_nothing(digit_tasks, kwargs, error, match):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, digit_tasks[0], 0, epochs=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        compress(model, 0, digit_tasks[0][:2], forward="set_task", **kwargs)
    with pytest.raises(hat.HATValueError, match="got 2, which has not been trained"):
        compress(model, 2, digit_tasks[0][:2], budget=0.5, forward="set_task")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_switch_on_free_units_touches_only_the_new_tasks_row(digit_tasks):
    from hat.compress import switch_on_free_units

    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, digit_tasks[0], 0)
    probe = digit_tasks[0][2][:32]
    task_0 = _out(model, probe, 0)
    rows_0 = [m.task_embedding.detach()[0].clone() for m in (model[1], model[3])]
    switched = switch_on_free_units(model, 1)
    assert switched > 0
    for m, row in zip((model[1], model[3]), rows_0):
        free = ~m.used_units(torch.tensor([True, False, False, False]))
        assert bool((m.task_embedding.detach()[1][free] > 0).all())
        assert torch.equal(m.task_embedding.detach()[0], row)
    assert torch.equal(_out(model, probe, 0), task_0)
    with pytest.raises(hat.TaskIndexError):
        switch_on_free_units(model, 4)


def test_the_budget_recipe_on_hat_resnet18s_keeps_earlier_tasks_exact(digit_tasks):
    import timm

    import hat.timm_models  # registers hat_resnet18s
    from hat.compress import switch_on_free_units

    torch.manual_seed(0)
    model = timm.create_model("hat_resnet18s", hat_config=hat.HATConfig(num_tasks=3), num_classes=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rgb = [(x.repeat(1, 3, 2, 2)[:64], y[:64], xt.repeat(1, 3, 2, 2)[:16]) for x, y, xt, _ in digit_tasks[:3]]
    outputs = {}
    for t, (x, y, probe) in enumerate(rgb):
        switch_on_free_units(model, t, reinit=t > 0)
        training.train_task(model, opt, (x, y), t, epochs=1, batch_size=32, forward="set_task", max_scale=100)
        result = compress(model, t, (x, y), budget=1.0, forward="set_task")
        released = sum(r for r, _ in result.released.values())
        assert released > 0 if t < 2 else released == 0  # the last task may keep every free unit
        training.finetune_task(model, opt, (x, y), t, batch_size=32, forward="set_task", max_scale=100)
        outputs[t] = _out(model, probe, t)
        for k in range(t):
            assert torch.equal(_out(model, rgb[k][2], k), outputs[k]), f"task {k} changed while task {t} trained"
