"""hat.fit_task_scores / hat.predict_task / hat.predict: class-incremental prediction (no task id given) on the
digits, split into 2-class tasks. The task is predicted far above chance on held-out data; an earlier task's
statistics and scores stay bit-identical while later tasks train; the statistics travel in the state dict, go
with ``hat.forget_task`` and are left out by ``hat.unconvert``; bad arguments raise hat's errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hat
from hat import HATConfig, HATTypeError, HATValueError, training
from hat.app import experiment
from hat.modules import HATLinear, TaskIndexedLinear
from hat.payload import HATPayload

NUM_TASKS = 3  # trained; the models have room for one more (an untrained task id)
PREFIX = "hat_task_scores_"


# -- data and models -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tasks():
    return experiment.split_digits(NUM_TASKS)


@pytest.fixture(scope="module")
def held_out(tasks):
    """Every task's test inputs, with their task ids and global labels (task t's classes are 2t, 2t+1)."""
    x = torch.cat([t[2] for t in tasks])
    task_ids = torch.cat([torch.full((len(t[2]),), i) for i, t in enumerate(tasks)])
    labels = torch.cat([t[3] + 2 * i for i, t in enumerate(tasks)])
    return x, task_ids, labels


def _sequential():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))


class PayloadNet(nn.Module):
    """Hand-built on payloads (not from hat.app.experiment or hat.convert): one HATLinear, per-task heads."""

    def __init__(self, cfg: HATConfig) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = HATLinear(64, 32, cfg)
        self.head = TaskIndexedLinear(cfg.num_tasks, 32, 2)

    def forward(self, p: HATPayload) -> HATPayload:
        p = p.forward_by(self.flatten)
        return self.head(self.fc(p).forward_by(torch.relu))


def _build(kind):
    torch.manual_seed(0)
    if kind in ("mlp", "cnn"):
        return experiment.build_model(kind, NUM_TASKS + 1, 2, hidden=64 if kind == "mlp" else 32), "payload"
    if kind == "sequential":
        return hat.convert(_sequential(), HATConfig(num_tasks=NUM_TASKS + 1)), "set_task"
    if kind == "payload":
        return PayloadNet(HATConfig(num_tasks=NUM_TASKS + 1)), "payload"
    raise AssertionError(kind)


EPOCHS = {"mlp": 5, "cnn": 2, "sequential": 4, "payload": 4}


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)


def _train(model, opt, forward, data, t, epochs):
    training.train_task(model, opt, data[:2], t, epochs=epochs, batch_size=32, forward=forward, max_scale=400,
                        generator=torch.Generator().manual_seed(t))


def _trained(kind, tasks, fit=True):
    """A model of ``kind`` trained on the three digit tasks with one AdamW, each task's scores fitted when it ends."""
    model, forward = _build(kind)
    opt = _optimizer(model)
    for t in range(NUM_TASKS):
        _train(model, opt, forward, tasks[t], t, EPOCHS[kind])
        if fit:
            hat.fit_task_scores(model, t, tasks[t][:2])
    return model


@pytest.fixture(scope="module")
def mlp(tasks):
    return _trained("mlp", tasks)


@pytest.fixture(scope="module")
def sequential(tasks):
    return _trained("sequential", tasks)


@pytest.fixture(scope="module")
def cnn(tasks):
    return _trained("cnn", tasks)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _score_buffers(model, task=None):
    head = PREFIX if task is None else f"{PREFIX}{task}_"
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(head)}


def _accuracies(model, held_out, **kwargs):
    x, task_ids, labels = held_out
    p = hat.predict(model, x, **kwargs)
    return (p.task_id == task_ids).float().mean().item(), (p.global_class == labels).float().mean().item()


# -- 1. shapes and dtypes --------------------------------------------------------------------------------
def test_predict_task_shapes_and_dtypes(mlp, held_out):
    x = held_out[0][:37]
    p = hat.predict_task(mlp, x)
    assert isinstance(p, hat.TaskPrediction)
    assert p.task_id.dtype == torch.long and p.task_id.shape == (37,)
    assert p.scores.dtype == torch.float32 and p.scores.shape == (37, NUM_TASKS)
    assert torch.isfinite(p.scores).all()
    assert torch.equal(p.task_id, p.scores.argmax(1))


