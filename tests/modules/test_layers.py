"""Every module of hat.modules: shapes, the hard mask, the plain-layer contract, training on real data.

Real torch layers and the scikit-learn digits (``digit_tasks``); the only reference is the plain
torch layer with the same weights, or an expression computed here by hand.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hat
from hat import HATConfig, HATPayload
from hat.modules import (
    HATConv1d,
    HATConv2d,
    HATConv3d,
    HATLinear,
    HATMasker,
    TaskIndexedBatchNorm1d,
    TaskIndexedBatchNorm2d,
    TaskIndexedBatchNorm3d,
    TaskIndexedLayerNorm,
    TaskIndexedLinear,
)

from helpers import accuracy, eval_logits, train_task
from models import CNN, MLP

NUM_TASKS = 3

# -- the masked layers, each with its plain torch twin --------------------------------------------
# name: (HAT layer factory, plain layer factory, input shape, output shape)
MASKED = {
    "linear": (lambda c: HATLinear(6, 5, c), lambda: nn.Linear(6, 5), (4, 6), (4, 5)),
    "linear-3d-input": (lambda c: HATLinear(6, 5, c), lambda: nn.Linear(6, 5), (2, 3, 6), (2, 3, 5)),
    "conv1d": (lambda c: HATConv1d(2, 5, 3, c), lambda: nn.Conv1d(2, 5, 3), (4, 2, 9), (4, 5, 7)),
    "conv2d": (lambda c: HATConv2d(2, 5, 3, c, padding=1), lambda: nn.Conv2d(2, 5, 3, padding=1),
               (4, 2, 6, 6), (4, 5, 6, 6)),
    "conv2d-strided": (lambda c: HATConv2d(2, 5, 3, c, stride=2), lambda: nn.Conv2d(2, 5, 3, stride=2),
                       (4, 2, 7, 7), (4, 5, 3, 3)),
    "conv3d": (lambda c: HATConv3d(2, 5, 3, c), lambda: nn.Conv3d(2, 5, 3), (2, 2, 5, 5, 5), (2, 5, 3, 3, 3)),
}
# output units on/off per task for the 5-unit layers above: task t has its own pattern
PATTERNS = {
    0: [1.0, -1.0, 1.0, -1.0, 1.0],
    1: [-2.0, 0.5, 0.5, -0.5, -3.0],
    2: [-1.0, -1.0, -1.0, -1.0, -1.0],  # every unit off
}


def _unit_dim(layer: nn.Module) -> int:
    return -1 if isinstance(layer, HATLinear) else 1


def _with_patterns(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        for t, pattern in PATTERNS.items():
            layer.task_embedding[t] = torch.tensor(pattern)
    return layer


def _twin(layer: nn.Module, make_plain) -> nn.Module:
    plain = make_plain()
    with torch.no_grad():
        plain.weight.copy_(layer.weight)
        plain.bias.copy_(layer.bias)
    return plain


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(before: dict[str, torch.Tensor], model: nn.Module, except_keys: tuple[str, ...] = ()) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    changed = [k for k in before if k not in except_keys and not torch.equal(before[k], after[k])]
    assert not changed, f"changed: {changed}"


# -- masked layers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MASKED))
def test_masked_layer_payload_shapes(name):
    make, _, in_shape, out_shape = MASKED[name]
    torch.manual_seed(0)
    layer = make(HATConfig(num_tasks=NUM_TASKS))
    x = torch.randn(in_shape)
    for task in (0, NUM_TASKS - 1, None):
        out = layer(HATPayload(x, task_id=task, mask_scale=7.0))
        assert isinstance(out, HATPayload)
        assert out.task_id == task and out.mask_scale == 7.0
        assert out.data.shape == out_shape
    assert layer.task_embedding.shape == (NUM_TASKS, 5)


@pytest.mark.parametrize("name", list(MASKED))
def test_masked_layer_plain_tensor_is_the_torch_layer(name):
    make, make_plain, in_shape, out_shape = MASKED[name]
    torch.manual_seed(0)
    layer = _with_patterns(make(HATConfig(num_tasks=NUM_TASKS)))
    plain = _twin(layer, make_plain)
    x = torch.randn(in_shape)
    y = layer(x)
    assert type(y) is torch.Tensor
    assert y.shape == out_shape
    assert torch.equal(y, plain(x))
    # task_id=None in a payload: no mask at all, the plain network
    assert torch.equal(layer(HATPayload(x, task_id=None)).data, plain(x))


@pytest.mark.parametrize("name", list(MASKED))
@pytest.mark.parametrize("task", list(PATTERNS))
def test_masked_layer_hard_mask_is_exact(name, task):
    make, make_plain, in_shape, _ = MASKED[name]
    torch.manual_seed(1)
    layer = _with_patterns(make(HATConfig(num_tasks=NUM_TASKS))).eval()
    plain = _twin(layer, make_plain)
    x = torch.randn(in_shape)
    out = layer(HATPayload(x, task_id=task, mask_scale=None)).data
    ref = plain(x)
    dim = _unit_dim(layer)
    for unit, e in enumerate(PATTERNS[task]):
        got, want = out.select(dim, unit), ref.select(dim, unit)
        if e > 0:
            assert torch.equal(got, want), f"unit {unit} is on for task {task} but differs from the plain layer"
        else:
            assert torch.equal(got, torch.zeros_like(got)), f"unit {unit} is off for task {task} but not 0"
    # the hard mask is also what get_mask returns
    assert torch.equal(layer.get_mask(task), (torch.tensor(PATTERNS[task]) > 0).float())


@pytest.mark.parametrize("name", ["linear", "conv2d"])
def test_masked_layer_soft_mask_multiplies_units(name):
    make, make_plain, in_shape, _ = MASKED[name]
    torch.manual_seed(2)
    layer = _with_patterns(make(HATConfig(num_tasks=NUM_TASKS)))
    plain = _twin(layer, make_plain)
    x = torch.randn(in_shape)
    scale = 3.0
    out = layer(HATPayload(x, task_id=1, mask_scale=scale)).data
    mask = torch.tensor([1 / (1 + math.exp(-scale * e)) for e in PATTERNS[1]])
    shape = [1] * out.dim()
    shape[_unit_dim(layer)] = 5
    torch.testing.assert_close(out, plain(x) * mask.view(shape))
    torch.testing.assert_close(layer.get_mask(1, scale), mask)


@pytest.mark.parametrize("make, base", [
    (lambda c: HATLinear(6, 5, c), nn.Linear),
    (lambda c: HATConv1d(2, 5, 3, c), nn.Conv1d),
    (lambda c: HATConv2d(2, 5, 3, c), nn.Conv2d),
    (lambda c: HATConv3d(2, 5, 3, c), nn.Conv3d),
], ids=["linear", "conv1d", "conv2d", "conv3d"])
def test_masked_layer_is_the_torch_layer_and_loads_plain_checkpoints(make, base):
    layer = make(HATConfig(num_tasks=NUM_TASKS))
    assert isinstance(layer, base)
    keys = set(layer.state_dict())
    assert {"weight", "bias"} <= keys
    plain_args = (6, 5) if base is nn.Linear else (2, 5, 3)
    torch.manual_seed(3)
    plain = base(*plain_args)
    result = layer.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == keys - {"weight", "bias"}
    assert torch.equal(layer.weight, plain.weight) and torch.equal(layer.bias, plain.bias)


def test_hat_conv_takes_hat_config_fourth():
    cfg = HATConfig(num_tasks=NUM_TASKS)
    conv = HATConv2d(3, 4, 5, cfg, 2, 1)  # stride and padding keep torch's positions after it
    assert conv.hat_config is cfg
    assert conv.stride == (2, 2) and conv.padding == (1, 1) and conv.kernel_size == (5, 5)


@pytest.mark.parametrize("make", [
    lambda c: HATLinear(6, 5, c),
    lambda c: HATConv2d(2, 5, 3, c),
    lambda c: HATMasker(6, c),
], ids=["linear", "conv2d", "masker"])
def test_training_forward_needs_a_mask_scale(make):
    layer = make(HATConfig(num_tasks=NUM_TASKS)).train()
    x = torch.randn(4, 2, 6, 6) if isinstance(layer, nn.Conv2d) else torch.randn(4, 6)
    with pytest.raises(ValueError, match="mask_scale"):
        layer(HATPayload(x, task_id=0, mask_scale=None))
    with torch.no_grad():
        train_nograd = layer(HATPayload(x, task_id=0)).data
    layer.eval()
    evaluated = layer(HATPayload(x, task_id=0)).data
    assert torch.equal(train_nograd, evaluated)
    # task_id=None has no mask, so it needs no scale either
    layer.train()
    layer(HATPayload(x, task_id=None))


# -- HATMasker ----------------------------------------------------------------------------------------
def test_masker_masks_the_last_dim():
    masker = _with_patterns(HATMasker(5, HATConfig(num_tasks=NUM_TASKS))).eval()
    x = torch.randn(2, 3, 5)
    out = masker(HATPayload(x, task_id=0)).data
    assert out.shape == x.shape
    hard = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    assert torch.equal(out, x * hard)
    assert torch.equal(out[..., 1], torch.zeros(2, 3))
    assert torch.equal(masker.get_mask(0), hard)
    assert torch.equal(masker.get_mask(0, None), hard)
    soft = masker.get_mask(1, 2.0)
    torch.testing.assert_close(soft, torch.sigmoid(2.0 * torch.tensor(PATTERNS[1])))
    # plain tensors and task_id=None pass through untouched
    assert masker(x) is x
    assert torch.equal(masker(HATPayload(x, task_id=None)).data, x)


def test_masker_in_front_of_a_linear_protects_inputs_it_switches_off():
    """The features a task's masker switches off do not reach the next layer."""
    cfg = HATConfig(num_tasks=NUM_TASKS)
    torch.manual_seed(4)
    masker = _with_patterns(HATMasker(5, cfg)).eval()
    fc = HATLinear(5, 3, cfg).eval()
    x = torch.randn(4, 5)
    before = fc(masker(HATPayload(x, task_id=0))).data
    x2 = x.clone()
    x2[:, [1, 3]] = 1e3  # features off for task 0
    assert torch.equal(fc(masker(HATPayload(x2, task_id=0))).data, before)


