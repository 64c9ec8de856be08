"""Per-sample task ids: one batch whose samples belong to different tasks.

Every sample's output must equal the output it gets in a batch of its task alone, in evaluation
and in training (soft masks, batch statistics per task); training such a batch trains every task
present and keeps every other trained task bit-identical.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import hat
from hat import HATConfig, HATPayload
from hat.app.experiment import build_model
from hat.utils import get_hat_reg_term

from convert_models import SmallResNet, sequential_cnn

NUM_TASKS = 3
IDS = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1, 0, 2, 1])


def _images(digit_tasks, n=12, size=None, channels=1):
    x = torch.cat([task[2] for task in digit_tasks])[:n]
    if size is not None:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.repeat(1, channels, 1, 1)


def _tensor_api(make, call):
    """A converted model: the task as model state."""
    def run(model, x, task, scale):
        hat.set_task(model, task, mask_scale=scale)
        return call(model, x)
    return make, run


def _payload_api(make):
    def run(model, x, task, scale):
        return model(HATPayload(x, task_id=task, mask_scale=scale)).data
    return make, run


def _timm(name, **kwargs):
    timm = pytest.importorskip("timm")
    import hat.timm_models  # noqa: F401

    return lambda: timm.create_model(name, hat_config=HATConfig(num_tasks=NUM_TASKS), num_classes=2, **kwargs)


MODELS = {
    "payload-mlp": (_payload_api(lambda: build_model("mlp", NUM_TASKS, 2, s_max=100.0)), dict()),
    "payload-cnn-bn": (_payload_api(lambda: build_model("cnn", NUM_TASKS, 2, s_max=100.0)), dict()),
    "converted-cnn-bn": (_tensor_api(lambda: hat.convert(sequential_cnn(), HATConfig(num_tasks=NUM_TASKS)),
                                     lambda m, x: m(x)), dict()),
    "converted-resnet": (_tensor_api(lambda: hat.convert(ResNetFeatures(), HATConfig(num_tasks=NUM_TASKS)),
                                     lambda m, x: m(x)), dict()),
    "hat_resnet18s": (_tensor_api(_timm("hat_resnet18s"), lambda m, x: m(x)), dict(size=16, channels=3)),
    "hat_resnet18s-payload": (_payload_api(_timm("hat_resnet18s")), dict(size=16, channels=3)),
    "hat_vit_tiny": (_tensor_api(_timm("hat_vit_tiny_patch16_224", img_size=16, patch_size=4), lambda m, x: m(x)),
                     dict(size=16, channels=3)),
}


class ResNetFeatures(torch.nn.Module):
    """The residual net of the conversion tests (BatchNorm, LayerNorm, residual sums) with one
    head chosen by the task selection, not by a Python int."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallResNet(NUM_TASKS)
        self.head = torch.nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net.features(x))