def test_predict_shapes_dtypes_and_global_classes(mlp, held_out):
    x = held_out[0][::5]
    p = hat.predict(mlp, x)
    assert isinstance(p, hat.Prediction)
    b = len(x)
    for name in ("task_id", "class_id", "global_class"):
        assert getattr(p, name).dtype == torch.long and getattr(p, name).shape == (b,), name
    assert p.scores.shape == (b, NUM_TASKS) and p.logits.shape == (b, 2) and p.logits.dtype == torch.float32
    assert torch.equal(p.task_id, hat.predict_task(mlp, x).task_id)
    assert torch.equal(p.scores, hat.predict_task(mlp, x).scores)
    assert torch.equal(p.class_id, p.logits.argmax(1))
    assert torch.equal(p.global_class, 2 * p.task_id + p.class_id)  # default offsets: t * C
    # the logits are the predicted task's head, as the task-incremental forward gives them
    for t in range(NUM_TASKS):
        rows = p.task_id == t
        if rows.any():
            expected = training.predict(mlp, x[rows], t, forward="payload")
            assert torch.allclose(p.logits[rows], expected, atol=1e-5)
    offsets = [100, 10, 0]
    q = hat.predict(mlp, x, class_offsets=offsets)
    assert torch.equal(q.task_id, p.task_id) and torch.equal(q.class_id, p.class_id)
    assert torch.equal(q.global_class, torch.tensor(offsets)[p.task_id] + p.class_id)
    assert torch.equal(hat.predict(mlp, x, class_offsets=torch.tensor(offsets)).global_class, q.global_class)


def test_tasks_restricts_the_choice_and_batch_size_splits_the_work(mlp, held_out):
    x = held_out[0][::4]
    full = hat.predict_task(mlp, x)
    some = hat.predict_task(mlp, x, tasks=[2, 0])
    assert some.scores.shape == (len(x), NUM_TASKS)
    assert torch.isinf(some.scores[:, 1]).all() and (some.scores[:, 1] < 0).all()
    assert set(some.task_id.tolist()) <= {0, 2}
    assert torch.allclose(some.scores[:, [0, 2]], full.scores[:, [0, 2]], atol=1e-4)
    first = hat.predict(mlp, x, tasks=[0, 1])
    assert first.scores.shape == (len(x), 2)  # scores cover tasks 0..max(tasks)
    only = hat.predict_task(mlp, x, tasks=[1])
    assert (only.task_id == 1).all()
    split = hat.predict(mlp, x, batch_size=7)
    whole = hat.predict(mlp, x)
    assert torch.allclose(split.scores, whole.scores, atol=1e-4)
    assert torch.allclose(split.logits, whole.logits, atol=1e-5)
    assert torch.equal(split.task_id, whole.task_id)


# -- 2. accuracy on held-out data --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "sequential", "cnn"])
def test_task_and_class_incremental_accuracy_far_above_chance(kind, request, held_out):
    model = request.getfixturevalue(kind)
    task_acc, class_acc = _accuracies(model, held_out)
    # chance: 1/3 for the task, 1/6 for the global class
    assert task_acc > 0.9, task_acc
    assert class_acc > 0.85, class_acc


def test_masked_features_alone_predict_the_task(mlp, tasks, held_out):
    """Without the raw-input term the task's masked features (its frozen fingerprint) still tell the tasks apart."""
    model, _ = _build("mlp")
    model.load_state_dict({k: v for k, v in mlp.state_dict().items() if not k.startswith(PREFIX)})
    for t in range(NUM_TASKS):
        hat.fit_task_scores(model, t, tasks[t][:2], inputs=False)
    layer_terms = [k for k in model.state_dict() if k.startswith(PREFIX + "0_") and k.endswith("_used")]
    assert len(layer_terms) == 1  # the features only
    task_acc, _ = _accuracies(model, held_out)
    assert task_acc > 0.8, task_acc


# -- 3. the invariant: later tasks leave earlier tasks' statistics and scores bit-identical --------------------
@pytest.mark.parametrize("kind", ["mlp", "cnn", "sequential"])
def test_later_tasks_leave_earlier_scores_bit_identical(kind, tasks, held_out):
    model, forward = _build(kind)
    opt = _optimizer(model)  # created once for the whole sequence
    x = held_out[0]
    for t in range(2):
        _train(model, opt, forward, tasks[t], t, EPOCHS[kind])
        hat.fit_task_scores(model, t, tasks[t][:2])
    scores = hat.predict_task(model, x, tasks=[0, 1]).scores
    buffers = {t: _score_buffers(model, t) for t in range(2)}
    assert buffers[0] and buffers[1]
    _train(model, opt, forward, tasks[2], 2, EPOCHS[kind])
    hat.fit_task_scores(model, 2, tasks[2][:2])
    assert torch.equal(hat.predict_task(model, x, tasks=[0, 1]).scores, scores)
    for t in range(2):
        after = _score_buffers(model, t)
        assert after.keys() == buffers[t].keys()
        assert all(torch.equal(after[k], buffers[t][k]) for k in after)
    assert hat.scored_tasks(model) == [0, 1, 2]