# -- TaskIndexedLinear ---------------------------------------------------------------------------------
def test_task_indexed_linear_rows():
    torch.manual_seed(5)
    head = TaskIndexedLinear(NUM_TASKS, 6, 4)
    assert head.weight.shape == (NUM_TASKS + 1, 4, 6)
    assert head.bias.shape == (NUM_TASKS + 1, 4)
    # every row is initialised on its own
    assert not torch.equal(head.weight[0], head.weight[1])
    x = torch.randn(3, 6)
    for t in range(NUM_TASKS):
        out = head(HATPayload(x, task_id=t, mask_scale=5.0))
        assert isinstance(out, HATPayload)
        assert torch.equal(out.data, x @ head.weight[t].T + head.bias[t])
    last = x @ head.weight[NUM_TASKS].T + head.bias[NUM_TASKS]
    assert torch.equal(head(HATPayload(x, task_id=None)).data, last)
    assert torch.equal(head(x), last)
    no_bias = TaskIndexedLinear(NUM_TASKS, 6, 4, bias=False)
    assert no_bias.bias is None
    assert torch.equal(no_bias(HATPayload(x, task_id=1, mask_scale=5.0)).data, x @ no_bias.weight[1].T)


def test_task_indexed_linear_trains_only_its_row():
    torch.manual_seed(6)
    head = TaskIndexedLinear(NUM_TASKS, 6, 4)
    opt = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.1)
    before = _state(head)
    x = torch.randn(8, 6)
    loss = head(HATPayload(x, task_id=1, mask_scale=5.0)).data.square().sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    for name in ("weight", "bias"):
        p = getattr(head, name)
        for row in range(NUM_TASKS + 1):
            same = torch.equal(p[row], before[name][row])
            assert same == (row != 1), f"{name} row {row}"


