"""``hat.forget_task``: a trained task's rows reset and the weights it alone used released, on models trained
on the digits. Every other trained task's evaluation outputs stay bit-identical, after forgetting and after a
new task trains on the released units; the units show as free and a new task learns on them as well as on
units no task ever used."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import hat
import hat.timm_models  # registers the hat_* models in timm
from hat import HATConfig, HATTypeError, HATValueError, TaskIndexError, training
from hat.forget import forget_task
from hat.modules import TaskIndexedBatchNorm2d, TaskIndexedLinear

from convert_models import SmallResNet, sequential_cnn
from models import MLP

NUM_TASKS = 3


# -- the models: each (model, forward for hat.training, input preparation) ------------------------------
def _on_resnet(m, x, task_id, mask_scale):
    hat.set_task(m, task_id, mask_scale)
    return m(x, task_id)


def _rgb(x):
    return x.expand(-1, 3, -1, -1)  # 8x8 digits as 3-channel images: a small, fast input for a ResNet-18


def _identity(x):
    return x


def _tokens(x):
    return x[:, 0]  # 8x8 digits as 8 tokens of 8 features


class _Attention(nn.Module):
    """A linear embedding of each row of a digit, self-attention over the rows, mean, plain head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        h = torch.relu(self.embed(x))
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def build(kind, num_tasks=NUM_TASKS, **cfg):
    config = HATConfig(num_tasks=num_tasks, **cfg)
    if kind == "mlp":  # hand-built on payloads, one plain head per task
        return MLP(config, hidden=64), "payload", _identity
    if kind == "cnn-bn":  # converted: conv/BatchNorm/flatten/linear, a task-indexed head
        return hat.convert(sequential_cnn(), config), "set_task", _identity
    if kind == "resnet":  # converted: residual blocks, BatchNorm, LayerNorm, plain heads
        return hat.convert(SmallResNet(num_tasks), config), _on_resnet, _identity
    if kind == "attention":  # converted: nn.MultiheadAttention (its own reset_parameters), task-indexed head
        return hat.convert(_Attention(), config), "set_task", _tokens
    if kind == "hat_resnet18s":
        return timm.create_model("hat_resnet18s", hat_config=config, num_classes=2), "set_task", _rgb
    raise AssertionError(kind)


def train(model, optimizer, forward, prep, data, t, *, epochs=2, samples=None, reg=0.75):
    """Train task ``t`` on ``data`` (a digits task: its training inputs and labels, the first ``samples``)."""
    x, y = data[0][:samples], data[1][:samples]
    training.train_task(model, optimizer, (prep(x), y), t, epochs=epochs, generator=torch.Generator().manual_seed(t),
                        forward=forward, reg_strength=reg)


def logits(model, forward, prep, x, t):
    return training.predict(model, prep(x), t, forward=forward)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# each model: how many training samples per task and epochs (the ResNet-18 on a subset: 2 cores)
SIZES = {"mlp": (None, 2), "cnn-bn": (None, 2), "resnet": (128, 2), "attention": (None, 2), "hat_resnet18s": (64, 1)}


def trained(kind, digit_tasks, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.01), tasks=3,
            **cfg):
    torch.manual_seed(0)
    model, forward, prep = build(kind, **cfg)
    opt = optimizer(model.parameters())
    samples, epochs = SIZES[kind]
    for t in range(tasks):
        train(model, opt, forward, prep, digit_tasks[t], t, epochs=epochs, samples=samples)
    return model, opt, forward, prep


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=2e-3),
    "adamw-wd": lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.05),
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
}


@pytest.fixture(scope="module")
def probe(digit_tasks):
    return torch.cat([digit_tasks[t][2][:40] for t in range(4)])


