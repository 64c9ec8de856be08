"""BatchNorm running statistics describe the network that evaluation runs (hard masks).

The issue's case: a converted residual CNN with BatchNorm, SGD with momentum and weight decay,
about 11 batches per epoch, the mask scale annealed from 1/100 to 100 in every epoch. With
torch's running average the second task reached 100% in train mode and chance in eval mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import hat
from hat import HATConfig, HATPayload
from hat.modules import HATConv2d, TaskIndexedBatchNorm2d, TaskIndexedLinear
from hat.utils import get_hat_mask_scale, get_hat_reg_term

from convert_models import SmallResNet

NUM_TASKS = 5


def _train(model, optimizer, x, y, t, schedule, *, epochs=5, batch_size=24, seed=0):
    g = torch.Generator().manual_seed(seed + t)
    model.train()
    for _ in range(epochs):
        batches = torch.randperm(len(x), generator=g).split(batch_size)
        for b, idx in enumerate(batches):
            s = get_hat_mask_scale(schedule, 100.0, b / (len(batches) - 1))
            hat.set_task(model, t, mask_scale=s)
            loss = F.cross_entropy(model(x[idx], t), y[idx]) + 0.75 * get_hat_reg_term(model, task_id=t, mask_scale=s)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@torch.no_grad()
def _train_mode_accuracy(model, x, y, t):
    """Accuracy of the network training ran last: soft masks at s_max, batch statistics (on a
    copy, so that this forward leaves the model's statistics alone)."""
    twin = copy.deepcopy(model)
    twin.__dict__.pop("_hat_stats_pending", None)
    twin.train()
    hat.set_task(twin, t, mask_scale=100.0)
    return (twin(x, t).argmax(1) == y).float().mean().item()


@torch.no_grad()
def _eval_accuracy(model, x, y, t):
    model.eval()
    with hat.task(model, t):
        out = (model(x, t).argmax(1) == y).float().mean().item()
    model.train()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential"])
def test_eval_accuracy_matches_train_accuracy_on_every_task(digit_tasks, schedule):
    torch.manual_seed(0)
    model = hat.convert(SmallResNet(NUM_TASKS), HATConfig(num_tasks=NUM_TASKS))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    for t in range(NUM_TASKS):
        x, y = digit_tasks[t][0], digit_tasks[t][1]
        _train(model, optimizer, x, y, t, schedule)
        train_acc = _train_mode_accuracy(model, x, y, t)
        eval_acc = _eval_accuracy(model, x, y, t)
        # the task was learned (chance is 0.5): where five epochs end depends on the seed and on the
        # machine's CPU kernels (AVX2 and AVX-512 ones round differently and training drifts apart)
        assert train_acc >= 0.85, f"task {t} trained to only {train_acc:.3f}"
        assert eval_acc >= train_acc - 0.02, f"task {t}: eval {eval_acc:.3f} against train {train_acc:.3f}"


def _conv_bn(cfg):
    """conv -> task-indexed BN -> ReLU -> conv: the BN's input depends on the first conv's mask."""
    return hat.convert(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                     nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 2)), cfg)


def _bn(model):
    return next(m for m in model.modules() if isinstance(m, TaskIndexedBatchNorm2d))


def _conv_bn_without_refresh(cfg):
    """``_conv_bn`` with its BatchNorm's refresh turned off: the near-hard rule (rule 1) applies
    to its training batches, as to a hand-built payload model's."""
    model = _conv_bn(cfg)
    _bn(model).refresh_at_task_end = False
    return model