# -- TaskIndexedBatchNorm --------------------------------------------------------------------------------
BATCHNORMS = {
    "bn1d-2d-input": (TaskIndexedBatchNorm1d, nn.BatchNorm1d, (16, 4)),
    "bn1d-3d-input": (TaskIndexedBatchNorm1d, nn.BatchNorm1d, (8, 4, 5)),
    "bn2d": (TaskIndexedBatchNorm2d, nn.BatchNorm2d, (8, 4, 3, 3)),
    "bn3d": (TaskIndexedBatchNorm3d, nn.BatchNorm3d, (4, 4, 2, 3, 3)),
}


@pytest.mark.parametrize("name", list(BATCHNORMS))
def test_batchnorm_matches_torch_per_slot(name):
    cls, torch_cls, shape = BATCHNORMS[name]
    torch.manual_seed(7)
    bn = cls(NUM_TASKS, 4)
    assert bn.weight.shape == bn.bias.shape == bn.running_mean.shape == (NUM_TASKS + 1, 4)
    assert bn.num_batches_tracked.shape == (NUM_TASKS + 1,)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(NUM_TASKS + 1, 4) + 0.5)
        bn.bias.copy_(torch.randn(NUM_TASKS + 1, 4))
    x = torch.randn(shape) * 3 + 1
    for slot, task in [(1, 1), (NUM_TASKS, None)]:
        ref = torch_cls(4)
        with torch.no_grad():
            ref.weight.copy_(bn.weight[slot])
            ref.bias.copy_(bn.bias[slot])
        out = bn(HATPayload(x, task_id=task, mask_scale=4.0))
        assert out.data.shape == shape
        assert torch.equal(out.data, ref(x))
        assert torch.equal(bn.running_mean[slot], ref.running_mean)
        assert torch.equal(bn.running_var[slot], ref.running_var)
        assert bn.num_batches_tracked[slot] == 1
    # a plain tensor is task_id=None: the last slot
    ref = torch_cls(4)
    with torch.no_grad():
        ref.weight.copy_(bn.weight[NUM_TASKS])
        ref.bias.copy_(bn.bias[NUM_TASKS])
        ref.running_mean.copy_(bn.running_mean[NUM_TASKS])
        ref.running_var.copy_(bn.running_var[NUM_TASKS])
    y = bn(x)
    assert type(y) is torch.Tensor
    assert torch.equal(y, ref(x))
    assert bn.num_batches_tracked[NUM_TASKS] == 2


