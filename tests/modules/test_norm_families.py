"""Every norm family ``hat.convert`` maps (torch's, timm's norm-act layers, timm's and torchvision's
LayerNorm2d), converted inside a small conv model and trained on the digits.

The reference is always the model itself: rows of the task-indexed parameters before and after
training, the task-0 output before and after task 1 trains, and the plain model ``hat.unconvert``
gives back.
"""

from __future__ import annotations

import pytest
import timm.layers as tl
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.convnext import LayerNorm2d as TorchvisionLayerNorm2d

import hat
from hat import HATConfig
from hat.modules import (
    TaskIndexedBatchNorm2d,
    TaskIndexedGroupNorm,
    TaskIndexedLayerNorm2d,
    TaskIndexedSyncBatchNorm,
)

from helpers import eval_logits, tensor_forward, train_task

NUM_TASKS = 2
CHANNELS = 8

# name: (factory of the plain norm over CHANNELS channels, the task-indexed type it converts to)
FAMILIES = {
    "groupnorm": (lambda: nn.GroupNorm(2, CHANNELS), TaskIndexedGroupNorm),
    "timm-groupnorm1": (lambda: tl.GroupNorm1(CHANNELS), TaskIndexedGroupNorm),
    "timm-groupnormact-relu": (lambda: tl.GroupNormAct(CHANNELS, 2, act_layer=nn.ReLU), TaskIndexedGroupNorm),
    "timm-layernorm2d": (lambda: tl.LayerNorm2d(CHANNELS), TaskIndexedLayerNorm2d),
    "torchvision-layernorm2d": (lambda: TorchvisionLayerNorm2d(CHANNELS), TaskIndexedLayerNorm2d),
    "timm-layernormact2d-relu": (lambda: tl.LayerNormAct2d(CHANNELS, act_layer=nn.ReLU), TaskIndexedLayerNorm2d),
    "timm-batchnormact2d-relu": (lambda: tl.BatchNormAct2d(CHANNELS, act_layer=nn.ReLU), TaskIndexedBatchNorm2d),
    "syncbatchnorm": (lambda: nn.SyncBatchNorm(CHANNELS), TaskIndexedSyncBatchNorm),
}
# the tensors of a norm that are per task (rows [num_tasks + 1, ...]) where the norm has them
ROW_TENSORS = ("weight", "bias", "running_mean", "running_var")
# task embeddings of the conv before the norm: channels 0, 2, 4, 6 on for task 0, the others for task 1
HALVES = torch.tensor([[1.0, -1.0] * (CHANNELS // 2), [-1.0, 1.0] * (CHANNELS // 2)])


class NormNet(nn.Module):
    """conv -> norm -> relu -> strided conv -> relu -> linear head, on 1x8x8 digits."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, CHANNELS, 3, padding=1)
        self.norm = norm
        self.conv2 = nn.Conv2d(CHANNELS, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def _pretrained_like(norm: nn.Module) -> nn.Module:
    """Affine values (and statistics) away from the defaults, as a pretrained model has them, so that
    a row that starts from the defaults instead of these is caught."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if norm.weight is not None:
            norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=g))
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g) * 0.1)
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.copy_(torch.randn(norm.running_mean.shape, generator=g) * 0.1)
            norm.running_var.copy_(0.5 + torch.rand(norm.running_var.shape, generator=g))
    return norm