# -- the invariant -----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:hat. 2 plain")
@pytest.mark.parametrize("kind", list(SIZES))
def test_every_other_task_stays_bit_identical_and_only_what_the_result_names_changed(digit_tasks, probe, kind):
    model, _, forward, prep = trained(kind, digit_tasks)
    before = {k: logits(model, forward, prep, probe, k) for k in range(NUM_TASKS)}
    state = snapshot(model)
    result = forget_task(model, 1)
    assert hat.trained_tasks(model) == [0, 2]
    for k in (0, 2):
        assert torch.equal(logits(model, forward, prep, probe, k), before[k]), f"task {k} changed"
    released, total = result.get_num_forgotten("weight")
    assert 0 < released < total
    after = model.state_dict()
    for key, value in after.items():
        if key.endswith("hat_trained"):
            assert value.tolist() == [True, False, True]
            continue
        entries = result.get(key, torch.zeros(value.shape, dtype=torch.bool))
        assert torch.equal(value[~entries], state[key][~entries]), f"{key} changed where the result says it did not"
        if key.endswith("task_embedding"):
            assert entries[1].all() and not entries[[0, 2]].any()
            assert not torch.equal(value[1], state[key][1])  # drawn again (init_strat "normal")


@pytest.mark.filterwarnings("ignore:hat. 2 plain")
@pytest.mark.parametrize("new_id", [1, 3], ids=["at-the-forgotten-id", "at-a-new-id"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_other_tasks_stay_bit_identical_while_a_new_task_trains_after_forgetting(digit_tasks, probe, opt_name, new_id):
    """One optimizer object for the whole sequence: its momentum and moments of released entries are stale."""
    model, optimizer, forward, prep = trained("cnn-bn", digit_tasks, OPTIMIZERS[opt_name], num_tasks=4)
    before = {k: logits(model, forward, prep, probe, k) for k in (0, 2)}
    result = forget_task(model, 1)
    released = {k: v for k, v in result.items() if k.endswith((".weight", ".bias")) and "task_embedding" not in k}
    at_release = {k: model.get_parameter(k).detach().clone() for k in released}
    train(model, optimizer, forward, prep, digit_tasks[3], new_id, epochs=2)
    for k in (0, 2):
        assert torch.equal(logits(model, forward, prep, probe, k), before[k]), f"task {k} changed ({opt_name})"
    assert hat.trained_tasks(model) == sorted({0, 2, new_id})
    acc = training.evaluate(model, (digit_tasks[3][2], digit_tasks[3][3]), new_id, forward=forward)
    assert acc >= 0.9, f"the new task reached {acc:.3f}"
    # it trained on the released entries
    moved = sum(int((model.get_parameter(k).detach() != at_release[k])[released[k]].sum()) for k in released)
    assert moved > 0


@pytest.mark.filterwarnings("ignore:hat. 2 plain")
@pytest.mark.parametrize("kind", ["mlp", "cnn-bn"])
def test_a_task_trained_again_at_a_forgotten_id_is_protected_by_its_new_masks(digit_tasks, probe, kind):
    """Task 2's steps protected tasks 0 and 1 before task 1 was forgotten and trained again: when task 2 trains
    once more, what it protects comes from task 1's new masks, not from what was worked out before."""
    model, optimizer, forward, prep = trained(kind, digit_tasks)
    forget_task(model, 1)
    train(model, optimizer, forward, prep, digit_tasks[3], 1)
    before = {k: logits(model, forward, prep, probe, k) for k in (0, 1)}
    train(model, optimizer, forward, prep, digit_tasks[2], 2)
    for k in (0, 1):
        assert torch.equal(logits(model, forward, prep, probe, k), before[k]), f"task {k} changed"


# -- capacity ------------------------------------------------------------------------------------------------
def _converted_mlp(hidden, classes=2, num_tasks=NUM_TASKS):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                        nn.Linear(hidden, classes))
    return hat.convert(net, HATConfig(num_tasks=num_tasks))


def test_the_forgotten_tasks_units_are_free_again_and_the_next_task_trains_them(digit_tasks):
    torch.manual_seed(0)
    model = _converted_mlp(32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for t in range(NUM_TASKS):
        train(model, optimizer, "set_task", _identity, digit_tasks[t], t)
    used_before = sum(layer.used for layer in hat.capacity(model))
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "task_embedding")}
    only_0 = {n: (m.task_embedding[0] > 0) & ~(m.task_embedding[1:] > 0).any(0) for n, m in layers.items()}
    forget_task(model, 0)
    report = hat.capacity(model)
    assert sum(layer.used for layer in report) == used_before - sum(int(u.sum()) for u in only_0.values())
    assert sum(int(u.sum()) for u in only_0.values()) > 0, "task 0 used units of its own"
    for layer in report:
        on = layers[layer.name].task_embedding.detach() > 0
        assert [t.task for t in layer.tasks] == [1, 2]
        assert layer.free == int((~(on[1] | on[2])).sum())
    # a new task at the forgotten id takes units that were task 0's alone
    train(model, optimizer, "set_task", _identity, digit_tasks[3], 0)
    assert any(bool(((layers[n].task_embedding[0] > 0) & units).any()) for n, units in only_0.items())