def test_batchnorm_training_task_1_touches_only_row_1():
    torch.manual_seed(8)
    bn = TaskIndexedBatchNorm2d(NUM_TASKS, 4)
    before = _state(bn)
    x = torch.randn(8, 4, 3, 3) * 2 + 3
    bn(HATPayload(x, task_id=1, mask_scale=10.0))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        for row in range(NUM_TASKS + 1):
            same = torch.equal(bn.state_dict()[key][row], before[key][row])
            assert same == (row != 1), f"{key} row {row}"
    assert bn.num_batches_tracked.tolist() == [0, 1, 0, 0]
    # task_id=None writes the last row only
    bn(HATPayload(x, task_id=None))
    assert bn.num_batches_tracked.tolist() == [0, 1, 0, 1]
    assert torch.equal(bn.running_mean[0], before["running_mean"][0])
    assert torch.equal(bn.running_mean[2], before["running_mean"][2])
    assert not torch.equal(bn.running_mean[3], before["running_mean"][3])


def test_batchnorm_eval_uses_the_running_stats_of_the_task():
    torch.manual_seed(9)
    bn = TaskIndexedBatchNorm2d(NUM_TASKS, 4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(NUM_TASKS + 1, 4))
        bn.running_var.copy_(torch.rand(NUM_TASKS + 1, 4) + 0.5)
        bn.weight.copy_(torch.randn(NUM_TASKS + 1, 4))
        bn.bias.copy_(torch.randn(NUM_TASKS + 1, 4))
    bn.eval()
    before = _state(bn)
    x = torch.randn(2, 4, 3, 3)
    v = lambda r: r.view(1, -1, 1, 1)  # noqa: E731
    for task, slot in [(0, 0), (2, 2), (None, NUM_TASKS)]:
        out = bn(HATPayload(x, task_id=task)).data
        want = ((x - v(bn.running_mean[slot])) / torch.sqrt(v(bn.running_var[slot]) + bn.eps) * v(bn.weight[slot])
                + v(bn.bias[slot]))
        torch.testing.assert_close(out, want)
    _assert_same_state(before, bn)  # eval does not touch the statistics