def _trained(name, digit_tasks):
    """The model after a few annealed steps on each task (so that every task has masks of its own)."""
    (make, run), shape = MODELS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        model.train()
        for t in range(NUM_TASKS):
            x = _images(digit_tasks, 16, **shape)
            y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(t))
            for scale in (1.0, 25.0, 100.0):
                out = run(model, x, t, scale)
                loss = F.cross_entropy(out.flatten(1)[:, :2], y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return model, run, shape, optimizer


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_each_sample_gets_the_output_of_its_task_alone(digit_tasks, name, mode):
    model, run, shape, _ = _trained(name, digit_tasks)
    x = _images(digit_tasks, len(IDS), **shape)
    scale = None if mode == "eval" else 50.0
    model.train(mode == "train")
    with torch.no_grad():
        mixed = run(model, x, IDS, scale)
        for t in range(NUM_TASKS):
            rows = (t == IDS).nonzero().flatten()
            alone = run(model, x[rows], t, scale)  # a batch of that task alone: its own batch statistics
            torch.testing.assert_close(mixed[rows], alone, rtol=0, atol=1e-6)


def test_per_sample_eval_of_a_converted_cnn_is_bit_identical(digit_tasks):
    model, run, _, _ = _trained("converted-cnn-bn", digit_tasks)
    x = _images(digit_tasks, len(IDS))
    model.eval()
    with torch.no_grad():
        mixed = run(model, x, IDS, None)
        for t in range(NUM_TASKS):
            rows = t == IDS
            assert torch.equal(mixed[rows], run(model, x, t, None)[rows])


@pytest.mark.parametrize("name", ["payload-cnn-bn", "converted-cnn-bn", "hat_resnet18s"])
def test_a_mixed_batch_trains_the_tasks_present_and_keeps_the_others_exact(digit_tasks, name):
    model, run, shape, optimizer = _trained(name, digit_tasks)
    x = _images(digit_tasks, len(IDS), **shape)
    probe = _images(digit_tasks, 8, **shape)

    def outputs(task):
        model.eval()
        with torch.no_grad():
            out = run(model, probe, task, None)
        model.train()
        return out

    before = {t: outputs(t) for t in range(NUM_TASKS)}
    ids = torch.where(IDS == 0, torch.ones_like(IDS), IDS)  # tasks 1 and 2 only: task 0 must not move
    y = torch.randint(0, 2, (len(ids),), generator=torch.Generator().manual_seed(9))
    for scale in (10.0, 100.0):
        loss = F.cross_entropy(run(model, x, ids, scale).flatten(1)[:, :2], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(outputs(0), before[0])
    assert not torch.equal(outputs(1), before[1]) and not torch.equal(outputs(2), before[2])


def test_training_a_mixed_batch_marks_every_task_present_trained(digit_tasks):
    torch.manual_seed(0)
    model = hat.convert(sequential_cnn(), HATConfig(num_tasks=NUM_TASKS))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = _images(digit_tasks, 4)
    hat.set_task(model, torch.tensor([2, 0, 2, 0]), mask_scale=10.0)
    F.cross_entropy(model(x), torch.tensor([0, 1, 0, 1])).backward()
    optimizer.step()
    assert hat.trained_tasks(model) == [0, 2]


def test_the_regularizer_of_a_mixed_batch_is_the_mean_over_the_tasks_present(digit_tasks):
    model, _, _, _ = _trained("converted-cnn-bn", digit_tasks)
    ids = torch.tensor([2, 0, 2, 2])
    mixed = get_hat_reg_term(model, task_id=ids, mask_scale=20.0)
    each = [get_hat_reg_term(model, task_id=t, mask_scale=20.0) for t in (0, 2)]
    torch.testing.assert_close(mixed, (each[0] + each[1]) / 2)


@pytest.mark.parametrize("ids, error, words", [
    (torch.tensor([0, 3, 1, 1]), IndexError, "task 3"),
    (torch.tensor([0.0, 1.0, 1.0, 0.0]), TypeError, "integer"),
    (torch.tensor([0, 1]), TypeError, "2 per-sample ids for a batch of 4"),
    (torch.tensor([0, -1, 1, 1]), IndexError, "negative"),
])
def test_bad_per_sample_ids_are_clear_errors_and_change_nothing(ids, error, words):
    model = hat.convert(sequential_cnn(), HATConfig(num_tasks=NUM_TASKS))
    with pytest.raises(error, match=words):
        model[0](HATPayload(torch.zeros(4, 1, 8, 8), task_id=ids))
    hat.set_task(model, 1, mask_scale=5.0)
    if len(ids) != 4:  # a selection for another batch size: the forward says so
        hat.set_task(model, ids)
        with pytest.raises(TypeError, match=words):
            model(torch.zeros(4, 1, 8, 8))
        return
    with pytest.raises(error, match=r"task_id|integer|negative"):
        hat.set_task(model, ids)
    assert model[0]._hat_state == (1, 5.0)  # the selection before the error stays


def test_the_statistics_refresh_after_a_mixed_batch_covers_every_task_present(digit_tasks):
    torch.manual_seed(0)
    model = hat.convert(sequential_cnn(), HATConfig(num_tasks=NUM_TASKS))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = _images(digit_tasks, len(IDS))
    for scale in (50.0, 100.0):
        hat.set_task(model, IDS, mask_scale=scale)
        F.cross_entropy(model(x), torch.randint(0, 2, (len(IDS),))).backward()
        optimizer.step()
        optimizer.zero_grad()
    bn = model[1]
    trained = bn.running_mean.clone()
    model.eval()
    with torch.no_grad(), hat.task(model, 0):
        model(x[:2])  # the first call after training: refreshes the rows of tasks 0, 1 and 2
    assert "_hat_stats_pending" not in model.__dict__
    for t in range(NUM_TASKS):
        assert not torch.equal(bn.running_mean[t], trained[t])
    assert torch.equal(bn.running_mean[NUM_TASKS], trained[NUM_TASKS])  # the no-task row stays
