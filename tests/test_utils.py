"""hat.utils against values computed by hand: the mask-scale schedules and the mask regularizer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hat
from hat import HATConfig, HATPayload
from hat.modules import HATConv2d, HATLinear, TaskIndexedBatchNorm2d, TaskIndexedLinear
from hat.utils import get_hat_mask_scale, get_hat_reg_term


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# -- mask-scale schedules -----------------------------------------------------------------------------
@pytest.mark.parametrize("strat, s_max, progress, expected", [
    # linear (paper): 1/s_max + (s_max - 1/s_max) p
    ("linear", 100.0, 0.0, 0.01),
    ("linear", 100.0, 1.0, 100.0),
    ("linear", 100.0, 0.5, 0.01 + 99.99 * 0.5),
    ("linear", 400.0, 0.25, 1 / 400 + (400 - 1 / 400) * 0.25),
    # cosine: max(s_max/2 cos(2 pi p) + s_max/2, 1)
    ("cosine", 100.0, 0.0, 100.0),
    ("cosine", 100.0, 1.0, 100.0),
    ("cosine", 100.0, 0.25, 50.0),
    ("cosine", 100.0, 0.5, 1.0),  # 0, floored at 1
    ("cosine", 100.0, 0.4, 50.0 * math.cos(2 * math.pi * 0.4) + 50.0),
    ("cosine", 100.0, 0.49, 1.0),  # 0.0987, floored at 1
    ("cosine", 100.0, 1 / 3, 25.0),
    # exponential (hat-cl): s_max ** ((p - 1 + 0.8) / 0.8)
    ("exponential", 100.0, 1.0, 100.0),
    ("exponential", 100.0, 0.2, 1.0),
    ("exponential", 100.0, 0.0, 100.0 ** -0.25),
    ("exponential", 100.0, 0.6, 100.0 ** 0.5),
    ("exponential", 16.0, 0.0, 0.5),
    # constant
    ("constant", 100.0, 0.0, 100.0),
    ("constant", 37.0, 0.7, 37.0),
])
def test_mask_scale_schedules(strat, s_max, progress, expected):
    got = get_hat_mask_scale(strat, s_max, progress)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("strat", ["linear", "exponential"])
def test_mask_scale_increases_through_the_epoch(strat):
    scales = [get_hat_mask_scale(strat, 100.0, b / 9) for b in range(10)]
    assert scales == sorted(scales) and len(set(scales)) == 10
    assert scales[-1] == pytest.approx(100.0)


def test_mask_scale_accepts_integers_and_numpy():
    import numpy as np

    assert get_hat_mask_scale("linear", 100, 1) == pytest.approx(100.0)
    assert get_hat_mask_scale("linear", np.float32(10.0), np.float64(0.5)) == pytest.approx(0.1 + 9.9 * 0.5)


# -- the mask regularizer -----------------------------------------------------------------------------
NUM_TASKS = 3
# embeddings set by hand: layer 1 has 4 units, layer 2 has 2 units
E1 = [[0.0, 1.0, -1.0, 2.0],  # task 0 uses units 1 and 3 (0.0 is off: the hard mask is e > 0)
      [0.5, -0.5, 1.5, -2.0],
      [-3.0, -3.0, 0.25, 3.0]]
E2 = [[1.0, -1.0],  # task 0 uses unit 0
      [-0.5, 0.25],
      [0.75, 0.75]]
USED0 = ([1, 3], [0])  # units task 0 uses, per layer
UNITS = (4, 2)


def tiny_model() -> nn.Module:
    cfg = HATConfig(num_tasks=NUM_TASKS)
    model = nn.Sequential(HATLinear(3, 4, cfg), nn.ReLU(), HATLinear(4, 2, cfg))
    with torch.no_grad():
        model[0].task_embedding.copy_(torch.tensor(E1))
        model[2].task_embedding.copy_(torch.tensor(E2))
    return model


def masks(task: int, scale: float | None) -> tuple[list[float], list[float]]:
    def m(e: float) -> float:
        return float(e > 0) if scale is None else sig(scale * e)

    return [m(e) for e in E1[task]], [m(e) for e in E2[task]]


def by_hand(task: int, scale: float | None, strat: str, forgive: bool,
            used_by_others: tuple[list[int], list[int]]) -> float:
    used, free = [], []
    for a, units, taken in zip(masks(task, scale), UNITS, used_by_others):
        free_units = [i for i in range(units) if i not in taken]
        u = sum(a[i] for i in free_units)
        if strat == "uniform" and forgive:
            u = max(u - units / NUM_TASKS, 0.0)
        used.append(u)
        free.append(len(free_units))
    if strat == "paper":
        return sum(used) / sum(free)
    return sum(u / f for u, f in zip(used, free)) / len(used)


NOTHING_TRAINED = ([], [])
CASES = [("uniform", False), ("uniform", True), ("paper", False), ("paper", True)]


@pytest.mark.parametrize("strat, forgive", CASES)
@pytest.mark.parametrize("task", [0, 1, 2])
@pytest.mark.parametrize("scale", [2.0, 0.5, None])
def test_reg_term_nothing_trained(strat, forgive, task, scale):
    reg = get_hat_reg_term(tiny_model(), strat=strat, task_id=task, mask_scale=scale, forgive_quota=forgive)
    assert reg.dim() == 0
    assert reg.item() == pytest.approx(by_hand(task, scale, strat, forgive, NOTHING_TRAINED), rel=1e-6, abs=1e-7)


def test_reg_term_values_written_out():
    """Two of the values above, expanded all the way, so the helper itself is checked too."""
    model = tiny_model()
    a1 = [sig(1.0), sig(-1.0), sig(3.0), sig(-4.0)]  # task 1 at s = 2
    a2 = [sig(-1.0), sig(0.5)]
    assert get_hat_reg_term(model, "uniform", 1, 2.0, forgive_quota=False).item() == pytest.approx(
        (sum(a1) / 4 + sum(a2) / 2) / 2, rel=1e-6)
    assert get_hat_reg_term(model, "paper", 1, 2.0).item() == pytest.approx((sum(a1) + sum(a2)) / 6, rel=1e-6)
    assert get_hat_reg_term(model, "uniform", 1, 2.0).item() == pytest.approx(
        (max(sum(a1) - 4 / 3, 0) / 4 + max(sum(a2) - 2 / 3, 0) / 2) / 2, rel=1e-6)
    hat.mark_trained(model, 0)  # units 1, 3 of layer 1 and unit 0 of layer 2 are no longer free
    assert get_hat_reg_term(model, "uniform", 1, 2.0, forgive_quota=False).item() == pytest.approx(
        ((a1[0] + a1[2]) / 2 + a2[1] / 1) / 2, rel=1e-6)
    assert get_hat_reg_term(model, "paper", 1, 2.0).item() == pytest.approx((a1[0] + a1[2] + a2[1]) / 3, rel=1e-6)
    # with the quota: layer 2's single free unit is within task 1's share of 2/3 unit, so it is 0
    assert a2[1] < 2 / 3
    assert get_hat_reg_term(model, "uniform", 1, 2.0).item() == pytest.approx(
        (max(a1[0] + a1[2] - 4 / 3, 0) / 2 + 0.0) / 2, rel=1e-6)


@pytest.mark.parametrize("strat, forgive", CASES)
@pytest.mark.parametrize("task", [1, 2])
@pytest.mark.parametrize("scale", [2.0, None])
def test_reg_term_after_task_0_trained(strat, forgive, task, scale):
    model = tiny_model()
    before = get_hat_reg_term(model, strat=strat, task_id=task, mask_scale=scale, forgive_quota=forgive).item()
    hat.mark_trained(model, 0)
    reg = get_hat_reg_term(model, strat=strat, task_id=task, mask_scale=scale, forgive_quota=forgive)
    assert reg.item() == pytest.approx(by_hand(task, scale, strat, forgive, USED0), rel=1e-6, abs=1e-7)
    if scale is not None and not (strat == "uniform" and forgive):
        assert reg.item() != pytest.approx(before)


@pytest.mark.parametrize("strat, forgive", CASES)
def test_reg_term_of_a_trained_task_ignores_its_own_units(strat, forgive):
    """Task 0's own used units do not count as taken when task 0's term is computed."""
    model = tiny_model()
    before = get_hat_reg_term(model, strat=strat, task_id=0, mask_scale=2.0, forgive_quota=forgive)
    hat.mark_trained(model, 0)
    after = get_hat_reg_term(model, strat=strat, task_id=0, mask_scale=2.0, forgive_quota=forgive)
    assert after.item() == pytest.approx(before.item(), rel=1e-7)
    # two other tasks trained: units used by either are taken
    hat.mark_trained(model, 2)
    taken = (sorted(set(USED0[0]) | {2, 3}), sorted(set(USED0[1]) | {0, 1}))
    assert taken[1] == [0, 1]  # layer 2 has no free unit left
    reg = get_hat_reg_term(model, strat=strat, task_id=1, mask_scale=2.0, forgive_quota=forgive)
    a1, _ = masks(1, 2.0)
    free1 = [i for i in range(4) if i not in taken[0]]
    assert free1 == [0]
    if strat == "paper":
        want = a1[0] / 1
    else:  # a layer without free units adds used = 0 (with free clamped to 1)
        u1 = max(a1[0] - 4 / 3, 0.0) if forgive else a1[0]
        want = (u1 / 1 + 0.0) / 2
    assert reg.item() == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_reg_term_gradient_reaches_only_the_task_row():
    model = tiny_model()
    hat.mark_trained(model, 0)
    reg = get_hat_reg_term(model, strat="paper", task_id=1, mask_scale=2.0)
    assert reg.requires_grad
    reg.backward()
    for layer in (model[0], model[2]):
        grad = layer.task_embedding.grad
        assert torch.equal(grad[0], torch.zeros_like(grad[0]))
        assert torch.equal(grad[2], torch.zeros_like(grad[2]))
        # free units are pushed down (a larger mask costs more); units taken by task 0 are not
        free = [i for i in range(grad.shape[1]) if layer.task_embedding[0, i] <= 0]
        assert (grad[1, free] > 0).all()
        taken = [i for i in range(grad.shape[1]) if layer.task_embedding[0, i] > 0]
        assert torch.equal(grad[1, taken], torch.zeros(len(taken)))


def test_reg_term_default_arguments_are_hat_cl_s():
    """hat-cl's defaults: strat "uniform", forgive_quota=True."""
    model = tiny_model()
    assert get_hat_reg_term(model, task_id=1, mask_scale=2.0).item() == pytest.approx(
        by_hand(1, 2.0, "uniform", True, NOTHING_TRAINED), rel=1e-6)