def test_batchnorm_after_hat_conv_silences_off_channels():
    """The mask acts after BN: a channel the task does not use leaves as exactly 0, not as beta."""
    cfg = HATConfig(num_tasks=NUM_TASKS)
    torch.manual_seed(10)
    conv = _with_patterns(HATConv2d(2, 5, 3, cfg, padding=1))
    bn = TaskIndexedBatchNorm2d(NUM_TASKS, 5)
    with torch.no_grad():
        bn.bias.copy_(torch.randn(NUM_TASKS + 1, 5) + 2)  # beta far from 0
        bn.weight.copy_(torch.rand(NUM_TASKS + 1, 5) + 0.5)
    x = torch.randn(6, 2, 5, 5)
    # training with a soft mask: mask * BN(conv(x))
    scale = 2.0
    out = bn(conv(HATPayload(x, task_id=1, mask_scale=scale))).data
    ref_bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        ref_bn.weight.copy_(bn.weight[1])
        ref_bn.bias.copy_(bn.bias[1])
    mask = torch.sigmoid(scale * torch.tensor(PATTERNS[1])).view(1, -1, 1, 1)
    torch.testing.assert_close(out, ref_bn(nn.Conv2d.forward(conv, x)) * mask)
    # eval with the hard mask: off channels exactly 0, on channels the plain BN's output
    conv.eval()
    bn.eval()
    ref_bn.eval()
    with torch.no_grad():
        ref_bn.running_mean.copy_(bn.running_mean[1])
        ref_bn.running_var.copy_(bn.running_var[1])
    out = bn(conv(HATPayload(x, task_id=1))).data
    ref = ref_bn(nn.Conv2d.forward(conv, x))
    for c, e in enumerate(PATTERNS[1]):
        if e > 0:
            torch.testing.assert_close(out[:, c], ref[:, c])
        else:
            assert torch.equal(out[:, c], torch.zeros_like(out[:, c])), f"channel {c} is off but not 0"


# -- TaskIndexedLayerNorm ---------------------------------------------------------------------------------
def test_layernorm_plain_and_per_task():
    torch.manual_seed(11)
    ln = TaskIndexedLayerNorm(NUM_TASKS, 6)
    assert ln.weight.shape == ln.bias.shape == (NUM_TASKS + 1, 6)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(NUM_TASKS + 1, 6))
        ln.bias.copy_(torch.randn(NUM_TASKS + 1, 6))
    x = torch.randn(3, 4, 6)
    for task, slot in [(0, 0), (2, 2), (None, NUM_TASKS)]:
        ref = nn.LayerNorm(6)
        with torch.no_grad():
            ref.weight.copy_(ln.weight[slot])
            ref.bias.copy_(ln.bias[slot])
        out = ln(HATPayload(x, task_id=task, mask_scale=3.0))
        assert out.data.shape == x.shape
        assert torch.equal(out.data, ref(x))
    y = ln(x)
    assert type(y) is torch.Tensor
    assert torch.equal(y, F.layer_norm(x, (6,), ln.weight[NUM_TASKS], ln.bias[NUM_TASKS]))


def test_layernorm_after_hat_linear_keeps_off_units_at_zero():
    cfg = HATConfig(num_tasks=NUM_TASKS)
    torch.manual_seed(12)
    fc = _with_patterns(HATLinear(6, 5, cfg)).eval()
    ln = TaskIndexedLayerNorm(NUM_TASKS, 5).eval()
    with torch.no_grad():
        ln.weight.copy_(torch.rand(NUM_TASKS + 1, 5) + 0.5)
        ln.bias.copy_(torch.randn(NUM_TASKS + 1, 5) + 2)  # far from 0
    x = torch.randn(4, 6)
    out = ln(fc(HATPayload(x, task_id=0))).data
    hard = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    masked_in = nn.Linear.forward(fc, x) * hard  # masked before the norm ...
    want = F.layer_norm(masked_in, (5,), ln.weight[0], ln.bias[0]) * hard  # ... and after it
    torch.testing.assert_close(out, want)
    for unit in (1, 3):
        assert torch.equal(out[:, unit], torch.zeros(4)), f"unit {unit} is off for task 0 but not 0"
    # weights of units task 0 does not use move neither the statistics nor the output of task 0
    with torch.no_grad():
        fc.weight[[1, 3]] *= 100.0
        fc.bias[[1, 3]] += 50.0
    assert torch.equal(ln(fc(HATPayload(x, task_id=0))).data, out)


