"""hat-cl 0.1.1 users bring their trained models: a state_dict that hat-cl wrote loads, and the
outputs equal hat-cl's. ``fixtures/hat_cl_0.1.1.pt`` was written by hat-cl 0.1.1 itself
(``fixtures/make_hat_cl_fixture.py``, in a side virtual environment)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hat import HATConfig, HATPayload
from hat.utils import convert_hat_cl_state_dict, load_hat_cl_state_dict

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))

import hat_cl_models  # noqa: E402  (the fixture folder, on the path above)


@pytest.fixture(scope="module")
def saved():
    return torch.load(FIXTURES / "hat_cl_0.1.1.pt", weights_only=False)


@pytest.mark.parametrize("name, cls", [("mlp", hat_cl_models.MLP), ("cnn", hat_cl_models.CNN)])
def test_a_hat_cl_state_dict_loads_and_gives_hat_cls_outputs(saved, name, cls):
    record = saved[name]
    model = cls(HATConfig(num_tasks=hat_cl_models.NUM_TASKS))
    result = load_hat_cl_state_dict(model, record["state_dict"])
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    with torch.no_grad():
        for task, expected in record["outputs"].items():
            got = model(HATPayload(record["x"], task_id=task)).data
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # hat-cl's trained flags came along: protection knows every task is trained
    assert all(m.hat_trained.all() for m in model.modules() if hasattr(m, "hat_trained"))


def test_each_task_row_is_hat_cls_tensor_for_that_task(saved):
    state = saved["norms"]["state_dict"]
    model = hat_cl_models.Norms(HATConfig(num_tasks=hat_cl_models.NUM_TASKS))
    result = load_hat_cl_state_dict(model, state)
    assert not result.missing_keys and not result.unexpected_keys
    n = hat_cl_models.NUM_TASKS
    for t in range(n):
        assert torch.equal(model.linear.task_embedding[t], state[f"linear.masker.attention.{t}"])
    for t in range(n + 1):  # the no-task slot too
        assert torch.equal(model.layer_norm.weight[t], state[f"layer_norm.{t}.weight"])
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(model.batch_norm, name)[t], state[f"batch_norm.{t}.{name}"]), name
    converted = convert_hat_cl_state_dict(state, model)
    assert torch.equal(converted["linear.hat_trained"], state["linear.masker._task_trained"])


def test_a_checkpoint_for_another_number_of_tasks_is_refused_naming_the_key(saved):
    model = hat_cl_models.MLP(HATConfig(num_tasks=2))
    with pytest.raises(ValueError, match=r"linear1\.task_embedding"):
        load_hat_cl_state_dict(model, saved["mlp"]["state_dict"])
