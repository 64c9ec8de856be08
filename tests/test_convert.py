"""hat.convert / set_task / task / unconvert on unmodified plain models, on the digits data."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hat
from hat import HATConfig, HATPayload, training
from hat.modules import (
    HATConv2d,
    HATLinear,
    TaskIndexedBatchNorm2d,
    TaskIndexedLayerNorm,
    TaskIndexedLinear,
)
from hat.utils import convert_to_base_module, convert_to_task_dependent_module

from convert_models import SmallResNet, sequential_cnn

NUM_TASKS = 3

OPTIMIZERS = {
    "adamw-wd": lambda params: torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01),
    "sgd-momentum-wd": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-3),
}

MODELS = {
    # the nn.Sequential's last Linear becomes the task-indexed head (classifier="auto")
    "sequential": (lambda: sequential_cnn(), lambda m, x, t: m(x)),
    # one plain head per task in a ModuleList: left plain, each trained by its task only
    "resnet": (lambda: SmallResNet(NUM_TASKS), lambda m, x, t: m(x, t)),
}


def train_task(model, optimizer, x, y, t, forward, *, epochs=4, batch_size=32, s_max=100.0, reg=0.75, set_to_none=True):
    """hat.training's loop, the task set on the model before each batch, batches shuffled by a generator seeded
    with ``t``."""
    training.train_task(model, optimizer, (x, y), t, epochs=epochs, batch_size=batch_size,
                        generator=torch.Generator().manual_seed(t), forward=_with_task(forward), max_scale=s_max,
                        reg_strength=reg, set_to_none=set_to_none)


def eval_logits(model, x, t, forward):
    return training.predict(model, x, t, forward=_with_task(forward))


def _with_task(forward):
    """hat.training's ``forward`` for a model's own call ``forward(model, x, t)``: training sets the task
    (``hat.set_task``), evaluation runs inside ``hat.task``."""
    def call(model, x, t, mask_scale):
        if mask_scale is None:
            with hat.task(model, t):
                return forward(model, x, t)
        hat.set_task(model, t, mask_scale=mask_scale)
        return forward(model, x, t)

    return call


# -- the central promise on converted models -------------------------------------------------
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_converted_models_keep_earlier_tasks_bit_identical(digit_tasks, model_name, opt_name):
    make, forward = MODELS[model_name]
    torch.manual_seed(0)
    model = hat.convert(make(), HATConfig(num_tasks=NUM_TASKS))
    optimizer = OPTIMIZERS[opt_name](model.parameters())  # one optimizer for the whole sequence
    x_probe = torch.cat([digit_tasks[t][2] for t in range(NUM_TASKS)])
    recorded = {}
    for t in range(NUM_TASKS):
        x_tr, y_tr, x_te, y_te = digit_tasks[t]
        train_task(model, optimizer, x_tr, y_tr, t, forward)
        acc = (eval_logits(model, x_te, t, forward).argmax(1) == y_te).float().mean().item()
        assert acc >= 0.9, f"task {t} reached only {acc:.3f}"
        recorded[t] = eval_logits(model, x_probe, t, forward)
        for k in range(t):
            assert torch.equal(eval_logits(model, x_probe, k, forward),
                               recorded[k]), f"task {k} changed while {t} trained"


def test_plain_per_task_heads_train_without_warnings(digit_tasks):
    """Own plain heads: each is trained by its task only, nothing is blocked, nothing warns."""
    make, forward = MODELS["resnet"]
    torch.manual_seed(0)
    model = hat.convert(make(), HATConfig(num_tasks=NUM_TASKS))
    optimizer = OPTIMIZERS["adamw-wd"](model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # zeroed gradients, not None: AdamW then decays and moves every head, task 0's too, unless protected
        train_task(model, optimizer, digit_tasks[0][0][:64], digit_tasks[0][1][:64], 0, forward, epochs=1,
                   set_to_none=False)
        heads = {name: p.detach().clone() for name, p in model.heads.named_parameters()}
        train_task(model, optimizer, digit_tasks[1][0][:64], digit_tasks[1][1][:64], 1, forward, epochs=1,
                   set_to_none=False)
    for name, p in model.heads.named_parameters():
        if name.startswith("0."):  # task 0's head: AdamW's weight decay and moments must not move it
            assert torch.equal(p, heads[name]), name
        elif name.startswith("1."):  # task 1's head trained
            assert not torch.equal(p, heads[name]), name


def test_a_shared_plain_layer_trained_again_warns_once(digit_tasks):
    model = hat.convert(sequential_cnn(), HATConfig(num_tasks=NUM_TASKS), exclude=["8"])  # fc stays plain
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    forward = MODELS["sequential"][1]
    x, y = digit_tasks[0][0][:64], digit_tasks[0][1][:64]
    train_task(model, optimizer, x, y, 0, forward, epochs=1)
    with pytest.warns(UserWarning, match=r"plain \(non-HAT\) parameter\(s\) of shape \(64, 512\)"):
        train_task(model, optimizer, x, y, 1, forward, epochs=1)


# -- what convert swaps and keeps ----------------------------------------------------------------
def test_conversion_swaps_exact_types_in_place_and_keeps_every_weight():
    torch.manual_seed(0)
    model = SmallResNet(NUM_TASKS)
    model.bn.running_mean.uniform_(-1, 1)  # statistics as a pretrained model has them
    model.bn.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stem_weight = model.stem.weight
    out = hat.convert(model, HATConfig(num_tasks=NUM_TASKS))
    assert out is model
    assert type(model.stem) is HATConv2d and model.stem.weight is stem_weight  # the same Parameter
    assert type(model.bn) is TaskIndexedBatchNorm2d and type(model.norm) is TaskIndexedLayerNorm
    assert type(model.fc) is HATLinear and all(type(h) is nn.Linear for h in model.heads)
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith(("stem.weight", "conv1.weight", "conv2.weight", "down.weight", "fc.weight", "fc.bias")) or \
                key.startswith("heads."):
            assert torch.equal(after[key], value), key
        else:  # task-indexed: every slot, the no-task slot included, starts from the plain values
            assert after[key].shape[0] == NUM_TASKS + 1, key
            assert torch.equal(after[key], value.expand_as(after[key])), key


def test_conversion_leaves_subclasses_and_attention_projections_alone():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 8), MyLinear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True),
                          nn.Linear(8, 2))
    hat.convert(model, HATConfig(num_tasks=2))
    assert type(model[0]) is HATLinear and type(model[3]) is TaskIndexedLinear
    assert type(model[1]) is MyLinear
    assert type(model[2].out_proj) is not HATLinear


def test_classifier_auto_and_explicit(digit_tasks):
    cfg = HATConfig(num_tasks=NUM_TASKS)
    auto = hat.convert(sequential_cnn(), cfg)
    assert type(auto[10]) is TaskIndexedLinear and type(auto[8]) is HATLinear
    named = hat.convert(sequential_cnn(), cfg, classifier="8")
    assert type(named[8]) is TaskIndexedLinear and type(named[10]) is HATLinear
    untouched = hat.convert(sequential_cnn(), cfg, classifier=None)
    assert type(untouched[10]) is nn.Linear
    plain = sequential_cnn()
    head = hat.convert(copy.deepcopy(plain), cfg)[10]
    for slot in range(NUM_TASKS + 1):  # every head starts from the plain classifier
        assert torch.equal(head.weight[slot], plain[10].weight)


def test_include_and_exclude_patterns():
    cfg = HATConfig(num_tasks=2)
    by_regex = hat.convert(SmallResNet(2), cfg, include=r"block1\..*")
    assert type(by_regex.block1.conv1) is HATConv2d and type(by_regex.stem) is nn.Conv2d
    by_suffix = hat.convert(SmallResNet(2), cfg, exclude=["conv2", "norm"])
    assert type(by_suffix.block1.conv2) is nn.Conv2d and type(by_suffix.block2.conv2) is nn.Conv2d
    assert type(by_suffix.norm) is nn.LayerNorm and type(by_suffix.block1.conv1) is HATConv2d


def test_mapping_extends_and_drops():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    hat.convert(model, HATConfig(num_tasks=2), mapping={MyLinear: HATLinear, nn.Linear: None}, classifier=None)
    # the classifier found is the last exact nn.Linear; None keeps it, the mapping drops nn.Linear
    # a subclass converts to a class deriving from both: HAT's bookkeeping, the subclass's forward
    assert isinstance(model[0], HATLinear) and isinstance(model[0], MyLinear)
    assert type(model[2]) is nn.Linear and type(model[3]) is nn.Linear


# -- bad input: clear errors, the model untouched ---------------------------------------------------
def _types(model):
    return [type(m) for m in model.modules()]


def test_nothing_matches_lists_the_types_found():
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    with pytest.raises(hat.HATValueError, match=r"include=None, exclude=None.*ReLU x1.*Tanh x1"):
        hat.convert(model, HATConfig(num_tasks=2))
    model = sequential_cnn()
    kinds = _types(model)
    with pytest.raises(ValueError, match=r"include='nothing.\*'"):
        hat.convert(model, HATConfig(num_tasks=2), include="nothing.*")
    assert _types(model) == kinds


def test_exclude_that_excludes_nothing_warns():
    with pytest.warns(UserWarning, match="excluded no module"):
        hat.convert(sequential_cnn(), HATConfig(num_tasks=2), exclude=["not_there"])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(include=5), TypeError, "include must be"),
    (dict(exclude="(unclosed"), ValueError, "not a valid regular expression"),
    (dict(mapping={nn.Linear: nn.Linear}), TypeError, "from_base_module"),
    (dict(mapping={"Linear": HATLinear}), TypeError, "not an nn.Module subclass"),
    (dict(classifier="missing"), ValueError, "classifier='missing' names no module"),
    (dict(classifier="1"), TypeError, "only an nn.Linear"),
])
def test_bad_arguments_change_nothing(kwargs, error, match):
    model = sequential_cnn()
    kinds = _types(model)
    with pytest.raises(error, match=match):
        hat.convert(model, HATConfig(num_tasks=2), **kwargs)
    assert _types(model) == kinds


def test_bad_config_and_wrapped_or_converted_models():
    with pytest.raises(TypeError, match=r"hat_config must be a hat\.HATConfig"):
        hat.convert(sequential_cnn(), {"num_tasks": 2})
    model = hat.convert(sequential_cnn(), HATConfig(num_tasks=2))
    with pytest.raises(ValueError, match="already has HAT"):
        hat.convert(model, HATConfig(num_tasks=2))
    with pytest.raises(TypeError, match=r"torch\.compile"):
        hat.convert(torch.compile(sequential_cnn()), HATConfig(num_tasks=2))
    with pytest.raises(TypeError, match="DataParallel"):
        hat.convert(nn.DataParallel(sequential_cnn()), HATConfig(num_tasks=2))


def test_shared_batchnorm_subclass_is_an_error_when_training_unless_mapped(digit_tasks):
    class MyBN(nn.BatchNorm2d):
        pass

    x = digit_tasks[0][0][:8]
    model = hat.convert(nn.Sequential(nn.Conv2d(1, 4, 3), MyBN(4), nn.Flatten(), nn.Linear(144, 2)),
                        HATConfig(num_tasks=2))
    hat.set_task(model, 0, mask_scale=10.0)
    with pytest.raises(TypeError, match=r"shared by every task.*\b1\b"):
        model(x)
    model.eval()
    model(x)  # evaluation does not touch running statistics
    mapped = hat.convert(nn.Sequential(nn.Conv2d(1, 4, 3), MyBN(4), nn.Flatten(), nn.Linear(144, 2)),
                         HATConfig(num_tasks=2), mapping={MyBN: TaskIndexedBatchNorm2d})
    assert type(mapped[1]) is TaskIndexedBatchNorm2d
    hat.set_task(mapped, 0, mask_scale=10.0)
    mapped(x).sum().backward()


@pytest.mark.parametrize("task_id, error", [(3, IndexError), (-1, IndexError), (1.0, TypeError), ("0", TypeError),
                                            (True, TypeError)])
def test_set_task_rejects_bad_task_ids_and_changes_nothing(task_id, error):
    model = hat.convert(sequential_cnn(), HATConfig(num_tasks=3))
    hat.set_task(model, 1, mask_scale=5.0)
    with pytest.raises(error, match="task_id"):
        hat.set_task(model, task_id, mask_scale=5.0)
    assert all(m._hat_state == (1, 5.0) and int(m.hat_task) == 1 for m in hat.tracking.tracked.task_modules(model))


def test_set_task_bad_scale_and_plain_model():
    model = hat.convert(sequential_cnn(), HATConfig(num_tasks=3))
    with pytest.raises(ValueError, match="mask_scale"):
        hat.set_task(model, 0, mask_scale=-1.0)
    with pytest.raises(ValueError, match="no HAT or task-indexed layer"):
        hat.set_task(nn.Linear(2, 2), 0)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        hat.set_task("model", 0)


def test_task_context_restores_the_selection_even_on_error():
    model = hat.convert(sequential_cnn(), HATConfig(num_tasks=3))
    hat.set_task(model, 2, mask_scale=3.0)
    with pytest.raises(RuntimeError, match="boom"), hat.task(model, 0):
        assert all(m._hat_state == (0, None) for m in hat.tracking.tracked.task_modules(model))
        raise RuntimeError("boom")
    assert all(m._hat_state == (2, 3.0) and float(m.hat_scale) == 3.0 for m in hat.tracking.tracked.task_modules(model))


def test_training_forward_on_the_hard_mask_is_an_error(digit_tasks):
    model = hat.convert(sequential_cnn(), HATConfig(num_tasks=2))
    hat.set_task(model, 0)
    with pytest.raises(ValueError, match="mask scale"):
        model(digit_tasks[0][0][:4])
    with torch.no_grad():
        model(digit_tasks[0][0][:4])


# -- where masks land ------------------------------------------------------------------------------
def test_trace_finds_residual_unions_and_puts_masks_after_batchnorm(digit_tasks):
    model = hat.convert(SmallResNet(2), HATConfig(num_tasks=2))
    hat.set_task(model, 0, mask_scale=10.0)
    model(digit_tasks[0][0][:4], 0)  # the first call traces
    link = lambda m: set(map(id, m._hat_link.sources))  # noqa: E731
    assert link(model.block1.conv1) == {id(model.stem)}
    assert link(model.down) == {id(model.stem), id(model.block1.conv2)}  # x + y: the union
    assert link(model.fc) == {id(model.down), id(model.block2.conv2)}
    assert all(p.index is None for p in model.fc._hat_link.parts)  # each unit in place, no repeat
    assert model.stem._hat_link.dense_reason == "the model's input" and not model.stem._hat_link.sources
    # every conv leaves its mask to the BatchNorm right after it; the norm masks its output
    for conv, bn in [(model.stem, model.bn), (model.block1.conv2, model.block1.bn2), (model.down, model.down_bn)]:
        assert conv._hat_defer and bn._hat_unit_map.identity_of() is conv
    assert model.norm._hat_unit_map.identity_of() is model.fc and not model.fc._hat_defer


def test_trace_repeats_channel_masks_over_a_channel_major_flatten(digit_tasks):
    model = hat.convert(sequential_cnn(), HATConfig(num_tasks=2))
    with torch.no_grad():
        model(digit_tasks[0][0][:2])
    # conv -> BN -> ReLU -> MaxPool -> Flatten -> Linear: each of the 32 channels covers 4x4 inputs
    (part,) = model[8]._hat_link.parts
    assert part.source is model[3] and torch.equal(part.index, torch.arange(32).repeat_interleave(16))
    assert model[3]._hat_defer and model[4]._hat_unit_map.identity_of() is model[3]
    assert type(model[10]) is TaskIndexedLinear  # the head is not masked and needs no link


def test_units_a_task_does_not_use_leave_batchnorm_and_layernorm_as_exact_zeros(digit_tasks):
    torch.manual_seed(0)
    model = hat.convert(SmallResNet(2), HATConfig(num_tasks=2))
    outputs = {}
    for name in ("bn", "block1.bn2", "norm"):
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
    model.eval()
    with torch.no_grad(), hat.task(model, 1):
        model(digit_tasks[0][0][:8], 1)
    for name, src in [("bn", model.stem), ("block1.bn2", model.block1.conv2), ("norm", model.fc)]:
        assert model.get_submodule(name)._hat_unit_map.identity_of() is src
        off = src.get_mask(1) == 0
        assert off.any(), "the normal initialisation leaves some units off"
        dim = 1 if name != "norm" else -1
        assert torch.equal(outputs[name].index_select(dim, off.nonzero().flatten()).abs().sum(), torch.tensor(0.0))


def test_an_op_the_trace_cannot_follow_gets_whole_row_protection(digit_tasks):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 32)
            self.b = nn.Linear(32, 16)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            return self.head(F.relu(self.b(torch.sigmoid(self.a(x.flatten(1))))))  # sigmoid(0) = 0.5

    model = hat.convert(Odd(), HATConfig(num_tasks=2))
    hat.set_task(model, 0, mask_scale=10.0)
    with pytest.warns(UserWarning, match=r"1 protect whole rows .*\(b\).*hat.coverage"):
        model(digit_tasks[0][0][:4])
    assert model.b._hat_link.dense_reason == "`sigmoid` does not keep 0 at 0" and not model.b._hat_link.sources
    assert model.a._hat_link.dense_reason == "the model's input"
    report = {r.name: r for r in hat.coverage(model)}
    assert report["a"].protection == "unit" and report["b"].protection == "rows"
    assert "sigmoid" in report["b"].reason


def test_payloads_still_work_on_converted_layers(digit_tasks):
    model = hat.convert(sequential_cnn(), HATConfig(num_tasks=2))
    x = digit_tasks[0][0][:4]
    out = model[0](HATPayload(x, task_id=1, mask_scale=5.0))
    assert isinstance(out, HATPayload)
    torch.testing.assert_close(out.data,
                               model[0]._hat_base.forward(model[0], x) * model[0].get_mask(1, 5.0).view(1, -1, 1, 1))


# -- unconvert and hat-cl's helpers ------------------------------------------------------------------
@pytest.mark.parametrize("model_name", list(MODELS))
def test_unconvert_gives_plain_layers_with_the_same_outputs(digit_tasks, model_name):
    make, forward = MODELS[model_name]
    torch.manual_seed(0)
    model = hat.convert(make(), HATConfig(num_tasks=NUM_TASKS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for t in range(2):
        train_task(model, optimizer, digit_tasks[t][0][:96], digit_tasks[t][1][:96], t, forward, epochs=1)
    x = digit_tasks[0][2]
    for t in (0, 1, None):
        plain = hat.unconvert(model, t)
        assert not hat.tracking.tracked.task_modules(plain)
        assert all(type(m).__module__.startswith(("torch.", "convert_models")) for m in plain.modules())
        plain.eval()
        head = 0 if t is None else t  # the resnet's own heads: task None borrows head 0
        with torch.no_grad():
            got = forward(plain, x, head)
        expected = eval_logits(model, x, t, lambda m, x_, _t, head=head: forward(m, x_, head))
        assert torch.equal(got, expected)  # bit-identical: the same products, rows of zeros aside
    assert hat.tracking.tracked.task_modules(model)  # the HAT model itself is unchanged
    with pytest.raises(IndexError, match="task_id"):
        hat.unconvert(model, NUM_TASKS)


def test_hat_cl_conversion_helpers():
    from hat.exceptions import ModuleConversionWarning

    cfg = HATConfig(num_tasks=2)
    plain = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = convert_to_task_dependent_module(plain, hat_config=cfg)
    assert [type(m) for m in converted] == [HATLinear, hat.modules.TaskIndexedBatchNorm1d, HATLinear]
    assert type(plain[0]) is nn.Linear  # a copy, as in hat-cl
    with pytest.warns(ModuleConversionWarning, match="ReLU"):
        assert type(convert_to_task_dependent_module(nn.ReLU(), hat_config=cfg)) is nn.ReLU
    back = convert_to_base_module(converted, task_id=1)
    assert [type(m) for m in back] == [nn.Linear, nn.BatchNorm1d, nn.Linear]
    mask = converted[0].get_mask(1)
    assert torch.equal(back[0].weight, converted[0].weight * mask.view(-1, 1))


def test_a_broadcast_that_moves_the_unit_dimension_is_not_followed(digit_tasks):
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 16)
            self.b = nn.Linear(16, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = F.relu(self.a(x.flatten(1)))  # [N, 16], units along dim 1
            spread = h * torch.ones(3, *h.shape)  # [N, 16] * [3, N, 16]: the units move to dim 2
            return self.head(self.b(spread.sum(0)))

    model = hat.convert(Broadcast(), HATConfig(num_tasks=2))
    with torch.no_grad():
        model(digit_tasks[0][0][:2])
    # the product keeps a's zeros along dim 2, and the sum over dim 0 brings them back to dim 1
    (part,) = model.b._hat_link.parts
    assert part.source is model.a and part.index is None


def test_scaling_by_a_plain_parameter_keeps_the_units(digit_tasks):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 16)
            self.gamma = nn.Parameter(torch.ones(16))
            self.b = nn.Linear(16, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.b(F.relu(self.a(x.flatten(1))) * self.gamma))

    model = hat.convert(Scaled(), HATConfig(num_tasks=2))
    with torch.no_grad():
        model(digit_tasks[0][0][:2])
    assert model.b._hat_link.identity_of() is model.a


def test_frozen_embeddings_still_record_and_protect_tasks_when_batchnorm_applies_the_masks(digit_tasks):
    # a conv whose mask its BatchNorm applies reports its task through that mask; with frozen
    # embeddings the mask has no autograd node, and the report must still reach the step. Here
    # the conv/BN pairs are the only HAT modules (the head stays plain), so nothing else reports.
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2),
    )
    model = hat.convert(plain, HATConfig(num_tasks=2), classifier=None)
    model(digit_tasks[0][0][:2])  # trace
    convs = [m for m in model.modules() if isinstance(m, HATConv2d)]
    assert len(convs) == 2 and all(m._hat_defer for m in convs)
    for m in convs:
        m.task_embedding.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.01)
    forward = lambda m, x, t: m(x)  # noqa: E731
    x_probe = digit_tasks[0][2]
    train_task(model, optimizer, *digit_tasks[0][:2], 0, forward, epochs=1)
    assert hat.trained_tasks(model) == [0]
    assert all(bool(m.hat_trained[0]) for m in convs)
    before = eval_logits(model, x_probe, 0, forward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the shared plain head is frozen for task 1, with a warning
        train_task(model, optimizer, *digit_tasks[1][:2], 1, forward, epochs=1)
    assert hat.trained_tasks(model) == [0, 1]
    assert torch.equal(eval_logits(model, x_probe, 0, forward), before)


def test_a_transformer_encoder_layer_evaluates_under_no_grad_and_keeps_earlier_tasks(digit_tasks):
    """torch's fused inference kernel of nn.TransformerEncoderLayer cannot read task-indexed norms:
    a converted layer runs its own forward in evaluation too, and its plain copy the kernel again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(2), nn.Linear(8, 16), nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
                          nn.Flatten(), nn.Linear(8 * 16, 2))
    hat.convert(model, HATConfig(num_tasks=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    probe = digit_tasks[0][2][:32].squeeze(1)  # [N, 8 tokens, 8 features]
    for t in (0, 1):
        x, y = digit_tasks[t][:2]
        training.train_task(model, optimizer, (x.squeeze(1), y), t, epochs=2, batch_size=32, forward="set_task",
                            max_scale=100)
        if t == 0:
            with torch.no_grad():
                task_0 = training.predict(model, probe, 0, forward="set_task")
    with torch.no_grad():
        assert torch.equal(training.predict(model, probe, 0, forward="set_task"), task_0)
    plain = hat.unconvert(model, 0).eval()
    assert plain[2].activation_relu_or_gelu  # the fused kernel is back for the plain copy
    with torch.no_grad():
        assert torch.allclose(plain(probe), task_0, atol=1e-5)