def test_predicting_and_fitting_leave_the_model_as_it_was(cnn, tasks, held_out):
    model = copy.deepcopy(cnn)
    model.train()
    before = _snapshot(model)
    hat.predict(model, held_out[0][:50])
    assert model.training and all(m.training for m in model.modules())
    assert _same_state(model, before)  # BatchNorm running statistics included
    hat.fit_task_scores(model, 1, tasks[1][:2], replace=True)
    assert model.training
    assert _same_state(model, before)  # the same data: the same statistics, and nothing else touched


# -- 4. state dict round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "cnn", "sequential"])
def test_a_fresh_model_loads_the_statistics_strictly(kind, request, held_out):
    model = request.getfixturevalue(kind)
    state = model.state_dict()
    assert any(k.startswith(PREFIX) for k in state) and PREFIX + "config" in state
    fresh, _ = _build(kind)
    assert hat.scored_tasks(fresh) == []
    fresh.load_state_dict(state)  # strict
    assert hat.scored_tasks(fresh) == [0, 1, 2]
    assert hat.trained_tasks(fresh) == hat.trained_tasks(model)
    x = held_out[0]
    ours, theirs = hat.predict(fresh, x), hat.predict(model, x)
    assert torch.equal(ours.scores, theirs.scores)
    assert torch.equal(ours.global_class, theirs.global_class)


def test_loading_replaces_the_statistics_a_model_had(mlp, held_out):
    """Loading a state dict with fewer scored tasks leaves none of the model's own behind."""
    fewer = copy.deepcopy(mlp)
    hat.forget_task(fewer, 1)
    model = copy.deepcopy(mlp)
    model.load_state_dict(fewer.state_dict())
    assert hat.scored_tasks(model) == [0, 2]
    assert not any(k.startswith(PREFIX + "1_") for k in model.state_dict())
    assert torch.equal(hat.predict_task(model, held_out[0]).scores, hat.predict_task(fewer, held_out[0]).scores)


def test_a_hand_built_payload_model_loads_after_install_load_hook(tasks, held_out):
    model = _trained("payload", tasks)
    state = model.state_dict()
    fresh, _ = _build("payload")
    with pytest.raises(RuntimeError, match=PREFIX):  # without the hook: unexpected keys
        fresh.load_state_dict(state)
    fresh, _ = _build("payload")
    hat.task_prediction.install_load_hook(fresh)
    hat.task_prediction.install_load_hook(fresh)  # idempotent
    fresh.load_state_dict(state)
    assert hat.scored_tasks(fresh) == [0, 1, 2]
    x = held_out[0]
    ours, theirs = hat.predict(fresh, x), hat.predict(model, x)
    assert torch.equal(ours.scores, theirs.scores) and torch.equal(ours.global_class, theirs.global_class)
    task_acc, _ = _accuracies(fresh, held_out)
    assert task_acc > 0.9, task_acc


# -- 5. converted models, the CNN, a timm network ------------------------------------------------------------
def test_a_converted_sequential_is_called_with_set_task(sequential, held_out):
    x = held_out[0][::3]
    auto = hat.predict(sequential, x)
    explicit = hat.predict(sequential, x, forward="set_task")
    assert torch.equal(auto.scores, explicit.scores) and torch.equal(auto.logits, explicit.logits)
    for t in range(NUM_TASKS):
        rows = auto.task_id == t
        if rows.any():
            expected = training.predict(sequential, x[rows], t, forward="set_task")
            assert torch.allclose(auto.logits[rows], expected, atol=1e-5)


def test_unconvert_leaves_the_statistics_behind(sequential, held_out):
    plain = hat.unconvert(sequential, 1)
    assert type(plain) is nn.Sequential
    assert not any(k.startswith(PREFIX) for k in plain.state_dict())
    assert not any(n.startswith(PREFIX) for n, _ in plain.named_buffers())
    assert hat.scored_tasks(sequential) == [0, 1, 2]  # the converted model keeps them
    x = held_out[0][:20]
    expected = training.predict(sequential, x, 1, forward="set_task")
    assert torch.allclose(plain(x), expected, atol=1e-5)
    fresh = _sequential()
    fresh.load_state_dict(plain.state_dict())  # strict: a plain model's state dict


