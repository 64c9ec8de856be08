"""hat.training's one loop on the digits data: a converted model and a payload model learn two tasks, task 0's
outputs stay bit-identical while task 1 trains, the loss goes down; bad arguments are refused with hat's errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hat
import hat.utils
from hat import HATConfig, HATTypeError, HATValueError, TaskIndexError, training
from hat.app.experiment import build_model
from hat.training import TrainStep, evaluate, predict, train_task

torch.set_num_threads(1)


def converted_mlp(s_max: float = 100.0) -> nn.Module:
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    return hat.convert(plain, HATConfig(num_tasks=2, max_trn_mask_scale=s_max))


MODELS = {
    # a plain model converted by hat.convert takes tensors: the task is set on the model for each batch
    "converted": (converted_mlp, "set_task"),
    # the CLI's MLP is written on payloads: the task and the scale travel with the batch
    "payload": (lambda: build_model("mlp", num_tasks=2, classes_per_task=2, s_max=100.0, hidden=64), "payload"),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_two_tasks_learn_and_task_0_stays_bit_identical(digit_tasks, kind):
    make, forward = MODELS[kind]
    torch.manual_seed(0)
    model = make()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)  # one for both tasks
    probe = torch.cat([digit_tasks[0][2], digit_tasks[1][2]])
    recorded = None
    for t in (0, 1):
        x, y, x_te, y_te = digit_tasks[t]
        losses = train_task(model, optimizer, (x, y), t, epochs=3, generator=torch.Generator().manual_seed(t),
                            forward=forward)
        assert len(losses) == 3 and losses[-1] < losses[0], f"task {t}: the loss did not go down: {losses}"
        assert evaluate(model, (x_te, y_te), t, forward=forward) >= 0.9
        if t == 0:
            recorded = predict(model, probe, 0, forward=forward)
    assert model.training  # predict and evaluate give the mode back
    assert hat.trained_tasks(model) == [0, 1]
    assert torch.equal(predict(model, probe, 0, forward=forward), recorded), "task 0 changed while task 1 trained"
    assert not torch.equal(predict(model, probe, 1, forward=forward), recorded)


def test_evaluate_counts_what_predict_gives(digit_tasks):
    torch.manual_seed(0)
    model = converted_mlp()
    x, y, x_te, y_te = digit_tasks[0]
    train_task(model, torch.optim.Adam(model.parameters(), lr=1e-3), (x, y), 0, epochs=1, forward="set_task")
    logits = predict(model, x_te, 0, forward="set_task")
    # batches of 7 give the same logits up to rounding: torch's CPU kernels are not batch-invariant
    # on every machine (AVX-512 ones differ in the last bit even for plain nn.Linear)
    torch.testing.assert_close(predict(model, x_te, 0, forward="set_task", batch_size=7), logits)

    def accuracy(batch_size):  # what predict gives, run in the same batches
        out = predict(model, x_te, 0, forward="set_task", batch_size=batch_size)
        return int((out.argmax(1) == y_te).sum()) / len(y_te)

    assert accuracy(None) > 0.9
    for batch_size in (None, 1024, 5, 9):
        assert evaluate(model, (x_te, y_te), 0, forward="set_task", batch_size=batch_size) == accuracy(batch_size)
    assert evaluate(model, list(zip(x_te.split(9), y_te.split(9))), 0, forward="set_task") == accuracy(9)


def test_batches_from_tensors_equal_the_same_batches_given_as_a_loader(digit_tasks):
    x, y = digit_tasks[0][0][:100], digit_tasks[0][1][:100]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    results = []
    for data, kwargs in [((x, y), dict(generator=torch.Generator().manual_seed(3), batch_size=16)),
                         ([(x[i], y[i]) for i in order.split(16)], {})]:
        torch.manual_seed(0)
        model = converted_mlp()
        losses = train_task(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), data, 0, epochs=1,
                            forward="set_task", **kwargs)
        results.append((losses, predict(model, x, 0, forward="set_task")))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])


def test_on_batch_sees_the_scale_annealed_within_each_epoch(digit_tasks):
    torch.manual_seed(0)
    model = converted_mlp(s_max=50.0)
    x, y = digit_tasks[0][0][:80], digit_tasks[0][1][:80]
    steps: list[TrainStep] = []
    losses = train_task(model, torch.optim.Adam(model.parameters()), (x, y), 0, epochs=2, batch_size=32,
                        forward="set_task", on_batch=steps.append)
    assert [(s.epoch, s.batch, s.num_batches) for s in steps] == [(e, b, 3) for e in range(2) for b in range(3)]
    # max_scale=None: the model's HATConfig.max_trn_mask_scale; the paper's linear schedule 1/s_max -> s_max
    assert [s.mask_scale for s in steps[:3]] == [1 / 50.0, hat.utils.get_hat_mask_scale("linear", 50.0, 0.5), 50.0]
    assert [len(s.y) for s in steps[:3]] == [32, 32, 16] and steps[0].logits.shape == (32, 2)
    assert losses[0] == pytest.approx(sum(s.loss.item() for s in steps[:3]) / 3)


def test_the_regularizer_is_added_only_where_asked(digit_tasks):
    x, y = digit_tasks[0][0][:64], digit_tasks[0][1][:64]
    first = {}
    for strength in (0.0, 0.75):
        torch.manual_seed(0)
        model = converted_mlp()
        steps: list[TrainStep] = []
        train_task(model, torch.optim.SGD(model.parameters(), lr=0.0), (x, y), 0, epochs=1, forward="set_task",
                   reg_strength=strength, on_batch=steps.append)
        first[strength] = steps[0].loss.item()
    assert first[0.75] > first[0.0]  # a fresh task's masks take free capacity: the term is positive
    # task None: the plain network, nothing to regularize, whatever reg_strength says
    torch.manual_seed(0)
    model = build_model("mlp", num_tasks=2, classes_per_task=2, s_max=100.0, hidden=32)
    losses = train_task(model, torch.optim.Adam(model.parameters()), (x, y), None, epochs=2, reg_strength=5.0)
    assert losses[1] < losses[0] and hat.trained_tasks(model) == []


def test_hat_utils_exports_the_same_functions():
    assert hat.utils.get_hat_reg_term is training.get_hat_reg_term
    assert hat.utils.get_hat_mask_scale is training.get_hat_mask_scale
    assert {"get_hat_reg_term", "get_hat_mask_scale", "RegStrategy", "ScaleStrategy"} <= set(hat.utils.__all__)
    assert {"train_task", "evaluate", "predict"} <= set(training.__all__)


# -- bad arguments: hat's errors, naming the argument, its value and what is allowed; the model untouched --
class _Sized:
    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0


BAD = [
    (dict(epochs=0), HATValueError, r"epochs must be a positive int; got 0"),
    (dict(epochs=1.5), HATTypeError, r"epochs must be a positive int; got 1\.5 of type float"),
    (dict(epochs=True), HATTypeError, r"epochs must be a positive int; got True"),
    (dict(batch_size=0), HATValueError, r"batch_size must be a positive int; got 0"),
    (dict(forward="tensor"), HATValueError, r"forward must be one of \('payload', 'set_task'\) or a call.*'tensor'"),
    (dict(forward=3), HATTypeError, r"forward must be one of .* got 3 of type int"),
    (dict(loss_fn=None), HATTypeError, r"loss_fn must be a callable; got None"),
    (dict(on_batch="print"), HATTypeError, r"on_batch must be a callable or None; got 'print'"),
    (dict(scale_strat="cubic"), HATValueError, r"scale_strat must be one of \('linear', .*'constant'\); got 'cubic'"),
    (dict(max_scale=-1.0), HATValueError, r"max_scale must be a positive finite number; got -1\.0"),
    (dict(max_scale="400"), HATTypeError, r"max_scale must be a positive number; got '400'"),
    (dict(reg_strength=-0.5), HATValueError, r"reg_strength must be a finite number >= 0 .*got -0\.5"),
    (dict(reg_strength=float("nan")), HATValueError, r"reg_strength must be a finite number >= 0 .*got nan"),
    (dict(reg_strength="0.75"), HATTypeError, r"reg_strength must be .*got '0\.75' of type str"),
    (dict(reg_strat="l1"), HATValueError, r"reg_strat must be one of \('uniform', 'paper'\); got 'l1'"),
    (dict(set_to_none=None), HATTypeError, r"set_to_none must be True or False; got None"),
    (dict(task_id=2), TaskIndexError, r"task_id must be an int in \[0, 2\); got 2"),
    (dict(task_id=True), HATTypeError, r"task_id must be an int in \[0, 2\) or None; got True"),
    (dict(optimizer="adam"), HATTypeError, r"optimizer must be a torch\.optim\.Optimizer; got str"),
    (dict(data="digits"), HATTypeError, r"data must be \(x, y\) tensors or a re-iterable .*got str"),
    (dict(data=torch.zeros(4, 64)), HATTypeError, r"data must be \(x, y\) tensors .*got Tensor"),
    (dict(data="short"), HATValueError, r"data must be \(x, y\) with as many targets as inputs.*10 inputs and 9"),
    (dict(data=_Sized()), HATValueError, r"data must hold at least one batch; got an empty _Sized"),
    (dict(data="loader", generator=torch.Generator()), HATValueError,
     r"batch_size and generator apply to \(x, y\) tensors; got batch_size=None, generator=<torch"),
    (dict(generator=0), HATTypeError, r"generator must be a torch\.Generator or None; got int"),
]


@pytest.mark.parametrize("bad, error, match", BAD, ids=[next(iter(b)) + "=" + repr(next(iter(b.values())))[:20]
                                                         for b, _, _ in BAD])
def test_bad_arguments_are_refused_and_change_nothing(digit_tasks, bad, error, match):
    torch.manual_seed(0)
    model = converted_mlp()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = digit_tasks[0][0][:10], digit_tasks[0][1][:10]
    args = dict(optimizer=torch.optim.Adam(model.parameters()), data=(x, y), task_id=0)
    kwargs = dict(epochs=1, forward="set_task")
    for key, value in bad.items():
        (args if key in args else kwargs)[key] = value
    args["data"] = {"short": (x, y[:9]), "loader": [(x, y)]}.get(args["data"], args["data"]) \
        if isinstance(args["data"], str) else args["data"]
    with pytest.raises(error, match=match):
        train_task(model, args["optimizer"], args["data"], args["task_id"], **kwargs)
    assert not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_max_scale_must_be_given_for_a_model_without_masks(digit_tasks):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(HATValueError, match=r"max_scale=None takes HATConfig\.max_trn_mask_scale .* Sequential has "
                                            r"none; pass max_scale"):
        train_task(model, torch.optim.Adam(model.parameters()), digit_tasks[0][:2], None, epochs=1)
    with pytest.raises(HATTypeError, match=r"model must be a torch\.nn\.Module; got str"):
        train_task("model", torch.optim.Adam(model.parameters()), digit_tasks[0][:2], None, epochs=1, max_scale=10.0)


@pytest.mark.parametrize("call, error, match", [
    (lambda m, x, y: predict(m, x.tolist(), 0), HATTypeError, r"x must be a torch\.Tensor; got list"),
    (lambda m, x, y: predict(m, x, 0, forward="set_task", batch_size=-2), HATValueError,
     r"batch_size must be a positive int; got -2"),
    (lambda m, x, y: evaluate(m, x, 0, forward="set_task"), HATTypeError,
     r"data must be \(x, y\) tensors or an iterable of \(x, y\) batches; got Tensor"),
    (lambda m, x, y: evaluate(m, (x, y[:3]), 0, forward="set_task"), HATValueError, r"5 inputs and 3 targets"),
    (lambda m, x, y: evaluate(m, [], 0, forward="set_task"), HATValueError, r"data has no samples to evaluate"),
    (lambda m, x, y: evaluate(m, (x, y), 0, forward="eval"), HATValueError, r"forward must be one of .*'eval'"),
])
def test_bad_arguments_to_predict_and_evaluate(digit_tasks, call, error, match):
    model = converted_mlp()
    with pytest.raises(error, match=match):
        call(model, digit_tasks[0][2][:5], digit_tasks[0][3][:5])
    assert model.training