def test_layernorm_trains_only_its_row():
    cfg = HATConfig(num_tasks=NUM_TASKS)
    torch.manual_seed(13)
    model = nn.ModuleDict({"fc": HATLinear(6, 5, cfg), "ln": TaskIndexedLayerNorm(NUM_TASKS, 5)})
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    before = _state(model)
    x = torch.randn(8, 6)
    loss = model["ln"](model["fc"](HATPayload(x, task_id=2, mask_scale=5.0))).data.sin().sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    for name in ("ln.weight", "ln.bias"):
        for row in range(NUM_TASKS + 1):
            same = torch.equal(model.state_dict()[name][row], before[name][row])
            assert same == (row != 2), f"{name} row {row}"


# -- networks trained on real data ------------------------------------------------------------------------
class DepthwiseCNN(nn.Module):
    """HATConv2d 1->16, then a depthwise HATConv2d 16->16 (groups=16), flatten, HATLinear, per-task heads."""

    def __init__(self, cfg: HATConfig) -> None:
        super().__init__()
        self.conv1 = HATConv2d(1, 16, 3, cfg, padding=1)
        self.bn1 = TaskIndexedBatchNorm2d(cfg.num_tasks, 16)
        self.conv2 = HATConv2d(16, 16, 3, cfg, padding=1, groups=16)
        self.bn2 = TaskIndexedBatchNorm2d(cfg.num_tasks, 16)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = HATLinear(16 * 4 * 4, 64, cfg)
        self.head = TaskIndexedLinear(cfg.num_tasks, 64, 2)

    def forward(self, p: HATPayload) -> HATPayload:
        p = self.bn1(self.conv1(p)).forward_by(self.relu)
        p = self.bn2(self.conv2(p)).forward_by(self.relu).forward_by(self.pool)
        p = self.fc(p.forward_by(self.flatten)).forward_by(self.relu)
        return self.head(p)


class ConvFlattenLinear(nn.Module):
    """HATConv2d -> ReLU -> MaxPool -> nn.Flatten -> HATLinear -> ReLU -> per-task heads (no norm)."""

    def __init__(self, cfg: HATConfig) -> None:
        super().__init__()
        self.conv = HATConv2d(1, 16, 3, cfg, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = HATLinear(16 * 4 * 4, 64, cfg)
        self.head = TaskIndexedLinear(cfg.num_tasks, 64, 2)

    def forward(self, p: HATPayload) -> HATPayload:
        p = self.conv(p).forward_by(nn.ReLU()).forward_by(self.pool).forward_by(self.flatten)
        return self.head(self.fc(p).forward_by(nn.ReLU()))


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.01)


def _probe(digit_tasks) -> torch.Tensor:
    return torch.cat([digit_tasks[0][2], digit_tasks[1][2]])


def _train_two_tasks(model: nn.Module, digit_tasks, epochs: int = 3):
    """Train tasks 0 and 1 with one AdamW; return (state after task 0, logits of task 0 after task 0)."""
    optimizer = _adamw(model)
    probe = _probe(digit_tasks)
    x, y, x_te, y_te = digit_tasks[0]
    train_task(model, optimizer, x, y, 0, epochs=epochs)
    assert accuracy(eval_logits(model, x_te, 0), y_te) >= 0.85
    after0 = _state(model)
    logits0 = eval_logits(model, probe, 0)
    x, y, x_te, y_te = digit_tasks[1]
    train_task(model, optimizer, x, y, 1, epochs=epochs)
    # a network whose protection blocked everything would stay near chance (0.5)
    assert accuracy(eval_logits(model, x_te, 1), y_te) >= 0.85, "protection must not block learning task 1"
    assert torch.equal(eval_logits(model, probe, 0), logits0), "task 0 changed while task 1 trained"
    assert hat.trained_tasks(model) == [0, 1]
    return after0, logits0