def _rgb32(x):
    return F.interpolate(x, size=32).expand(-1, 3, -1, -1).contiguous()


@pytest.fixture(scope="module")
def resnet(tasks):
    """A tiny hat_resnet18s run: 2 tasks, 128 upsampled 3-channel digits each, 1 epoch."""
    timm = pytest.importorskip("timm")
    import hat.timm_models  # registers hat_* in timm

    torch.manual_seed(0)
    model = timm.create_model("hat_resnet18s", num_classes=2, hat_config=HATConfig(num_tasks=2))
    opt = _optimizer(model)
    fitted = []
    for t in range(2):
        data = (_rgb32(tasks[t][0][:128]), tasks[t][1][:128])
        training.train_task(model, opt, data, t, epochs=1, batch_size=32, forward="set_task",
                            generator=torch.Generator().manual_seed(t))
        hat.fit_task_scores(model, t, data)
        fitted.append(data[0])
    return model, fitted


def test_hat_resnet18s_on_upsampled_digits(resnet, tasks):
    model, fitted = resnet
    assert hat.scored_tasks(model) == [0, 1]
    x = _rgb32(torch.cat([tasks[0][2][:40], tasks[1][2][:40]]))
    p = hat.predict(model, x)
    assert p.scores.shape == (80, 2) and torch.isfinite(p.scores).all()
    assert p.logits.shape == (80, 2) and p.global_class.max() < 4
    for t in range(2):  # the rows each task's samples were fitted on are its own
        own = hat.predict_task(model, fitted[t][:64]).task_id
        assert (own == t).float().mean() > 0.9, (t, own)


def test_a_fresh_hat_resnet18s_loads_the_statistics(resnet, tasks):
    import timm

    model, _ = resnet
    x = _rgb32(torch.cat([tasks[0][2][:20], tasks[1][2][:20]]))
    fresh = timm.create_model("hat_resnet18s", num_classes=2, hat_config=HATConfig(num_tasks=2))
    fresh.load_state_dict(model.state_dict())  # strict: the statistics load into a timm model as is
    assert hat.scored_tasks(fresh) == [0, 1]
    assert torch.equal(hat.predict(fresh, x).scores, hat.predict(model, x).scores)


# -- 6. forget_task ------------------------------------------------------------------------------------------
def test_forget_task_drops_its_statistics_and_the_others_predict_as_before(mlp, held_out):
    model = copy.deepcopy(mlp)
    x, task_ids, _ = held_out
    before = hat.predict_task(model, x).scores
    hat.forget_task(model, 1)
    assert hat.scored_tasks(model) == [0, 2]
    assert not any(k.startswith(PREFIX + "1_") for k in model.state_dict())
    assert PREFIX + "config" in model.state_dict()
    p = hat.predict(model, x)
    assert p.scores.shape == (len(x), NUM_TASKS)
    assert torch.isinf(p.scores[:, 1]).all() and (p.task_id != 1).all()
    assert torch.equal(p.scores[:, [0, 2]], before[:, [0, 2]])  # forgetting leaves the other tasks bit-identical
    kept = task_ids != 1
    assert (p.task_id[kept] == task_ids[kept]).float().mean() > 0.9
    with pytest.raises(HATValueError, match=r"tasks must hold trained tasks"):
        hat.predict(model, x, tasks=[1])
    hat.forget_task(model, 0)
    hat.forget_task(model, 2)
    assert hat.scored_tasks(model) == []
    assert not any(k.startswith(PREFIX) for k in model.state_dict())  # with the last task, the config too
    with pytest.raises(HATValueError, match=r"no trained task"):
        hat.predict_task(model, x)


# -- 7. errors -------------------------------------------------------------------------------------------------
def test_x_must_be_a_non_empty_tensor(mlp, held_out):
    with pytest.raises(HATTypeError, match=r"x must be a torch.Tensor; got list"):
        hat.predict_task(mlp, held_out[0][:3].tolist())
    with pytest.raises(HATTypeError, match=r"x must be a torch.Tensor; got ndarray"):
        hat.predict(mlp, held_out[0][:3].numpy())
    with pytest.raises(HATValueError, match=r"x must be a batch.*\(0, 1, 8, 8\)"):
        hat.predict_task(mlp, held_out[0][:0])
    with pytest.raises(HATValueError, match=r"x must be a batch"):
        hat.predict(mlp, torch.tensor(1.0))