def _digits(digit_tasks, pairs, split):
    """The digits of ``pairs`` (fixture tasks) with their own labels (0..9): ``split`` 0 train, 2 test."""
    x = torch.cat([digit_tasks[p][split] for p in pairs])
    y = torch.cat([digit_tasks[p][split + 1] + 2 * p for p in pairs])
    return x, y


def test_a_new_task_learns_on_released_units_as_well_as_on_units_no_task_used(digit_tasks):
    """Task A trains; ``reference`` is a copy of that network. Task B then trains on the rest (no regularizer:
    it takes what it can) and is forgotten: the network now has exactly the reference's free capacity. A new
    10-class task learns about as well on both (mean of a few seeds: one mask draw moves it by several
    points). Released weights are drawn as at construction: zeroing them instead took the mean accuracy here
    from about 0.90 to 0.82."""
    task_a, task_b = _digits(digit_tasks, [0, 1], 0), _digits(digit_tasks, [2, 3, 4], 0)
    new_train, new_test = _digits(digit_tasks, range(5), 0), _digits(digit_tasks, range(5), 2)
    accuracy = {"forgot": [], "reference": []}
    for seed in range(4):
        torch.manual_seed(seed)
        model = _converted_mlp(32, classes=10)
        training.train_task(model, torch.optim.Adam(model.parameters(), lr=1e-2), task_a, 1, epochs=5,
                            forward="set_task", generator=torch.Generator().manual_seed(1))
        reference = copy.deepcopy(model)
        training.train_task(model, torch.optim.Adam(model.parameters(), lr=1e-2), task_b, 0, epochs=5,
                            forward="set_task", reg_strength=0.0, generator=torch.Generator().manual_seed(2))
        forget_task(model, 0)
        assert hat.capacity(model) == hat.capacity(reference)
        for name, m in (("forgot", model), ("reference", reference)):
            torch.manual_seed(10)
            training.train_task(m, torch.optim.Adam(m.parameters(), lr=1e-2), new_train, 2, epochs=5,
                                forward="set_task", reg_strength=0.0, generator=torch.Generator().manual_seed(3))
            accuracy[name].append(training.evaluate(m, new_test, 2, forward="set_task"))
    mean = {k: sum(v) / len(v) for k, v in accuracy.items()}
    assert mean["reference"] > 0.8
    assert mean["forgot"] >= mean["reference"] - 0.03, accuracy


# -- what is reset, and to what ------------------------------------------------------------------------------
class _Scaled(nn.Module):
    """A module with a parameter of its own: hat.convert gives it one row per task."""

    def __init__(self, units):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(units))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