def _expected_conv_protection(conv: nn.Conv2d, out_used: torch.Tensor, in_used: torch.Tensor) -> torch.Tensor:
    """weight[o, j] is protected when output channel o and the input channel it reads are used."""
    w = conv.weight
    out_per_group = conv.out_channels // conv.groups
    protect = torch.zeros(w.shape[:2], dtype=torch.bool)
    for o in range(w.shape[0]):
        for j in range(w.shape[1]):
            c_in = (o // out_per_group) * w.shape[1] + j
            protect[o, j] = bool(out_used[o]) and bool(in_used[c_in])
    return protect


@pytest.mark.parametrize("make", [
    lambda c: CNN(c, groups=2),
    lambda c: CNN(c, groups=16),  # depthwise, channel multiplier 2
    DepthwiseCNN,  # depthwise, in = out = groups
], ids=["groups2", "depthwise-x2", "depthwise"])
def test_grouped_and_depthwise_conv_keep_task_0(digit_tasks, make):
    torch.manual_seed(0)
    model = make(HATConfig(num_tasks=NUM_TASKS))
    after0, _ = _train_two_tasks(model, digit_tasks)
    # the grouped conv's weights: exactly the entries task 0 uses are unchanged, and others moved
    conv1_used = after0["conv1.task_embedding"][0] > 0
    conv2_used = after0["conv2.task_embedding"][0] > 0
    protect = _expected_conv_protection(model.conv2, conv2_used, conv1_used)
    w0, w1 = after0["conv2.weight"], model.conv2.weight.detach()
    same = (w0 == w1).flatten(2).all(2)
    assert same[protect].all(), "a weight that task 0 uses changed"
    assert not same[~protect].all(), "no free weight of the grouped conv was trained"
    # task-indexed BN: row 0 untouched by task 1
    for bn in ("bn1", "bn2"):
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(model.state_dict()[f"{bn}.{key}"][0], after0[f"{bn}.{key}"][0]), f"{bn}.{key}[0]"


def test_conv_flatten_linear_protects_by_channel(digit_tasks):
    torch.manual_seed(0)
    model = ConvFlattenLinear(HATConfig(num_tasks=NUM_TASKS))
    after0, _ = _train_two_tasks(model, digit_tasks)
    out_used = after0["fc.task_embedding"][0] > 0
    channel_used = after0["conv.task_embedding"][0] > 0
    in_used = channel_used.repeat_interleave(16)  # channel-major flatten of [16, 4, 4]
    protect = out_used.view(-1, 1) & in_used.view(1, -1)
    same = after0["fc.weight"] == model.fc.weight.detach()
    assert same[protect].all(), "an fc weight that task 0 uses changed"
    # a unit task 0 uses still learns from channels task 0 does not use: protection is per channel,
    # not the whole row
    row_used_col_free = out_used.view(-1, 1) & ~in_used.view(1, -1)
    assert row_used_col_free.any()
    assert not same[row_used_col_free].all()
    bias_same = after0["fc.bias"] == model.fc.bias.detach()
    assert bias_same[out_used].all()
    assert not bias_same[~out_used].all()


class SharedHeadMLP(nn.Module):
    """HATLinear 64->64 and one plain nn.Linear head shared by every task (class-incremental style)."""

    def __init__(self, cfg: HATConfig) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = HATLinear(64, 64, cfg)
        self.head = nn.Linear(64, 2)

    def forward(self, p: HATPayload) -> HATPayload:
        return self.fc(p.forward_by(self.flatten)).forward_by(nn.ReLU()).forward_by(self.head)


@pytest.mark.filterwarnings("ignore:hat. .* plain")
def test_shared_plain_head_is_protected(digit_tasks):
    """The control for the copy and load tests below: in the model that trained task 0, a plain
    parameter task 0 trained is protected whole while task 1 trains."""
    torch.manual_seed(0)
    model = SharedHeadMLP(HATConfig(num_tasks=NUM_TASKS))
    optimizer = _adamw(model)
    probe = _probe(digit_tasks)
    x, y, _, _ = digit_tasks[0]
    train_task(model, optimizer, x, y, 0, epochs=2)
    logits0 = eval_logits(model, probe, 0)
    head = _state(model.head)
    x, y, _, _ = digit_tasks[1]
    train_task(model, _adamw(model), x, y, 1, epochs=2)  # even with a second optimizer
    _assert_same_state(head, model.head)
    assert torch.equal(eval_logits(model, probe, 0), logits0)


@pytest.mark.filterwarnings("ignore:hat. .* plain")
@pytest.mark.parametrize("set_to_none", [True, False], ids=["none-grads", "zeroed-grads"])
@pytest.mark.parametrize("model_cls", [CNN, MLP, SharedHeadMLP], ids=["cnn", "mlp", "shared-plain-head"])
def test_deepcopy_still_protects(digit_tasks, model_cls, set_to_none):
    torch.manual_seed(0)
    model = model_cls(HATConfig(num_tasks=NUM_TASKS))
    probe = _probe(digit_tasks)
    x, y, _, _ = digit_tasks[0]
    train_task(model, _adamw(model), x, y, 0, epochs=2, set_to_none=set_to_none)
    logits0 = eval_logits(model, probe, 0)
    original = _state(model)
    clone = copy.deepcopy(model)
    assert hat.trained_tasks(clone) == [0]
    assert torch.equal(eval_logits(clone, probe, 0), logits0)
    x, y, _, _ = digit_tasks[1]
    train_task(clone, _adamw(clone), x, y, 1, epochs=2, set_to_none=set_to_none)
    assert hat.trained_tasks(clone) == [0, 1]
    assert torch.equal(eval_logits(clone, probe, 0), logits0), "the copy forgot task 0"
    _assert_same_state(original, model)  # training the copy leaves the original alone
    assert hat.trained_tasks(model) == [0]


def test_state_dict_round_trip(digit_tasks):
    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=NUM_TASKS)
    model = CNN(cfg)
    probe = _probe(digit_tasks)
    x, y, _, _ = digit_tasks[0]
    train_task(model, _adamw(model), x, y, 0, epochs=2)
    logits0 = eval_logits(model, probe, 0)
    state = model.state_dict()
    assert any(k.endswith("hat_trained") for k in state)

    torch.manual_seed(1)
    fresh = CNN(cfg)
    stale = eval_logits(fresh, probe, 0)  # evaluate first: nothing cached may survive the load
    assert not torch.equal(stale, logits0)
    fresh.load_state_dict(state)
    assert hat.trained_tasks(fresh) == hat.trained_tasks(model) == [0]
    for (name, a), (_, b) in zip(model.named_buffers(), fresh.named_buffers()):
        if name.endswith("hat_trained"):
            assert torch.equal(a, b), name
    assert torch.equal(eval_logits(fresh, probe, 0), logits0)

    # the loaded model knows task 0 is trained: a new optimizer on it still protects task 0
    x, y, _, _ = digit_tasks[1]
    train_task(fresh, _adamw(fresh), x, y, 1, epochs=2)
    assert torch.equal(eval_logits(fresh, probe, 0), logits0)

    with pytest.raises(ValueError, match=rf"num_tasks={NUM_TASKS}, but .* has num_tasks={NUM_TASKS + 1}"):
        CNN(HATConfig(num_tasks=NUM_TASKS + 1)).load_state_dict(state)