def _step(model, optimizer, x, y, task, scale):
    hat.set_task(model, task, mask_scale=scale)
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_a_near_hard_batch_replaces_the_row_and_a_soft_one_after_it_leaves_it(digit_tasks):
    torch.manual_seed(0)
    model = _conv_bn_without_refresh(HATConfig(num_tasks=2))
    x, y = digit_tasks[0][0][:32], digit_tasks[0][1][:32]
    model.train()
    bn = _bn(model)
    with torch.no_grad():  # the batch statistics the near-hard forward will see (no step in between)
        model.eval()
        with hat.task(model, 0):
            model(x)  # the first call traces where the masks go: the second conv leaves its mask to the BN
        model.train()
        hat.set_task(model, 0, mask_scale=400.0)
        conv_out = model[2](model[1](model[0](x)))
    _step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, 0, 400.0)  # lr 0: the weights stay
    assert torch.allclose(bn.running_mean[0], conv_out.mean((0, 2, 3)), atol=1e-6)  # replaced, not averaged in
    assert torch.allclose(bn.running_var[0], conv_out.var((0, 2, 3), unbiased=True), rtol=1e-5)
    kept = bn.running_mean.clone(), bn.running_var.clone()
    _step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, 0, 0.01)  # masks far from hard
    assert torch.equal(bn.running_mean, kept[0]) and torch.equal(bn.running_var, kept[1])
    assert torch.equal(bn.running_mean[1], torch.zeros(8))  # the other task's row is untouched


@pytest.mark.parametrize("scale", [0.01, 1.0, 7.5, 100.0, 400.0])
def test_the_deviation_a_training_forward_reports_is_the_masks_distance_from_hard_beyond_s_max(digit_tasks, scale):
    """``forward_deviation``: the mean over every unit of ``min(m, 1 - m)`` of the masks the layers
    took, minus the same at ``max_trn_mask_scale``; exactly 0 from there on."""
    from hat.masks.gate import flush
    from hat.masks.group import forward_deviation

    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=2)
    model = _conv_bn(cfg)
    x, y = digit_tasks[0][0][:32], digit_tasks[0][1][:32]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for s in (1.0, 50.0, 100.0):  # embeddings away from their initial values, some units on and some off
        _step(model, optimizer, x, y, 0, s)
    model.train()
    hat.set_task(model, 0, mask_scale=scale)
    model(x)
    got = forward_deviation(cfg, 0, scale)
    layers = [m for m in model.modules() if hasattr(m, "task_embedding")]
    e = torch.cat([m.task_embedding[0].detach() for m in layers])

    def far(k):
        m = flush(torch.sigmoid(k * e))
        return torch.minimum(m, 1 - m).mean().item()

    want = far(scale) - far(max(scale, cfg.max_trn_mask_scale))
    if scale >= cfg.max_trn_mask_scale:
        assert got == 0.0
    else:
        assert want > 1e-3 and abs(got - want) <= 2e-6, (got, want)


def test_soft_batches_count_by_torchs_rule_until_a_near_hard_one_comes(digit_tasks):
    torch.manual_seed(0)
    model = _conv_bn_without_refresh(HATConfig(num_tasks=2))
    x, y = digit_tasks[0][0][:32], digit_tasks[0][1][:32]
    model.train()
    bn = _bn(model)
    _step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, 0, 0.01)
    assert not torch.equal(bn.running_mean[0], torch.zeros(8))  # a first estimate, however rough
    assert int(bn.num_batches_tracked[0]) == 1