def test_rows_go_back_to_the_no_task_row_and_embeddings_to_their_initial_value(digit_tasks):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), _Scaled(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 64, 2))
    model = hat.convert(net, HATConfig(num_tasks=NUM_TASKS, init_strat="dense"))
    conv, bn, scaled, head = model[0], model[1], model[2], model[5]
    assert type(bn) is TaskIndexedBatchNorm2d and type(head) is TaskIndexedLinear and hasattr(scaled, "hat_trained")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for t in (0, 1):
        train(model, optimizer, "set_task", _identity, digit_tasks[t], t)
    training.predict(model, digit_tasks[0][2], 0, forward="set_task")  # ends task 1: its statistics are final
    # (the per-task parameter itself, not the selected row its attribute reads)
    tensors = {"bn.weight": bn.weight, "bn.bias": bn.bias, "bn.running_mean": bn.running_mean,
               "bn.running_var": bn.running_var, "gamma": scaled._parameters["gamma"], "head.weight": head.weight,
               "head.bias": head.bias}
    assert all(not torch.equal(t[1], t[-1]) for t in tensors.values()), "task 1 trained every row"
    kept = {k: t[0].clone() for k, t in tensors.items()}
    forget_task(model, 1)
    for key, t in tensors.items():
        assert torch.equal(t[1], t[-1]), f"{key}: row 1 is not the no-task row"
        assert torch.equal(t[0], kept[key])
    assert bn.num_batches_tracked[1] == bn.num_batches_tracked[-1]
    assert torch.equal(conv.task_embedding[1], torch.ones(8))  # "dense": what a new layer starts with


