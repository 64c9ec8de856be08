"""hat-cl 0.1.1's ``hat.utils`` with its signatures (forget_task, prune_hat_module, get_hat_util,
load_from_base_module(_state_dict), forward_hat_payload), ``hat.types_.ForgetResult`` and
``TaskIndexedParameter``, on models trained on the digits."""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch
from torch import nn

import hat
import hat.timm_models  # registers the hat_* models in timm
from hat import HATConfig, HATPayload, HATTypeError, HATValueError, TaskIndexError, training
from hat.forget import forget_task as hat_forget_task
from hat.modules import HATLinear, TaskIndexedLinear
from hat.modules.task_parameter import TaskIndexedParameter
from hat.types_ import ForgetResult, NoParameterToForgetWarning
from hat.types_ import HATConfig as HATConfigOfTypes
from hat.utils import (
    forget_task,
    forward_hat_payload,
    get_hat_util,
    load_from_base_module,
    load_from_base_module_state_dict,
    prune_hat_module,
)

from convert_models import sequential_cnn

NUM_TASKS = 3


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def converted_cnn(digit_tasks, tasks=NUM_TASKS, epochs=1):
    torch.manual_seed(0)
    model = hat.convert(sequential_cnn(), HATConfig(num_tasks=NUM_TASKS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for t in range(tasks):
        training.train_task(model, optimizer, digit_tasks[t][:2], t, epochs=epochs, forward="set_task",
                            generator=torch.Generator().manual_seed(t))
    return model


def logits(model, x, t):
    return training.predict(model, x, t, forward="set_task")


@pytest.fixture(scope="module")
def probe(digit_tasks):
    return torch.cat([digit_tasks[t][2][:40] for t in range(NUM_TASKS)])


# -- forget_task with hat-cl's arguments -----------------------------------------------------------------
def test_forget_task_names_entries_as_hat_cl_does_and_counts_them(digit_tasks):
    model = converted_cnn(digit_tasks, tasks=2)
    result = forget_task(model, 0, dry_run=True)
    assert all(k.startswith("Sequential.") for k in result)
    assert set(forget_task(model, 0, dry_run=True, module_name="net")) == {"net." + k[len("Sequential."):]
                                                                           for k in result}
    weights = [v for k, v in result.items() if k.endswith(".weight")]
    assert result.get_num_forgotten("weight") == (sum(int(v.sum()) for v in weights), sum(v.numel() for v in weights))
    conv = result["Sequential.0.weight"]
    assert result.get_num_forgotten("Sequential.0.weight") == (int(conv.sum()), conv.numel())
    with pytest.raises(KeyError, match="no entry of this ForgetResult is named 'gamma'"):
        result.get_num_forgotten("gamma")


def test_locked_task_ids_keeps_only_the_locked_tasks_intact(digit_tasks, probe):
    model = converted_cnn(digit_tasks)
    before = {k: logits(model, probe, k) for k in range(NUM_TASKS)}
    default = forget_task(model, 0, dry_run=True)
    result = forget_task(model, 0, locked_task_ids=[2])
    assert torch.equal(logits(model, probe, 2), before[2])
    assert hat.trained_tasks(model) == [1, 2]  # task 1 is not forgotten, only no longer kept intact
    # unlocking task 1 releases the units it shared with task 0 too: a bias entry per unit
    biases = [f"Sequential.{i}.bias" for i in (0, 3, 8)]
    assert all((default[k] <= result[k]).all() for k in biases)
    assert sum(int(result[k].sum()) for k in biases) > sum(int(default[k].sum()) for k in biases)


@pytest.mark.parametrize("locked, error, match", [
    ([0, 2], HATValueError, r"locked_task_ids must not hold the task being forgotten; got locked_task_ids=\[0, 2\] "
                            r"with task_id=0"),
    ([1, 5], TaskIndexError, r"an entry of locked_task_ids must be an int in \[0, 3\); got 5"),
    ("1", HATTypeError, r"locked_task_ids must be a list of trained task ids or None; got '1'"),
    (1, HATTypeError, r"locked_task_ids must be a list of trained task ids or None; got 1"),
])
def test_bad_locked_task_ids_are_refused_and_change_nothing(digit_tasks, locked, error, match):
    model = converted_cnn(digit_tasks)
    state = snapshot(model)
    with pytest.raises(error, match=match):
        forget_task(model, 0, locked_task_ids=locked)
    assert same_state(model, state)


def test_an_untrained_locked_task_is_refused(digit_tasks):
    model = converted_cnn(digit_tasks, tasks=2)
    state = snapshot(model)
    with pytest.raises(HATValueError, match=r"an entry of locked_task_ids must be one of the trained tasks \[0, 1\]; "
                                            r"got 2, which has not been trained"):
        forget_task(model, 0, locked_task_ids=[2])
    with pytest.raises(HATTypeError, match=r"module_name must be a str or None; got 3"):
        forget_task(model, 0, module_name=3)
    assert same_state(model, state)


def test_a_task_sharing_every_unit_with_another_releases_nothing_and_warns(digit_tasks, probe):
    """Task 1 is given task 0's masks (embeddings copied, flagged trained): every entry it could own is task 0's."""
    model = converted_cnn(digit_tasks, tasks=1)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "task_embedding"):
                m.task_embedding[1] = m.task_embedding[0]
    hat.mark_trained(model, 1)
    before = logits(model, probe, 0)
    with pytest.warns(NoParameterToForgetWarning, match="task 1 of Sequential released no weight or bias entry"):
        result = forget_task(model, 1)
    assert result.get_num_forgotten("task_embedding")[0] > 0
    assert torch.equal(logits(model, probe, 0), before) and hat.trained_tasks(model) == [0]


# -- prune_hat_module -----------------------------------------------------------------------------------------
def test_prune_hat_module_keeps_one_task_in_a_copy_and_frees_the_rest(digit_tasks, probe):
    model = converted_cnn(digit_tasks)
    before = logits(model, probe, 1)
    state = snapshot(model)
    pruned, result = prune_hat_module(model, 1)
    assert pruned is not model and same_state(model, state) and hat.trained_tasks(model) == [0, 1, 2]
    assert hat.trained_tasks(pruned) == [1]
    assert torch.equal(logits(pruned, probe, 1), before)
    layers = {n: m for n, m in pruned.named_modules() if hasattr(m, "task_embedding")}
    for layer in hat.capacity(pruned):
        assert layer.free == int((layers[layer.name].task_embedding[1] <= 0).sum())
    assert all(k.startswith("Sequential.") for k in result)
    embedding = result["Sequential.0.task_embedding"]
    assert embedding[[0, 2]].all() and not embedding[1].any()
    assert result.get_num_forgotten("weight")[0] > 0


def test_prune_hat_module_refuses_bad_input(digit_tasks):
    model = converted_cnn(digit_tasks, tasks=2)
    state = snapshot(model)
    with pytest.raises(HATValueError, match=r"task_id must be one of the trained tasks \[0, 1\]; got 2"):
        prune_hat_module(model, 2)
    with pytest.raises(TaskIndexError, match=r"task_id must be an int in \[0, 3\); got 4"):
        prune_hat_module(model, 4)
    with pytest.raises(HATValueError, match=r"Linear has no HAT or task-indexed module"):
        prune_hat_module(nn.Linear(3, 2), 0)
    with pytest.raises(HATTypeError, match=r"module must be a torch\.nn\.Module; got str"):
        prune_hat_module("model", 0)
    assert same_state(model, state)


# -- get_hat_util ---------------------------------------------------------------------------------------------
def _expected_util(model, tasks):
    return {f"{n}.masker": {t: (int((m.task_embedding[t] > 0).sum()), m.task_embedding.shape[1]) for t in tasks}
            for n, m in model.named_modules() if hasattr(m, "task_embedding")}


@pytest.mark.skipif(importlib.util.find_spec("pandas") is not None, reason="pandas is installed: the frame is returned")
def test_get_hat_util_without_pandas_is_a_dict_of_layers_and_tasks(digit_tasks):
    model = converted_cnn(digit_tasks, tasks=2)
    util = get_hat_util(model)
    assert util == _expected_util(model, [0, 1])
    assert list(util) == ["0.masker", "3.masker", "8.masker"]  # the HAT layers in model order
    assert get_hat_util(model, task_ids=1) == _expected_util(model, [1])
    assert get_hat_util(model, task_ids=[1, 0]) == _expected_util(model, [1, 0])
    assert get_hat_util(model, task_ids=torch.tensor(0)) == _expected_util(model, [0])
    assert all(0 < used < units for cells in util.values() for used, units in cells.values())


def test_get_hat_util_as_a_pandas_frame(digit_tasks):
    pandas = pytest.importorskip("pandas")
    model = converted_cnn(digit_tasks, tasks=2)
    frame = get_hat_util(model)
    assert isinstance(frame, pandas.DataFrame)
    assert frame.to_dict(orient="index") == _expected_util(model, [0, 1])


@pytest.mark.parametrize("task_ids, error, match", [
    (2, HATValueError, r"task_ids must be one of the trained tasks \[0, 1\]; got 2, which has not been trained"),
    ([0, 3], TaskIndexError, r"task_ids must be an int in \[0, 3\); got 3"),
    ("0", HATTypeError, r"task_ids must be a task id, a list of task ids or None; got '0'"),
    (0.5, HATTypeError, r"task_ids must be a task id, a list of task ids or None; got 0\.5"),
])
def test_get_hat_util_refuses_bad_task_ids(digit_tasks, task_ids, error, match):
    model = converted_cnn(digit_tasks, tasks=2)
    with pytest.raises(error, match=match):
        get_hat_util(model, task_ids=task_ids)


# -- load_from_base_module(_state_dict) -----------------------------------------------------------------------
def _with_statistics(plain, x):
    """A plain model whose BatchNorms have seen data (running statistics as a trained model has them)."""
    plain.train()
    with torch.no_grad():
        plain(x)
    return plain.eval()


def test_plain_weights_load_into_every_task_row_of_a_converted_model(digit_tasks, probe):
    torch.manual_seed(0)
    plain = _with_statistics(sequential_cnn(), digit_tasks[0][0])
    model = hat.convert(sequential_cnn(), HATConfig(num_tasks=NUM_TASKS))
    embeddings = model[0].task_embedding.detach().clone()
    load_from_base_module(model, plain)
    assert torch.equal(training.predict(model, probe, None, forward="set_task"), plain(probe))
    for key, value in plain.state_dict().items():  # a per-task tensor holds the plain value in every row
        own = model.state_dict()[key]
        assert torch.equal(own, value) or all(torch.equal(row, value) for row in own)
    assert torch.equal(model[0].task_embedding, embeddings)  # what a plain model has not stays


def test_timm_resnet18_weights_load_into_hat_resnet18(digit_tasks):
    torch.manual_seed(0)
    x = nn.functional.interpolate(digit_tasks[0][0][:4], size=32).expand(-1, 3, -1, -1)
    plain = _with_statistics(timm.create_model("resnet18", num_classes=2), x)
    model = timm.create_model("hat_resnet18", hat_config=HATConfig(num_tasks=2), num_classes=2)
    got = load_from_base_module_state_dict(model, plain.state_dict())
    assert got.missing_keys == [] and got.unexpected_keys == []
    model.eval()
    with torch.no_grad(), hat.task(model, None):
        assert torch.allclose(model(x), plain(x), atol=1e-6, rtol=1e-5)
    assert torch.equal(model.bn1.running_mean[1], plain.bn1.running_mean)


@pytest.mark.parametrize("change, match", [
    (lambda sd: sd.update(extra=torch.zeros(1)), r"unexpected extra"),
    (lambda sd: sd.pop("3.weight"), r"missing 3\.weight"),
    (lambda sd: sd.update({"0.weight": torch.zeros(16, 1, 5, 5)}), r"shape 0\.weight \(16, 1, 5, 5\)"),
])
def test_a_state_dict_of_another_architecture_is_refused_and_loads_nothing(change, match):
    torch.manual_seed(0)
    state_dict = sequential_cnn().state_dict()
    change(state_dict)
    model = hat.convert(sequential_cnn(), HATConfig(num_tasks=NUM_TASKS))
    before = snapshot(model)
    with pytest.raises(HATValueError, match=match):
        load_from_base_module_state_dict(model, state_dict)
    assert same_state(model, before)


def test_strict_false_loads_what_fits():
    torch.manual_seed(0)
    plain = sequential_cnn()
    state_dict = plain.state_dict()
    state_dict.pop("3.weight")
    state_dict["extra"] = torch.zeros(1)
    model = hat.convert(sequential_cnn(), HATConfig(num_tasks=NUM_TASKS))
    got = load_from_base_module_state_dict(model, state_dict, strict=False)
    assert got.missing_keys == ["3.weight"] and got.unexpected_keys == ["extra"]
    assert torch.equal(model[0].weight, plain[0].weight) and not torch.equal(model[3].weight, plain[3].weight)
    with pytest.raises(HATTypeError, match=r"base_module must be a torch\.nn\.Module; got OrderedDict"):
        load_from_base_module(model, state_dict)


# -- forward_hat_payload --------------------------------------------------------------------------------------
def _layer(in_features=64, units=16):
    """A HAT layer in evaluation (hard masks)."""
    return HATLinear(in_features, units, HATConfig(num_tasks=2)).eval()


def test_forward_hat_payload_calls_hat_modules_and_walks_sequentials(digit_tasks):
    x = digit_tasks[0][0][:8].flatten(1)
    torch.manual_seed(0)
    first, second = _layer(), _layer(16, 4)
    payload = HATPayload(x, task_id=1)
    assert torch.equal(forward_hat_payload(first, payload).data, first(payload).data)
    chained = forward_hat_payload(nn.Sequential(first, nn.ReLU(), second), payload)
    assert torch.equal(chained.data, second(first(payload).forward_by(nn.ReLU())).data)
    assert chained.task_id == 1


def test_use_masked_data_false_applies_the_mask_after_the_module(digit_tasks):
    x = digit_tasks[0][0][:8].flatten(1)
    torch.manual_seed(0)
    layer, norm = _layer(), nn.LayerNorm(16)
    out = layer(HATPayload(x, task_id=0))
    mask = (layer.task_embedding[0] > 0).float()
    assert 0 < mask.sum() < 16
    after = forward_hat_payload(norm, out, use_masked_data=False).data
    assert torch.equal(after, norm(nn.functional.linear(x, layer.weight, layer.bias)) * mask)
    assert (after[:, mask == 0] == 0).all()
    before = forward_hat_payload(norm, out).data  # the default: the module reads the masked data
    assert torch.equal(before, norm(out.data)) and not torch.equal(before, after)


def test_forward_hat_payload_refuses_bad_input(digit_tasks):
    torch.manual_seed(0)
    out = _layer()(HATPayload(digit_tasks[0][0][:8].flatten(1), task_id=0))
    with pytest.raises(HATTypeError, match=r"hat_payload must be a hat\.HATPayload; got Tensor"):
        forward_hat_payload(nn.ReLU(), out.data)
    with pytest.raises(HATTypeError, match=r"use_masked_data must be True or False; got 'no'"):
        forward_hat_payload(nn.ReLU(), out, use_masked_data="no")
    with pytest.raises(HATValueError, match=r"use_masked_data=False applies the mask after Linear, but its output "
                                            r"\(8, 3\) no longer has the 16 units"):
        forward_hat_payload(nn.Linear(16, 3), out, use_masked_data=False)


# -- TaskIndexedParameter -------------------------------------------------------------------------------------
class _ShiftNet(nn.Module):
    """A HAT layer, then a learned shift per task (a TaskIndexedParameter, as hat-cl's ViT tokens), a head."""

    def __init__(self, num_tasks):
        super().__init__()
        config = HATConfig(num_tasks=num_tasks)
        self.fc = HATLinear(64, 32, config)
        self.shift = TaskIndexedParameter(num_tasks, torch.zeros(32))
        self.head = TaskIndexedLinear(num_tasks, 32, 2)

    def forward(self, p):
        p = self.fc(p.forward_by(nn.Flatten()))
        x = torch.relu(p.data + self.shift[p.task_id])
        return self.head(HATPayload(x, task_id=p.task_id, mask_scale=p.mask_scale))


def test_task_indexed_parameter_rows_train_per_task_and_earlier_rows_stay_bit_identical(digit_tasks, probe):
    torch.manual_seed(0)
    model = _ShiftNet(NUM_TASKS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    training.train_task(model, optimizer, digit_tasks[0][:2], 0, epochs=3)
    before, row = training.predict(model, probe, 0), model.shift.weight[0].detach().clone()
    training.train_task(model, optimizer, digit_tasks[1][:2], 1, epochs=3)
    assert torch.equal(training.predict(model, probe, 0), before)
    assert torch.equal(model.shift.weight[0], row) and not torch.equal(model.shift.weight[1], row)
    assert model.shift.hat_trained.tolist() == [True, True, False]
    assert training.evaluate(model, digit_tasks[1][2:], 1) >= 0.9
    hat_forget_task(model, 1)
    assert torch.equal(model.shift.weight[1], torch.zeros(32)) and torch.equal(model.shift.weight[0], row)


def test_task_indexed_parameter_indexes_like_hat_cl_list_with_rows_of_their_own():
    data = torch.randn(1, 3, 4)
    p = TaskIndexedParameter(num_tasks=3, data=data)
    assert len(p) == 3 and p.weight.shape == (4, 1, 3, 4) and p.num_tasks == 3
    assert all(torch.equal(row, data) for row in p) and torch.equal(p[None], data)
    assert torch.equal(p[HATPayload(torch.zeros(2, 1), task_id=2)], p[2])
    assert len({p[t].data_ptr() for t in range(3)}) == 3  # hat-cl's rows shared one tensor
    for row in p:  # hat-cl's ViT initialised each task's token so
        nn.init.trunc_normal_(row, std=0.02)
    assert not torch.equal(p[0], p[1]) and torch.equal(p[None], data)
    base = p.to_base_module(task_id=1)
    assert isinstance(base, nn.Parameter) and torch.equal(base, p[1]) and base.data_ptr() != p[1].data_ptr()
    hat.set_task(p, 2)
    assert torch.equal(p(), p[2])


def test_task_indexed_parameter_loads_hat_cl_state_dicts():
    holder = nn.Module()
    holder.token = TaskIndexedParameter(2, torch.zeros(1, 1, 4))
    saved = {"token.0": torch.full((1, 1, 4), 1.0), "token.1": torch.full((1, 1, 4), 2.0)}
    holder.load_state_dict(saved)
    assert torch.equal(holder.token[0], saved["token.0"]) and torch.equal(holder.token[1], saved["token.1"])
    assert torch.equal(holder.token[None], torch.zeros(1, 1, 4))  # hat-cl had no no-task row: it keeps its value
    holder.load_state_dict(holder.state_dict())  # and its own keys


def test_task_indexed_parameter_refuses_bad_input():
    p = TaskIndexedParameter(2, torch.zeros(3))
    with pytest.raises(TaskIndexError, match=r"task_id must be an int in \[0, 2\); got 2"):
        p[2]
    with pytest.raises(HATTypeError, match=r"got per-sample ids"):
        p[torch.tensor([0, 1])]
    with pytest.raises(HATTypeError, match=r"data must be a torch\.Tensor or None; got list"):
        TaskIndexedParameter(2, [1.0])
    with pytest.raises(HATValueError, match=r"num_tasks must be a positive int; got 0"):
        TaskIndexedParameter(0, torch.zeros(3))


# -- ForgetResult ---------------------------------------------------------------------------------------------
def test_forget_results_add_up_and_check_their_entries():
    a = ForgetResult(**{"fc.weight": torch.tensor([True, False, False]), "fc.bias": torch.tensor([False])})
    b = ForgetResult({"fc.weight": torch.tensor([False, False, True]), "conv.weight": torch.tensor([True, True])})
    total = a + b
    assert set(total) == {"fc.weight", "fc.bias", "conv.weight"}
    assert total["fc.weight"].tolist() == [True, False, True] and a["fc.weight"].tolist() == [True, False, False]
    assert total.get_num_forgotten("weight") == (4, 5) and total.get_num_forgotten("fc.bias") == (0, 1)
    assert repr(total) == "ForgetResult(\n  conv.weight: 2/2\n  fc.bias: 0/1\n  fc.weight: 2/3\n)"
    with pytest.raises(HATTypeError, match=r"ForgetResult\['w'\] must be a bool tensor \(True: reset\); got a "
                                           r"torch\.float32 tensor"):
        ForgetResult(w=torch.zeros(2))
    with pytest.raises(HATValueError, match=r"cannot add ForgetResults: fc\.bias has shape \(1,\) in one and \(2,\)"):
        a + ForgetResult({"fc.bias": torch.tensor([True, True])})
    assert HATConfigOfTypes is HATConfig  # hat-cl's users import it from hat.types_


HAT_CL_NAMES = {
    "hat": ["HATConfig", "HATPayload", "TaskIndexedParameter", "modules", "utils", "types_"],
    "hat.modules": ["HATLinear", "HATConv1d", "HATConv2d", "HATConv3d", "HATMasker", "TaskIndexedBatchNorm1d",
                    "TaskIndexedBatchNorm2d", "TaskIndexedBatchNorm3d", "TaskIndexedLayerNorm"],
    "hat.utils": ["convert_to_base_module", "convert_to_task_dependent_module", "forget_task", "forward_hat_payload",
                  "get_hat_util", "prune_hat_module", "get_hat_reg_term", "get_hat_mask_scale",
                  "load_from_base_module", "load_from_base_module_state_dict"],
    "hat.types_": ["ForgetResult", "HATConfig", "Mask"],
    "hat.payload": ["HATPayload"],
    "hat.parameter": ["TaskIndexedParameter"],
    "hat.constants": ["DEF_HAT_MAX_TRN_MASK_SCALE", "DEF_HAT_INIT_STRAT", "DEF_HAT_GRAD_COMP_CLAMP",
                      "DEF_HAT_GRAD_COMP_FACTOR", "DEF_HAT_ATTN_CLAMP", "DEF_HAT_TRN_MASK_SCALE_STRAT"],
    "hat.exceptions": ["HATInitializationError", "MaskerLockedError", "MaskDimensionMismatchError",
                       "ModuleConversionWarning", "LearningSuppressedWarning", "MaskDimensionInferenceWarning",
                       "NoParameterToForgetWarning", "InsufficientMaskWarning"],
}


@pytest.mark.parametrize("module", sorted(HAT_CL_NAMES))
def test_hat_cl_public_names_import(module):
    import importlib

    imported = importlib.import_module(module)
    assert [n for n in HAT_CL_NAMES[module] if not hasattr(imported, n)] == []


def test_hat_cl_constants_are_the_config_defaults():
    from hat import HATConfig, constants

    cfg = HATConfig(num_tasks=1)
    assert (cfg.max_trn_mask_scale, cfg.init_strat, cfg.grad_comp_clamp, cfg.grad_comp_factor, cfg.attn_clamp) == (
        constants.DEF_HAT_MAX_TRN_MASK_SCALE, constants.DEF_HAT_INIT_STRAT, constants.DEF_HAT_GRAD_COMP_CLAMP,
        constants.DEF_HAT_GRAD_COMP_FACTOR, constants.DEF_HAT_ATTN_CLAMP)