def test_a_model_with_no_trained_task(held_out):
    model, _ = _build("mlp")
    with pytest.raises(HATValueError, match=r"no trained task") as info:
        hat.predict_task(model, held_out[0][:4])
    assert "hat.fit_task_scores" in str(info.value)
    with pytest.raises(HATValueError, match=r"has not been trained"):
        hat.fit_task_scores(model, 0, (held_out[0][:4], torch.zeros(4, dtype=torch.long)))
    with pytest.raises(HATValueError, match=r"no HAT or task-indexed module"):
        hat.predict_task(_sequential(), held_out[0][:4])
    with pytest.raises(HATTypeError, match=r"model must be a torch.nn.Module"):
        hat.predict_task("mlp", held_out[0][:4])


def test_a_trained_task_without_statistics(tasks, held_out):
    model, forward = _build("mlp")
    _train(model, _optimizer(model), forward, tasks[0], 0, 1)
    with pytest.raises(HATValueError, match=r"task 0 has no recorded statistics.*hat\.fit_task_scores\(model, 0"):
        hat.predict(model, held_out[0][:4])


def test_fitting_twice_needs_replace(mlp, tasks, held_out):
    model = copy.deepcopy(mlp)
    before = _snapshot(model)
    with pytest.raises(HATValueError, match=r"task 1 already has recorded statistics.*replace=True"):
        hat.fit_task_scores(model, 1, tasks[1][:2])
    assert _same_state(model, before)
    x, y = tasks[1][:2]
    hat.fit_task_scores(model, 1, (x[:60], y[:60]), replace=True)
    assert hat.scored_tasks(model) == [0, 1, 2]
    changed = _score_buffers(model, 1)
    assert changed.keys() == _score_buffers(mlp, 1).keys()
    assert not torch.equal(changed[PREFIX + "1_0_means"], before[PREFIX + "1_0_means"])
    for t in (0, 2):  # the other tasks' statistics untouched
        assert all(torch.equal(v, before[k]) for k, v in _score_buffers(model, t).items())
    hat.fit_task_scores(model, 1, (x, y), replace=True)  # the original data again: the original statistics
    assert _same_state(model, before)
    with pytest.raises(HATTypeError, match=r"replace must be True or False"):
        hat.fit_task_scores(model, 1, (x, y), replace=1)


def test_fitting_an_untrained_task(mlp, tasks):
    model = copy.deepcopy(mlp)
    before = _snapshot(model)
    with pytest.raises(HATValueError, match=r"task_id must be one of the trained tasks \[0, 1, 2\]; got 3"):
        hat.fit_task_scores(model, 3, tasks[0][:2])
    assert _same_state(model, before)


def test_layers_must_name_modules_of_the_model(mlp, tasks):
    model, _ = _build("mlp")
    model.load_state_dict({k: v for k, v in mlp.state_dict().items() if not k.startswith(PREFIX)})
    before = _snapshot(model)
    with pytest.raises(HATValueError, match=r"layers must name modules.*'fc9'"):
        hat.fit_task_scores(model, 0, tasks[0][:2], layers=["fc2", "fc9"])
    with pytest.raises(HATTypeError, match=r"layers must be a list of module names"):
        hat.fit_task_scores(model, 0, tasks[0][:2], layers="fc2")
    assert _same_state(model, before) and hat.scored_tasks(model) == []


def test_data_must_be_re_iterable_with_labels_of_one_per_sample(mlp, tasks):
    model = copy.deepcopy(mlp)
    before = _snapshot(model)
    x, y = tasks[1][:2]
    batches = iter(DataLoader(TensorDataset(x, y), batch_size=32))
    with pytest.raises(HATTypeError, match=r"one-shot iterator"):
        hat.fit_task_scores(model, 1, batches, replace=True)
    with pytest.raises(HATTypeError, match=r"one-shot iterator"):
        hat.fit_task_scores(model, 1, ((x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)), replace=True)
    with pytest.raises(HATValueError, match=r"labels must be \[batch\].*got shape \(\d+, 1\)"):
        hat.fit_task_scores(model, 1, (x, y.unsqueeze(1)), replace=True)
    with pytest.raises(HATValueError, match=r"same number of samples"):
        hat.fit_task_scores(model, 1, (x, y[:-1]), replace=True)
    with pytest.raises(HATTypeError, match=r"labels must be an integer tensor"):
        hat.fit_task_scores(model, 1, (x, y.float()), replace=True)
    with pytest.raises(HATValueError, match=r"data has no samples"):
        hat.fit_task_scores(model, 1, DataLoader(TensorDataset(x[:0], y[:0]), batch_size=8), replace=True)
    assert _same_state(model, before)