def test_released_weights_are_drawn_as_a_new_layer_draws_them_not_zeroed(digit_tasks):
    torch.manual_seed(0)
    model = _converted_mlp(32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for t in (0, 1):
        train(model, optimizer, "set_task", _identity, digit_tasks[t], t, reg=0.0)
    first = model[1]  # Linear(64, 32): nn.Linear draws weight and bias from U(-1/8, 1/8)
    before = {"weight": first.weight.detach().clone(), "bias": first.bias.detach().clone()}
    result = forget_task(model, 0)
    assert result["1.weight"].sum() >= 64, "task 0 used units of its own"
    for name in ("weight", "bias"):
        entries, now = result[f"1.{name}"], getattr(first, name).detach()
        new = now[entries]
        assert (new != 0).all() and (new.abs() <= 1 / 8).all() and (new != before[name][entries]).all()
        assert torch.equal(now[~entries], before[name][~entries])
    new = first.weight.detach()[result["1.weight"]]
    assert 0.5 < new.std().item() / (1 / 8 / 3**0.5) < 1.5  # the spread of U(-b, b): b / sqrt(3)


def test_dry_run_changes_nothing_and_names_what_forgetting_changes(digit_tasks):
    model, *_ = trained("cnn-bn", digit_tasks, tasks=2)
    state = snapshot(model)
    dry = forget_task(model, 0, dry_run=True)
    assert same_state(model, state) and hat.trained_tasks(model) == [0, 1]
    real = forget_task(model, 0)
    assert dry.keys() == real.keys() and all(torch.equal(dry[k], real[k]) for k in dry)


def test_a_task_forgotten_right_after_training_keeps_its_reset_batchnorm_statistics(digit_tasks, probe):
    """A converted model refreshes a task's BatchNorm rows at its next call after training: not a forgotten one's."""
    model, optimizer, forward, prep = trained("cnn-bn", digit_tasks, tasks=1)
    before = logits(model, forward, prep, probe, 0)
    train(model, optimizer, forward, prep, digit_tasks[1], 1)
    forget_task(model, 1)  # no call since task 1's last step
    assert torch.equal(logits(model, forward, prep, probe, 0), before)
    bn = model[1]
    assert torch.equal(bn.running_mean[1], bn.running_mean[-1]) and torch.equal(bn.running_var[1], bn.running_var[-1])


def test_forgetting_every_task_frees_every_unit_and_a_task_learns_again(digit_tasks):
    model, optimizer, forward, prep = trained("cnn-bn", digit_tasks, tasks=2)
    for t in (1, 0):
        forget_task(model, t)
    assert hat.trained_tasks(model) == []
    assert all(layer.free == layer.units and layer.tasks == () for layer in hat.capacity(model))
    train(model, optimizer, forward, prep, digit_tasks[2], 0)
    assert training.evaluate(model, (digit_tasks[2][2], digit_tasks[2][3]), 0, forward=forward) >= 0.9


def test_a_seed_draws_the_same_values_on_every_copy_and_leaves_the_global_generator_alone(digit_tasks):
    model, *_ = trained("cnn-bn", digit_tasks, tasks=2)
    copied = copy.deepcopy(model)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    forget_task(model, 0, seed=7)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(999)  # another rank, another global state: the same values
    forget_task(copied, 0, seed=7)
    assert same_state(model, snapshot(copied))


def test_weights_kept_fixed_are_never_released(digit_tasks):
    torch.manual_seed(0)
    model = _converted_mlp(32)
    model[1].weight.requires_grad_(False)  # e.g. a pretrained first layer kept as it is
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for t in (0, 1):
        train(model, optimizer, "set_task", _identity, digit_tasks[t], t)
    fixed = model[1].weight.clone()
    result = forget_task(model, 0)
    assert "1.weight" not in result and torch.equal(model[1].weight, fixed)
    assert result["1.bias"].any()


# -- bad input: hat's errors name the argument, its value and what is allowed; nothing changes ----------------
BAD = [
    (lambda m: forget_task(m, 3), TaskIndexError, r"task_id must be an int in \[0, 3\); got 3"),
    (lambda m: forget_task(m, -1), TaskIndexError, r"task_id must be an int in \[0, 3\); got -1"),
    (lambda m: forget_task(m, 2), HATValueError,
     r"task_id must be one of the trained tasks \[0, 1\]; got 2, which has not been trained"),
    (lambda m: forget_task(m, True), HATTypeError, r"task_id must be an int in \[0, 3\) or None; got True"),
    (lambda m: forget_task(m, None), HATTypeError, r"task_id must be an int in \[0, 3\); got None"),
    (lambda m: forget_task(m, 1.0), HATTypeError, r"task_id must be .* got 1\.0 of type float"),
    (lambda m: forget_task(m, 0, dry_run="yes"), HATTypeError, r"dry_run must be True or False; got 'yes'"),
    (lambda m: forget_task("model", 0), HATTypeError, r"model must be a torch\.nn\.Module; got str"),
    (lambda m: forget_task(nn.Linear(2, 2), 0), HATValueError, r"Linear has no HAT or task-indexed module"),
]


@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input_is_refused_and_changes_nothing(digit_tasks, call, error, match):
    model, *_ = trained("cnn-bn", digit_tasks, tasks=2)
    state = snapshot(model)
    with pytest.raises(error, match=match):
        call(model)
    assert same_state(model, state) and hat.trained_tasks(model) == [0, 1]


def test_a_forgotten_task_cannot_be_forgotten_twice(digit_tasks):
    model, *_ = trained("cnn-bn", digit_tasks, tasks=2)
    forget_task(model, 1)
    state = snapshot(model)
    with pytest.raises(HATValueError, match=r"got 1, which has not been trained \(or was forgotten already\)"):
        forget_task(model, 1)
    assert same_state(model, state)


def _free_for_a_new_task(model, layer_name, x, y):
    """The entries of a layer's weight that a step of a new task (2) may change, found by a step: with a
    gradient of ones, plain SGD moves every entry the step does not protect (on a copy of ``model``)."""
    model = copy.deepcopy(model)
    layer = model.get_submodule(layer_name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    hat.set_task(model, 2, mask_scale=50.0)
    model.train()
    F.cross_entropy(model(x), y).backward()  # reports task 2 to the layers: the step trains it
    layer.weight.grad = torch.ones_like(layer.weight)
    optimizer.step()
    return layer.weight.detach() != before


@pytest.mark.parametrize("layer_name", ["1", "3"], ids=["first-layer", "second-layer"])
def test_the_released_entries_are_those_a_step_protected_before_and_no_longer_protects(digit_tasks, layer_name):
    torch.manual_seed(0)
    model = _converted_mlp(32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for t in (0, 1):
        train(model, optimizer, "set_task", _identity, digit_tasks[t], t)
    x, y = digit_tasks[2][0][:16], digit_tasks[2][1][:16]
    free_before = _free_for_a_new_task(model, layer_name, x, y)
    result = forget_task(model, 0)
    free_after = _free_for_a_new_task(model, layer_name, x, y)
    released = result[f"{layer_name}.weight"]
    assert released.any()
    assert torch.equal(released, free_after & ~free_before)