class _DeviceReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (``.item()``, ``float()``: a synchronization on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("refresh", [True, False])
def test_a_converted_models_training_batches_skip_the_near_hard_rule_and_its_device_read(digit_tasks, refresh):
    """The refresh replaces a finished task's rows, so a converted model's training batches count
    by torch's rule and nothing reads the masks' distance from hard ones (a synchronization per
    step on a GPU); with the refresh turned off, rule 1 and its one read per step come back."""
    torch.manual_seed(0)
    model = _conv_bn(HATConfig(num_tasks=2))
    bn = _bn(model)
    bn.refresh_at_task_end = refresh
    x, y = digit_tasks[0][0][:32], digit_tasks[0][1][:32]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model.train()
    _step(model, optimizer, x, y, 0, 400.0)  # near-hard masks (the first call also traces the model)
    near_hard = bn.running_mean[0].clone()
    with _DeviceReads() as reads:
        _step(model, optimizer, x, y, 0, 0.01)  # masks far from hard
    if refresh:
        assert reads.count == 0
        assert not torch.equal(bn.running_mean[0], near_hard)  # averaged in, as torch would
        assert int(bn.num_batches_tracked[0]) == 2
    else:
        assert reads.count == 1
        assert torch.equal(bn.running_mean[0], near_hard)  # rule 1: a softer batch leaves the row


def test_the_end_of_a_task_refreshes_its_rows_with_the_final_weights_and_nothing_else(digit_tasks):
    torch.manual_seed(0)
    model = _conv_bn(HATConfig(num_tasks=3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    bn = _bn(model)
    x0, y0 = digit_tasks[0][0][:64], digit_tasks[0][1][:64]
    x1, y1 = digit_tasks[1][0], digit_tasks[1][1]
    model.train()
    for i in range(3):
        _step(model, optimizer, x0[32 * (i % 2):32 * (i % 2) + 32], y0[32 * (i % 2):32 * (i % 2) + 32], 0, 100.0)
    for i in range(6):
        _step(model, optimizer, x1[32 * i:32 * i + 32], y1[32 * i:32 * i + 32], 1, 100.0)
    # the first forward of task 1's training ended task 0: its row was refreshed then
    row0 = bn.running_mean[0].clone(), bn.running_var[0].clone()
    before = bn.running_mean.clone(), bn.running_var.clone()
    expected = copy.deepcopy(model)  # task 1's statistics with the final weights, hard masks, kept inputs
    expected.__dict__.pop("_hat_stats_pending")
    with torch.no_grad(), hat.task(expected, 1):
        conv_out = expected[2](expected[1](expected[0](x1[:192])))
    rng = torch.get_rng_state()
    model.eval()
    with torch.no_grad(), hat.task(model, 1):
        model(x1[:8])  # the first call after training: refreshes task 1's rows first
    assert torch.equal(torch.get_rng_state(), rng)  # the user's random stream is untouched
    assert torch.allclose(bn.running_mean[1], conv_out.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var[1], conv_out.var((0, 2, 3)), rtol=1e-4)
    assert not torch.allclose(bn.running_mean[1], before[0][1], atol=1e-5)
    for slot in (0, 2, 3):  # earlier task, untrained task, no-task slot: bit-identical
        assert (torch.equal(bn.running_mean[slot], before[0][slot])
                and torch.equal(bn.running_var[slot], before[1][slot]))
    assert torch.equal(bn.running_mean[0], row0[0])
    refreshed = bn.running_mean.clone()
    with torch.no_grad(), hat.task(model, 1):  # once only
        model(x1[:8])
    assert torch.equal(bn.running_mean, refreshed)


def test_the_kept_inputs_stay_within_their_budget(digit_tasks):
    from hat.convert import statistics as _statistics

    torch.manual_seed(0)
    model = _conv_bn(HATConfig(num_tasks=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.cat([task[0] for task in digit_tasks])  # about 1250 images, all trained as task 0 here
    y = torch.cat([task[1] for task in digit_tasks])
    for i in range(0, len(x) - 100, 100):
        _step(model, optimizer, x[i:i + 100], y[i:i + 100], 0, 100.0)
    pending = model.__dict__["_hat_stats_pending"]
    kept = sum(b.size for b in pending.batches)
    assert _statistics.KEEP_SAMPLES <= kept < _statistics.KEEP_SAMPLES + 100
    # copies: a loop that refills one input tensor in place cannot change what is kept
    assert all(b.args[0].untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for b in pending.batches)


def _payload_net(cfg):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = HATConv2d(1, 8, 3, cfg, padding=1)
            self.conv2 = HATConv2d(8, 8, 3, cfg, padding=1)
            self.bn = TaskIndexedBatchNorm2d(2, 8)
            self.head = TaskIndexedLinear(2, 8 * 8 * 8, 2)

        def forward(self, p):
            p = self.conv1(p).forward_by(nn.ReLU())
            p = self.bn(self.conv2(p)).forward_by(nn.ReLU())
            return self.head(p.forward_by(nn.Flatten()))

    return Net()


def test_a_payload_model_hooked_by_set_task_gets_the_refresh_too(digit_tasks):
    torch.manual_seed(0)
    net = _payload_net(HATConfig(num_tasks=2))
    hat.set_task(net, None)  # hooks the model's calls
    x, y = digit_tasks[0][0][:64], digit_tasks[0][1][:64]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for scale in (1.0, 100.0, 100.0):
        loss = F.cross_entropy(net(HATPayload(x, task_id=0, mask_scale=scale)).data, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = net.bn.running_mean.clone()
    net.eval()
    with torch.no_grad():
        net(HATPayload(x[:4], task_id=0))
    assert "_hat_stats_pending" not in net.__dict__
    assert not torch.equal(net.bn.running_mean[0], trained[0]) and torch.equal(net.bn.running_mean[1:], trained[1:])


def test_a_payload_model_follows_the_training_rule(digit_tasks):
    """Hand-built payload models have no root call to hook: their rows come from the latest
    near-hard training batch."""
    cfg = HATConfig(num_tasks=2)
    torch.manual_seed(0)
    net = _payload_net(cfg)
    x, y = digit_tasks[0][0][:32], digit_tasks[0][1][:32]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    for scale in (400.0, 0.01):
        loss = F.cross_entropy(net(HATPayload(x, task_id=0, mask_scale=scale)).data, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scale == 400.0:
            kept = net.bn.running_mean[0].clone()
    assert torch.equal(net.bn.running_mean[0], kept)  # the soft batch did not move it


def test_the_clis_payload_cnn_refreshes_its_statistics_when_a_task_ends(digit_tasks):
    from hat.app.experiment import build_model, evaluate, train_task

    torch.manual_seed(0)
    model = build_model("cnn", num_tasks=2, classes_per_task=2, s_max=100.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y, x_te, y_te = digit_tasks[0]
    train_task(model, optimizer, (x, y), 0, 2, 32, 100.0, 0.75, torch.Generator().manual_seed(0))
    trained = model.bn1.running_mean.clone()
    assert evaluate(model, x_te, y_te, 0) > 0.9
    assert "_hat_stats_pending" not in model.__dict__
    assert not torch.equal(model.bn1.running_mean[0], trained[0])  # taken again with the final weights
    assert torch.equal(model.bn1.running_mean[1:], trained[1:])


def test_a_state_dict_taken_right_after_training_loads_into_a_fresh_model_that_evaluates_the_same(digit_tasks):
    # the state dict holds the refreshed rows (not the stale ones the next call would replace),
    # and a fresh model, whose first call is an evaluation of trained tasks, places the masks as
    # the trained one did (the conv's mask applied by the BatchNorm after it)
    torch.manual_seed(0)
    model = _conv_bn(HATConfig(num_tasks=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for t in range(2):
        x, y = digit_tasks[t][0][:96], digit_tasks[t][1][:96]
        model.train()
        for i in range(3):
            _step(model, optimizer, x[32 * i:32 * i + 32], y[32 * i:32 * i + 32], t, 100.0)
    state = copy.deepcopy(model.state_dict())  # before any other call of the model
    torch.manual_seed(1)
    fresh = _conv_bn(HATConfig(num_tasks=2))
    fresh.load_state_dict(state)
    x = torch.cat([digit_tasks[0][2], digit_tasks[1][2]])
    for t in range(2):
        assert torch.equal(hat.training.predict(fresh, x, t, forward="set_task"),
                           hat.training.predict(model, x, t, forward="set_task"))


def test_running_statistics_follow_the_buffers_after_a_copy_a_cast_and_a_data_assignment():
    """Training forwards update the task's row of the buffers the norm holds now: not a copy's,
    not those a cast replaced, not the storage a ``.data`` assignment replaced."""
    torch.manual_seed(0)

    def train_forward(norm, dtype=torch.float32):  # a new batch each time
        hat.set_task(norm, 1, mask_scale=None)
        norm.train()
        with torch.no_grad():  # BatchNorm statistics need no grad; hard masks are allowed without it
            norm(torch.randn(8, 3, dtype=dtype))

    norm = hat.modules.TaskIndexedBatchNorm1d(2, 3)
    train_forward(norm)
    twin = copy.deepcopy(norm)
    before = norm.running_mean.clone()
    train_forward(twin)
    assert torch.equal(norm.running_mean, before) and not torch.equal(twin.running_mean, before)
    norm.double()
    train_forward(norm, torch.float64)
    assert norm.running_mean.dtype == torch.float64 and not torch.equal(norm.running_mean[1].float(), before[1])
    assert int(norm.num_batches_tracked[1]) == 2
    norm.running_mean.data = torch.zeros(2, 3, dtype=torch.float64)
    train_forward(norm, torch.float64)
    assert not torch.equal(norm.running_mean[1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(norm.running_mean[0], torch.zeros(3, dtype=torch.float64))