def test_class_offsets_and_tasks_are_checked(mlp, held_out):
    x = held_out[0][:5]
    with pytest.raises(HATValueError, match=r"class_offsets must hold one int per task \(at least 3\); got 2"):
        hat.predict(mlp, x, class_offsets=[0, 2])
    with pytest.raises(HATTypeError, match=r"class_offsets must be a list of ints"):
        hat.predict(mlp, x, class_offsets=[0, 2.0, 4])
    with pytest.raises(HATValueError, match=r"tasks must hold trained tasks \[0, 1, 2\]; got 3"):
        hat.predict_task(mlp, x, tasks=[0, 3])
    with pytest.raises(HATValueError, match=r"at least one trained task"):
        hat.predict_task(mlp, x, tasks=[])
    with pytest.raises(HATTypeError, match=r"tasks must be a list"):
        hat.predict_task(mlp, x, tasks=1)
    with pytest.raises(HATValueError, match=r"batch_size must be a positive int; got 0"):
        hat.predict_task(mlp, x, batch_size=0)
    with pytest.raises(HATValueError, match=r"forward must be"):
        hat.predict_task(mlp, x, forward="plain")


# -- 8. a DataLoader gives the statistics the tensors give -------------------------------------------------------
def test_a_dataloader_gives_the_same_statistics_as_tensors(mlp, tasks):
    model = copy.deepcopy(mlp)
    x, y = tasks[2][:2]
    loader = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0))
    hat.fit_task_scores(model, 2, loader, replace=True)
    ours, theirs = _score_buffers(model, 2), _score_buffers(mlp, 2)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert torch.allclose(ours[k].double(), theirs[k].double(), rtol=1e-4, atol=1e-5), k


# -- the config: the first task fitted fixes what every task reads ---------------------------------------------------
def test_predict_after_fitting_only_the_first_task(tasks, held_out):
    model, forward = _build("mlp")
    _train(model, _optimizer(model), forward, tasks[0], 0, 1)
    hat.fit_task_scores(model, 0, tasks[0][:2])
    assert PREFIX + "config" in model.state_dict()
    p = hat.predict(model, held_out[0][:10])
    assert (p.task_id == 0).all() and p.scores.shape == (10, 1)
    assert torch.equal(p.global_class, p.class_id)


def test_replacing_the_only_scored_task_keeps_the_config(tasks, held_out):
    model = _trained("mlp", tasks, fit=False)
    hat.fit_task_scores(model, 0, tasks[0][:2])
    hat.fit_task_scores(model, 1, tasks[1][:2])
    hat.forget_task(model, 1)
    before = _snapshot(model)
    hat.fit_task_scores(model, 0, tasks[0][:2], replace=True)
    assert _same_state(model, before)  # config included
    assert (hat.predict_task(model, held_out[0][:10], tasks=[0]).task_id == 0).all()


def test_every_task_must_read_the_layers_of_the_first(tasks):
    model = _trained("mlp", tasks, fit=False)
    hat.fit_task_scores(model, 0, tasks[0][:2], layers=["fc2"])
    before = _snapshot(model)
    with pytest.raises(HATValueError, match=r"every task must read the same"):
        hat.fit_task_scores(model, 1, tasks[1][:2], layers=["fc1"])
    with pytest.raises(HATValueError, match=r"every task must read the same"):
        hat.fit_task_scores(model, 1, tasks[1][:2], inputs=False)
    assert _same_state(model, before)
    hat.fit_task_scores(model, 1, tasks[1][:2], layers=["fc2"])
    hat.fit_task_scores(model, 2, tasks[2][:2])  # None: the recorded choice
    assert hat.scored_tasks(model) == [0, 1, 2]


# -- bugs ------------------------------------------------------------------------------------------------------------
def test_empty_tensors_are_no_samples(mlp, tasks):
    model = copy.deepcopy(mlp)
    x, y = tasks[1][:2]
    with pytest.raises(HATValueError, match=r"data has no samples"):
        hat.fit_task_scores(model, 1, (x[:0], y[:0]), replace=True)