def test_reg_term_without_masked_layers_is_zero():
    reg = get_hat_reg_term(nn.Sequential(nn.Linear(2, 2), TaskIndexedLinear(NUM_TASKS, 2, 2)),
                           task_id=0, mask_scale=1.0)
    assert reg.dim() == 0 and reg.item() == 0.0


def test_reg_term_covers_convolutions_in_a_network():
    """In a CNN every masked layer counts, conv channels included (units = channels)."""
    cfg = HATConfig(num_tasks=2)
    model = nn.ModuleDict({
        "conv": HATConv2d(1, 3, 3, cfg), "bn": TaskIndexedBatchNorm2d(2, 3), "fc": HATLinear(5, 2, cfg),
    })
    with torch.no_grad():
        model["conv"].task_embedding.copy_(torch.tensor([[1.0, -1.0, 0.5], [0.2, 0.3, -0.4]]))
        model["fc"].task_embedding.copy_(torch.tensor([[-1.0, 2.0], [1.0, 1.0]]))
    scale = 3.0
    conv = [sig(scale * e) for e in (0.2, 0.3, -0.4)]
    fc = [sig(scale * e) for e in (1.0, 1.0)]
    assert get_hat_reg_term(model, "paper", 1, scale).item() == pytest.approx((sum(conv) + sum(fc)) / 5, rel=1e-6)
    hat.mark_trained(model, 0)  # task 0: conv channels 0, 2 and fc unit 1
    assert get_hat_reg_term(model, "paper", 1, scale).item() == pytest.approx((conv[1] + fc[0]) / 2, rel=1e-6)
    assert get_hat_reg_term(model, "uniform", 1, scale, forgive_quota=False).item() == pytest.approx(
        (conv[1] / 1 + fc[0] / 1) / 2, rel=1e-6)


