"""Bad arguments fail early, with the builtin exception type, a message that names the argument and
the value, and nothing changed: no parameter, buffer or bookkeeping moves before the error."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
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
from hat.utils import get_hat_mask_scale

from helpers import eval_logits, train_task
from models import CNN

NUM_TASKS = 3
CFG = HATConfig(num_tasks=NUM_TASKS)

# name: (module factory, an input it accepts)
MODULES = {
    "HATLinear": (lambda: HATLinear(4, 3, CFG), (2, 4)),
    "HATConv1d": (lambda: HATConv1d(2, 3, 3, CFG), (2, 2, 5)),
    "HATConv2d": (lambda: HATConv2d(2, 3, 3, CFG), (2, 2, 5, 5)),
    "HATConv3d": (lambda: HATConv3d(2, 3, 3, CFG), (2, 2, 4, 4, 4)),
    "HATMasker": (lambda: HATMasker(4, CFG), (2, 4)),
    "TaskIndexedBatchNorm1d": (lambda: TaskIndexedBatchNorm1d(NUM_TASKS, 3), (4, 3)),
    "TaskIndexedBatchNorm2d": (lambda: TaskIndexedBatchNorm2d(NUM_TASKS, 3), (4, 3, 2, 2)),
    "TaskIndexedBatchNorm3d": (lambda: TaskIndexedBatchNorm3d(NUM_TASKS, 3), (4, 3, 2, 2, 2)),
    "TaskIndexedLayerNorm": (lambda: TaskIndexedLayerNorm(NUM_TASKS, 4), (2, 4)),
    "TaskIndexedLinear": (lambda: TaskIndexedLinear(NUM_TASKS, 4, 3), (2, 4)),
}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"changed by a call that failed: {changed}"


def _names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in the message {message!r}"


# -- HATConfig --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -1, -100])
def test_config_num_tasks_not_positive(value):
    with pytest.raises(ValueError) as info:
        HATConfig(num_tasks=value)
    _names(str(info.value), "num_tasks", str(value))


@pytest.mark.parametrize("value", [2.5, "3", True, None, 3.0])
def test_config_num_tasks_not_an_int(value):
    with pytest.raises(TypeError) as info:
        HATConfig(num_tasks=value)
    _names(str(info.value), "num_tasks", repr(value))


def test_config_num_tasks_numpy_int_accepted():
    cfg = HATConfig(num_tasks=np.int64(4))
    assert cfg.num_tasks == 4 and type(cfg.num_tasks) is int


def test_config_unknown_keyword():
    with pytest.raises(TypeError, match="max_mask_scale"):
        HATConfig(num_tasks=2, max_mask_scale=10)


def test_config_missing_num_tasks():
    with pytest.raises(TypeError, match="num_tasks"):
        HATConfig()


def test_config_bad_init_strat():
    with pytest.raises(ValueError) as info:
        HATConfig(num_tasks=2, init_strat="x")
    _names(str(info.value), "init_strat", "'x'", "normal")


@pytest.mark.parametrize("name", ["max_trn_mask_scale", "attn_clamp", "grad_comp_clamp", "grad_comp_factor"])
@pytest.mark.parametrize("value, error", [(0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                          (float("inf"), ValueError), ("1", TypeError)])
def test_config_positive_numbers(name, value, error):
    with pytest.raises(error) as info:
        HATConfig(num_tasks=2, **{name: value})
    _names(str(info.value), name)


def test_config_bad_mask_dim_and_gate():
    with pytest.raises(TypeError, match="mask_dim"):
        HATConfig(num_tasks=2, mask_dim=1.0)
    with pytest.raises(TypeError, match="gate"):
        HATConfig(num_tasks=2, gate="sigmoid")


@pytest.mark.parametrize("make", [
    lambda cfg: HATLinear(4, 3, cfg),
    lambda cfg: HATConv2d(2, 3, 3, cfg),
    lambda cfg: HATMasker(4, cfg),
], ids=["linear", "conv2d", "masker"])
@pytest.mark.parametrize("cfg", [3, {"num_tasks": 3}, None], ids=["int", "dict", "none"])
def test_layers_need_a_config(make, cfg):
    with pytest.raises(TypeError, match="hat_config"):
        make(cfg)


@pytest.mark.parametrize("cls", [TaskIndexedBatchNorm2d, TaskIndexedLayerNorm, TaskIndexedLinear])
@pytest.mark.parametrize("value, error", [(0, ValueError), (2.5, TypeError), (True, TypeError)])
def test_task_indexed_num_tasks(cls, value, error):
    with pytest.raises(error, match="num_tasks"):
        cls(value, 4, 4) if cls is TaskIndexedLinear else cls(value, 4)


# -- HATPayload -------------------------------------------------------------------------------------
@pytest.mark.parametrize("task_id", [True, False, 1.5, 1.0, "0", [0], torch.tensor(1.0), torch.tensor([1]),
                                     torch.tensor(True)],
                         ids=["True", "False", "1.5", "1.0", "str", "list", "float-tensor", "1d-tensor", "bool-tensor"])
def test_payload_task_id_type(task_id):
    with pytest.raises(TypeError) as info:
        HATPayload(torch.zeros(2, 4), task_id=task_id)
    message = str(info.value)
    _names(message, "task_id")
    if not isinstance(task_id, torch.Tensor):
        _names(message, repr(task_id))


@given(st.integers(max_value=-1))
def test_payload_negative_task_id(task_id):
    with pytest.raises(IndexError) as info:
        HATPayload(torch.zeros(2, 4), task_id=task_id)
    _names(str(info.value), "task_id", str(task_id))


def test_payload_negative_tensor_and_numpy_task_id():
    for task_id in (np.int64(-1), torch.tensor(-2)):
        with pytest.raises(IndexError, match="task_id"):
            HATPayload(torch.zeros(2, 4), task_id=task_id)


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, float("nan"), float("inf"), float("-inf")])
def test_payload_mask_scale_value(value):
    with pytest.raises(ValueError) as info:
        HATPayload(torch.zeros(2, 4), task_id=0, mask_scale=value)
    _names(str(info.value), "mask_scale", str(float(value)))


@pytest.mark.parametrize("value", ["1", True, [1.0], torch.ones(2)], ids=["str", "bool", "list", "tensor-2"])
def test_payload_mask_scale_type(value):
    with pytest.raises(TypeError, match="mask_scale"):
        HATPayload(torch.zeros(2, 4), task_id=0, mask_scale=value)


def test_payload_data_must_be_a_tensor():
    with pytest.raises(TypeError, match="data"):
        HATPayload(np.zeros((2, 4), dtype=np.float32), task_id=0)


@pytest.mark.parametrize("name", list(MODULES))
def test_integer_like_task_ids_are_accepted(name):
    make, shape = MODULES[name]
    torch.manual_seed(0)
    module = make().eval()
    x = torch.randn(shape)
    want = module(HATPayload(x, task_id=2, mask_scale=4.0)).data
    for task_id in (np.int64(2), np.int32(2), torch.tensor(2), torch.tensor(2, dtype=torch.int8)):
        payload = HATPayload(x, task_id=task_id, mask_scale=4.0)
        assert payload.task_id == 2 and type(payload.task_id) is int
        assert torch.equal(module(payload).data, want)
    # numpy floats and 0-d tensors are fine as scales
    assert torch.equal(module(HATPayload(x, task_id=2, mask_scale=np.float32(4.0))).data, want)
    assert torch.equal(module(HATPayload(x, task_id=2, mask_scale=torch.tensor(4.0))).data, want)


# -- task ids out of range at a layer ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("task_id", [NUM_TASKS, NUM_TASKS + 1, 1000])
def test_task_id_out_of_range_at_a_layer(name, task_id):
    make, shape = MODULES[name]
    torch.manual_seed(0)
    module = make().train()
    hat.mark_trained(module, 0)
    before = _state(module)
    payload = HATPayload(torch.randn(shape), task_id=task_id, mask_scale=10.0)
    with pytest.raises(IndexError) as info:
        module(payload)
    message = str(info.value)
    _names(message, "task_id", str(task_id), f"[0, {NUM_TASKS})")
    _assert_unchanged(before, module)


@pytest.mark.parametrize("name", ["HATLinear", "HATConv2d", "HATMasker"])
def test_get_mask_bad_task_id(name):
    module = MODULES[name][0]()
    with pytest.raises(IndexError, match=re.escape(f"[0, {NUM_TASKS})")):
        module.get_mask(NUM_TASKS)
    with pytest.raises(IndexError):
        module.get_mask(-1)
    with pytest.raises(TypeError, match="task_id"):
        module.get_mask(None)
    with pytest.raises(TypeError, match="task_id"):
        module.get_mask(True)


@given(task_id=st.one_of(st.integers(max_value=-1), st.integers(min_value=NUM_TASKS)))
def test_any_int_outside_range_raises_index_error(task_id):
    layer = HATLinear(4, 3, CFG)
    with pytest.raises(IndexError, match="task_id"):
        layer(HATPayload(torch.zeros(1, 4), task_id=task_id, mask_scale=1.0))


@given(task_id=st.integers(min_value=0, max_value=NUM_TASKS - 1),
       scale=st.floats(min_value=1e-3, max_value=1e3, allow_nan=False))
def test_any_valid_task_and_scale_work(task_id, scale):
    layer = HATLinear(4, 3, CFG)
    out = layer(HATPayload(torch.ones(1, 4), task_id=task_id, mask_scale=scale)).data
    assert out.shape == (1, 3) and torch.isfinite(out).all()


# -- a failing forward in a model leaves everything as it was ---------------------------------------
class NormFirst(nn.Module):
    """A task-indexed BatchNorm on the input, before the first HAT layer."""

    def __init__(self, cfg: HATConfig) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.bn = TaskIndexedBatchNorm1d(cfg.num_tasks, 64)
        self.fc = HATLinear(64, 32, cfg)
        self.head = TaskIndexedLinear(cfg.num_tasks, 32, 2)

    def forward(self, p: HATPayload) -> HATPayload:
        p = self.fc(self.bn(p.forward_by(self.flatten))).forward_by(nn.ReLU())
        return self.head(p)


def _one_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, task: int) -> None:
    model.train()
    loss = nn.functional.cross_entropy(model(HATPayload(x, task_id=task, mask_scale=50.0)).data, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("model_cls", [CNN, NormFirst], ids=["cnn", "norm-first"])
@pytest.mark.parametrize("bad", ["task-out-of-range", "training-without-scale"])
def test_failing_forward_changes_nothing(digit_tasks, model_cls, bad):
    torch.manual_seed(0)
    model = model_cls(CFG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.01)
    x, y, x_te, _ = digit_tasks[0]
    train_task(model, optimizer, x, y, 0, epochs=1)
    logits0 = eval_logits(model, x_te, 0)
    model.train()
    before = _state(model)
    if bad == "task-out-of-range":
        with pytest.raises(IndexError, match="task_id"):
            model(HATPayload(x[:8], task_id=NUM_TASKS, mask_scale=10.0))
    else:  # task 2 is a valid id, but a training forward with grad needs a mask scale
        with pytest.raises(ValueError, match="mask_scale"):
            model(HATPayload(x[:8], task_id=2, mask_scale=None))
    _assert_unchanged(before, model)
    assert hat.trained_tasks(model) == [0]
    # the failed call left no trace in the step bookkeeping either: the next step trains task 1 only
    x1, y1, _, _ = digit_tasks[1]
    _one_step(model, optimizer, x1[:32], y1[:32], 1)
    assert hat.trained_tasks(model) == [0, 1]
    assert torch.equal(eval_logits(model, x_te, 0), logits0)


# -- mark_trained -----------------------------------------------------------------------------------
@pytest.mark.parametrize("task_id, error", [
    (NUM_TASKS, IndexError), (-1, IndexError), (True, TypeError), (None, TypeError), (0.0, TypeError), ("1", TypeError),
])
def test_mark_trained_bad_id_marks_nothing(task_id, error):
    model = CNN(CFG)
    before = _state(model)
    with pytest.raises(error, match="task_id"):
        hat.mark_trained(model, task_id)
    assert hat.trained_tasks(model) == []
    _assert_unchanged(before, model)


@given(task_id=st.integers(min_value=3, max_value=4))
def test_mark_trained_checks_every_module_before_marking(task_id):
    """A model whose modules disagree on num_tasks: an id that only some accept marks nothing."""
    model = nn.Sequential(HATLinear(4, 4, HATConfig(num_tasks=5)), HATLinear(4, 4, HATConfig(num_tasks=3)),
                          TaskIndexedBatchNorm1d(5, 4))
    with pytest.raises(IndexError):
        hat.mark_trained(model, task_id)
    assert hat.trained_tasks(model) == []
    assert not any(bool(m.hat_trained.any()) for m in model)


def test_mark_trained_without_hat_modules():
    with pytest.raises(ValueError, match="Sequential"):
        hat.mark_trained(nn.Sequential(nn.Linear(2, 2)), 0)


def test_mark_trained_accepts_integer_likes():
    model = CNN(CFG)
    hat.mark_trained(model, np.int64(2))
    hat.mark_trained(model, torch.tensor(0))
    assert hat.trained_tasks(model) == [0, 2]


# -- utils ------------------------------------------------------------------------------------------
def test_reg_term_bad_arguments():
    from hat.utils import get_hat_reg_term

    model = CNN(CFG)
    with pytest.raises(TypeError, match="task_id"):
        get_hat_reg_term(model, task_id=None, mask_scale=1.0)
    with pytest.raises(IndexError, match="task_id"):
        get_hat_reg_term(model, task_id=NUM_TASKS, mask_scale=1.0)
    with pytest.raises(ValueError, match="mask_scale"):
        get_hat_reg_term(model, task_id=0, mask_scale=0.0)
    with pytest.raises(ValueError) as info:
        get_hat_reg_term(model, strat="papr", task_id=0, mask_scale=1.0)
    _names(str(info.value), "strat", "'papr'")


@pytest.mark.parametrize("args, error, words", [
    (("linaer", 100.0, 0.5), ValueError, ("strat", "'linaer'")),
    (("linear", 100.0, 1.5), ValueError, ("progress", "1.5")),
    (("linear", 100.0, -0.1), ValueError, ("progress", "-0.1")),
    (("linear", 100.0, float("nan")), ValueError, ("progress", "nan")),
    (("linear", 100.0, "0.5"), TypeError, ("progress", "'0.5'")),
    (("linear", 100.0, True), TypeError, ("progress", "True")),
    (("linear", 0.0, 0.5), ValueError, ("max_trn_mask_scale", "0")),
    (("linear", -5, 0.5), ValueError, ("max_trn_mask_scale", "-5")),
])
def test_mask_scale_schedule_bad_arguments(args, error, words):
    with pytest.raises(error) as info:
        get_hat_mask_scale(*args)
    _names(str(info.value), *words)