@pytest.mark.filterwarnings("ignore:hat. .* plain")
def test_state_dict_round_trip_protects_plain_parameters(digit_tasks):
    """A plain parameter that task 0 trained (a shared head) stays protected after save and load."""
    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=NUM_TASKS)
    model = SharedHeadMLP(cfg)
    probe = _probe(digit_tasks)
    x, y, _, _ = digit_tasks[0]
    train_task(model, _adamw(model), x, y, 0, epochs=2)
    logits0 = eval_logits(model, probe, 0)
    fresh = SharedHeadMLP(cfg)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(eval_logits(fresh, probe, 0), logits0)
    x, y, _, _ = digit_tasks[1]
    train_task(fresh, _adamw(fresh), x, y, 1, epochs=2)
    assert torch.equal(eval_logits(fresh, probe, 0), logits0), "the loaded model forgot task 0"


def test_mark_trained_then_train_another_task(digit_tasks):
    torch.manual_seed(0)
    model = CNN(HATConfig(num_tasks=NUM_TASKS))
    probe = _probe(digit_tasks)
    hat.mark_trained(model, 0)
    assert hat.trained_tasks(model) == [0]
    from hat.tracking.tracked import task_modules

    assert all(bool(m.hat_trained[0]) and int(m.hat_trained.sum()) == 1 for m in task_modules(model))
    before = _state(model)
    logits0 = eval_logits(model, probe, 0)
    x, y, _, _ = digit_tasks[1]
    train_task(model, _adamw(model), x, y, 1, epochs=2)
    assert hat.trained_tasks(model) == [0, 1]
    assert torch.equal(eval_logits(model, probe, 0), logits0)
    state = model.state_dict()
    for key in state:
        if key.endswith(("task_embedding", "bn1.weight", "bn2.bias", "head.weight", "head.bias")):
            assert torch.equal(state[key][0], before[key][0]), key
            assert not torch.equal(state[key][1], before[key][1]), key