def test_reg_term_matches_the_mask_a_forward_uses():
    """The regularizer sees the same soft mask as the forward pass of that task and scale."""
    model = tiny_model()
    scale = 1.5
    p = model[0](HATPayload(torch.ones(1, 3), task_id=1, mask_scale=scale))
    mask = p.data / nn.Linear.forward(model[0], torch.ones(1, 3))
    reg = get_hat_reg_term(nn.Sequential(model[0]), "paper", 1, scale)
    assert reg.item() == pytest.approx(mask.sum().item() / 4, rel=1e-5)


@pytest.mark.parametrize("strat, forgive", CASES)
def test_reg_term_after_a_training_forward_equals_the_per_layer_one(strat, forgive):
    """After a training forward, the regularizer reuses that forward's masks (one node for the
    model): same value and same embedding gradients as each layer computing its own."""
    import copy

    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=10)  # a small quota per task: the forgiven part leaves some regularizer
    model = nn.Sequential(HATLinear(5, 12, cfg), nn.ReLU(), HATLinear(12, 7, cfg)).double()
    hat.mark_trained(model, 3)
    twin = copy.deepcopy(model)  # a config of its own: no forward has taken its masks
    x = torch.randn(3, 5, dtype=torch.float64)

    def forward(m: nn.Module) -> torch.Tensor:
        p = HATPayload(x, task_id=1, mask_scale=4.0)
        return m[2](m[0](p).forward_by(m[1])).data.sum()

    forward(model)  # layers join their config's group at their first forward; from the next one on, one node
    regs = []
    for m, reg_first in ((model, False), (twin, True)):
        if reg_first:  # before the forward: each layer computes its own mask
            reg = get_hat_reg_term(m, strat=strat, task_id=1, mask_scale=4.0, forgive_quota=forgive)
            out = forward(m)
        else:
            out = forward(m)
            reg = get_hat_reg_term(m, strat=strat, task_id=1, mask_scale=4.0, forgive_quota=forgive)
            # the forward's one mask node, not nodes of the regularizer's own
            assert _mask_nodes(reg) == _mask_nodes(out) and len(_mask_nodes(out)) == 1
        (out + 10 * reg).backward()
        regs.append(reg)
    assert regs[0].item() > 0
    torch.testing.assert_close(regs[0], regs[1], rtol=1e-12, atol=1e-15)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)


def _mask_nodes(t: torch.Tensor) -> set:
    """The mask nodes (``GroupMaskBackward``) ``t`` was computed through."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return {n for n in seen if type(n).__name__ == "GroupMaskBackward"}