def _make(family: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(the plain model, the converted model: a copy of it)."""
    torch.manual_seed(seed)
    plain = NormNet(_pretrained_like(FAMILIES[family][0]()))
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    torch.manual_seed(seed)
    twin = NormNet(FAMILIES[family][0]())
    twin.load_state_dict(state)
    return plain, hat.convert(twin, HATConfig(num_tasks=NUM_TASKS))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, data: tuple, t: int, *, n: int = 160,
           epochs: int = 2, batch_size: int = 32) -> None:
    """HAT's training loop (tests/helpers.py): the mask scale annealed 1/s_max -> s_max in each epoch,
    the regularizer; the task selected with hat.set_task."""
    train_task(model, optimizer, data[0][:n], data[1][:n], t, epochs=epochs, batch_size=batch_size,
               forward=tensor_forward)


def _eval(model: nn.Module, x: torch.Tensor, t: int) -> torch.Tensor:
    logits = eval_logits(model, x, t, forward=tensor_forward)
    model.eval()  # as the callers expect after an evaluation
    return logits


def _rows(norm: nn.Module) -> dict[str, torch.Tensor]:
    return {n: getattr(norm, n).detach().clone() for n in ROW_TENSORS if getattr(norm, n, None) is not None}


# -- 1. each family: converted, trained on two tasks, unconverted -----------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_norm_family_converts_keeps_task_0_exact_and_unconverts_to_its_own_class(digit_tasks, family):
    plain, model = _make(family)
    original = plain.norm
    norm = model.norm
    assert type(norm) is FAMILIES[family][1]
    # a timm norm-act layer keeps its drop and act, of the same classes
    for child in ("drop", "act"):
        if hasattr(original, child):
            assert type(getattr(norm, child)) is type(getattr(original, child))
    # every task row, and the no-task row, starts from the original affine values and statistics
    for name, value in _rows(norm).items():
        assert value.shape[0] == NUM_TASKS + 1, name
        for slot in range(NUM_TASKS + 1):
            assert torch.equal(value[slot], getattr(original, name)), f"{name}[{slot}]"

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.05)  # one for both tasks
    probe = digit_tasks[0][2][:64]
    _train(model, optimizer, digit_tasks[0], 0)
    task0 = _eval(model, probe, 0)
    _train(model, optimizer, digit_tasks[1], 1)
    assert not torch.equal(_eval(model, probe, 1), task0)  # task 1 is another network ...
    assert torch.equal(_eval(model, probe, 0), task0)  # ... and task 0 is bit-identical

    back = hat.unconvert(model, 0)
    assert type(back.norm) is type(original)  # the class it was converted from, not a torch base class
    for child in ("drop", "act"):
        if hasattr(original, child):
            assert type(getattr(back.norm, child)) is type(getattr(original, child))
    assert not hat.tracking.tracked.task_modules(back)
    back.eval()
    with torch.no_grad():
        assert torch.equal(back(probe), task0)


# -- 2. units a task does not use leave each norm as exact zeros ------------------------------------
ZERO_FAMILIES = {
    **{k: FAMILIES[k][0] for k in ("groupnorm", "timm-layernorm2d", "torchvision-layernorm2d",
                                    "timm-batchnormact2d-relu", "syncbatchnorm")},
    # an act that moves 0 (sigmoid(0) = 0.5): the mask must be applied again after it
    "timm-batchnormact2d-sigmoid": lambda: tl.BatchNormAct2d(CHANNELS, act_layer=nn.Sigmoid),
    "timm-groupnormact-sigmoid": lambda: tl.GroupNormAct(CHANNELS, 2, act_layer=nn.Sigmoid),
    "timm-layernormact2d-sigmoid": lambda: tl.LayerNormAct2d(CHANNELS, act_layer=nn.Sigmoid),
    # no affine to fold the mask into: it is applied after the norm
    "groupnorm-no-affine": lambda: nn.GroupNorm(2, CHANNELS, affine=False),
    "batchnorm-no-affine": lambda: nn.BatchNorm2d(CHANNELS, affine=False),
}


@pytest.mark.parametrize("family", list(ZERO_FAMILIES))
def test_channels_a_task_does_not_use_leave_the_norm_as_exact_zeros(digit_tasks, family):
    torch.manual_seed(0)
    model = hat.convert(NormNet(_pretrained_like(ZERO_FAMILIES[family]())), HATConfig(num_tasks=NUM_TASKS))
    with torch.no_grad():
        model.conv.task_embedding.copy_(HALVES)
    outputs = []
    model.norm.register_forward_hook(lambda m, i, o: outputs.append(o))
    x = digit_tasks[0][2][:16]
    with torch.no_grad():
        model(x)  # the first call traces the model (and calls the norm more than once)
    for train in (False, True):
        model.train(train)
        for t in range(NUM_TASKS):
            outputs.clear()
            with torch.no_grad(), hat.task(model, t, mask_scale=None if not train else 400.0):
                model(x)
            (out,) = outputs
            off = (model.conv.get_mask(t) == 0).nonzero().flatten()
            on = (model.conv.get_mask(t) == 1).nonzero().flatten()
            assert len(off) == 4 and len(on) == 4
            assert torch.equal(out.index_select(1, off), torch.zeros(16, 4, 8, 8)), (train, t)
            assert (out.index_select(1, on) != 0).any()  # the hook sees the norm's real output


# -- 3. only the trained task's rows change --------------------------------------------------------
@pytest.mark.parametrize("family", ["groupnorm", "timm-layernorm2d", "timm-batchnormact2d-relu", "syncbatchnorm"])
def test_training_task_1_changes_only_row_1_of_parameters_and_statistics(digit_tasks, family):
    _, model = _make(family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.05)
    _train(model, optimizer, digit_tasks[0], 0, n=96, epochs=1)
    model.eval()
    with torch.no_grad(), hat.task(model, 0):
        model(digit_tasks[0][2][:4])  # evaluation settles task 0's statistics before the snapshot
    before = _rows(model.norm)
    _train(model, optimizer, digit_tasks[1], 1, n=96, epochs=1)
    model.eval()
    with torch.no_grad(), hat.task(model, 1):
        model(digit_tasks[1][2][:4])
    after = _rows(model.norm)
    for name in before:
        assert torch.equal(after[name][0], before[name][0]), f"{name}: task 0's row moved"
        assert torch.equal(after[name][NUM_TASKS], before[name][NUM_TASKS]), f"{name}: the no-task row moved"
        assert not torch.equal(after[name][1], before[name][1]), f"{name}: task 1's row did not train"


# -- 4. a norm with a child it would drop ----------------------------------------------------------
class BatchNormWithGate(nn.BatchNorm2d):
    """A BatchNorm2d subclass with a submodule of its own that a task-indexed norm would lose."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.gate = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * torch.sigmoid(self.gate(x))


def test_a_norm_with_an_unknown_child_is_a_type_error_naming_it_and_changes_nothing():
    torch.manual_seed(0)
    model = NormNet(BatchNormWithGate(CHANNELS))
    before = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mapping = {BatchNormWithGate: hat.modules.TaskIndexedBatchNorm2d}
    with pytest.raises(TypeError, match=r"BatchNormWithGate.*\(gate\)"):
        hat.convert(model, HATConfig(num_tasks=NUM_TASKS), mapping=mapping)
    after = dict(model.named_modules())
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)  # not one module swapped, not even the convs
    assert type(model.conv) is nn.Conv2d and not hat.tracking.tracked.task_modules(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model._forward_pre_hooks  # nor a hook installed on the root


# -- 5. hat.unconvert gives the HAT model's output where the act moves 0 or there is no affine ---------
def test_unconvert_of_a_norm_act_whose_act_moves_0_gives_the_hat_output(digit_tasks):
    torch.manual_seed(0)
    model = hat.convert(NormNet(tl.BatchNormAct2d(CHANNELS, act_layer=nn.Sigmoid)), HATConfig(num_tasks=NUM_TASKS))
    with torch.no_grad():
        model.conv.task_embedding.copy_(HALVES)
    x = digit_tasks[0][2][:16]
    expected = _eval(model, x, 0)
    plain = hat.unconvert(model, 0).eval()
    with torch.no_grad():
        assert torch.equal(plain(x), expected)


def test_unconvert_of_a_groupnorm_without_affine_is_bit_identical(digit_tasks):
    torch.manual_seed(0)
    model = hat.convert(NormNet(nn.GroupNorm(2, CHANNELS, affine=False)), HATConfig(num_tasks=NUM_TASKS))
    with torch.no_grad():
        model.conv.task_embedding.copy_(HALVES)
    x = digit_tasks[0][2]
    expected = _eval(model, x, 0)
    plain = hat.unconvert(model, 0).eval()
    with torch.no_grad():
        got = plain(x)
    torch.testing.assert_close(got, expected)  # the same function: only the last bits differ
    assert torch.equal(got, expected)
