"""The mask and its gradient: the paper's formulas, computed independently here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hat
from hat import HATConfig, HATPayload
from hat.modules import HATLinear


@pytest.mark.parametrize("scale", [0.01, 1.0, 25.0, 400.0])
@pytest.mark.parametrize("gate", ["sigmoid", "custom"])
def test_embedding_gradient_is_compensated_as_in_the_paper(scale, gate):
    """grad_e = dL/dm * s * sigmoid'(s e) * s_max (cosh(clamp(s e)) + 1) / (s (cosh(e) + 1))."""
    torch.manual_seed(0)
    # any other callable takes the generic path (autograd through the gate); both must agree
    fn = torch.sigmoid if gate == "sigmoid" else (lambda z: torch.sigmoid(z))
    cfg = HATConfig(num_tasks=2, gate=fn, grad_comp_factor=100.0, grad_comp_clamp=50.0)
    layer = HATLinear(4, 64, cfg).double()
    weights = torch.randn(64, dtype=torch.float64)
    mask = layer.get_mask(1, scale)
    (mask * weights).sum().backward()
    e = layer.task_embedding.detach()[1]
    sig = torch.sigmoid(scale * e)
    expected = (weights * scale * sig * (1 - sig) * 100.0 * (torch.cosh((scale * e).clamp(-50, 50)) + 1)
                / (scale * (torch.cosh(e) + 1)))
    torch.testing.assert_close(layer.task_embedding.grad[1], expected, rtol=1e-6, atol=1e-9)
    assert torch.count_nonzero(layer.task_embedding.grad[0]) == 0  # other tasks' rows get nothing


def test_tiny_soft_masks_are_exact_zeros_but_keep_their_gradient():
    cfg = HATConfig(num_tasks=1)
    layer = HATLinear(3, 4, cfg)
    with torch.no_grad():
        layer.task_embedding.copy_(torch.tensor([[-5.0, -0.2, 0.1, 5.0]]))
    mask = layer.get_mask(0, 100.0)  # sigmoid(-500), sigmoid(-20), sigmoid(10), sigmoid(500)
    assert mask[0].item() == 0.0 and mask[1].item() == 0.0  # below 1e-6: off, no subnormals downstream
    assert 0.9999 < mask[2].item() < 1 and mask[3].item() == 1.0
    mask.sum().backward()
    assert layer.task_embedding.grad[0, 1] > 0  # sigmoid(-20) is 2e-9: flushed, yet it can still learn


def test_hard_mask_is_the_sign_of_the_embedding():
    cfg = HATConfig(num_tasks=2)
    layer = HATLinear(3, 5, cfg).eval()
    with torch.no_grad():
        layer.task_embedding.copy_(torch.tensor([[-1.0, 0.0, 1e-6, 3.0, -2.0], [1.0, 1.0, 1.0, 1.0, 1.0]]))
    assert torch.equal(layer.get_mask(0), torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]))
    out = layer(HATPayload(torch.randn(2, 3), task_id=0)).data
    assert torch.equal(out[:, [0, 1, 4]], torch.zeros(2, 3))


def test_payload_conv_and_batchnorm_report_their_task_with_frozen_embeddings(digit_tasks):
    # the norm folds the conv's pending mask and leaves the report to the conv; with frozen
    # embeddings the conv reports through its output. Nothing else here reports a task.
    import hat
    from hat.modules import HATConv2d, TaskIndexedBatchNorm2d

    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=2)
    conv, norm = HATConv2d(1, 8, 3, cfg, padding=1), TaskIndexedBatchNorm2d(2, 8)
    conv.task_embedding.requires_grad_(False)
    head = torch.nn.Linear(8, 2)
    model = torch.nn.ModuleList([conv, norm, head])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x, y = digit_tasks[0][0][:64], digit_tasks[0][1][:64]
    for _ in range(3):
        p = norm(conv(HATPayload(x, task_id=0, mask_scale=10.0))).forward_by(torch.nn.ReLU())
        logits = head(p.data.mean((2, 3)))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(logits, y).backward()
        optimizer.step()
    assert hat.trained_tasks(model) == [0]
    assert bool(conv.hat_trained[0]) and bool(norm.hat_trained[0])


class _TwoLayers(torch.nn.Module):
    def __init__(self, cfg: HATConfig) -> None:
        super().__init__()
        self.fc1, self.fc2 = HATLinear(6, 16, cfg), HATLinear(16, 5, cfg)

    def forward(self, p: HATPayload) -> HATPayload:
        return self.fc2(self.fc1(p).forward_by(torch.nn.ReLU()))


def _by_hand(model: _TwoLayers, x: torch.Tensor, task: int, scale: float) -> torch.Tensor:
    """The same forward with each layer's mask taken on its own (``get_mask``: one node per layer)."""
    fc1, fc2 = model.fc1, model.fc2
    h = torch.relu(torch.nn.functional.linear(x, fc1.weight, fc1.bias) * fc1.get_mask(task, scale))
    return torch.nn.functional.linear(h, fc2.weight, fc2.bias) * fc2.get_mask(task, scale)


def test_the_masks_of_a_forward_are_computed_together_with_each_layers_own_gradient():
    """A training forward computes the soft masks of all layers of one config in one node; values
    and gradients are those of each layer's own mask."""
    import copy

    torch.manual_seed(0)
    model = _TwoLayers(HATConfig(num_tasks=3)).double()
    twin = copy.deepcopy(model)
    x, w = torch.randn(7, 6, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    out = model(HATPayload(x, task_id=1, mask_scale=25.0)).data
    ref = _by_hand(twin, x, 1, 25.0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-300, msg=name)
    assert torch.count_nonzero(model.fc1.task_embedding.grad[[0, 2]]) == 0


def test_shared_masks_are_reused_until_an_embedding_changes():
    torch.manual_seed(0)
    model = _TwoLayers(HATConfig(num_tasks=2)).double()
    x = torch.randn(4, 6, dtype=torch.float64)

    def loss() -> torch.Tensor:
        return model(HATPayload(x, task_id=0, mask_scale=10.0)).data.square().sum()

    loss().backward()
    once = [p.grad.clone() for p in model.parameters()]
    loss().backward()  # accumulating over two backwards reuses the masks: no "backward twice" error
    for p, g in zip(model.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g)
    with torch.no_grad():
        model.fc2.task_embedding.mul_(-1.0)  # changed in place, no optimizer step: the masks follow
        expected = _by_hand(model, x, 0, 10.0).square().sum()
    assert loss().item() == pytest.approx(expected.item(), rel=1e-12)


def test_a_layer_not_in_a_forward_gets_no_gradient():
    torch.manual_seed(0)
    model = _TwoLayers(HATConfig(num_tasks=2))
    x = torch.randn(4, 6)
    model(HATPayload(x, task_id=1, mask_scale=10.0)).data.sum().backward()  # both layers share one node now
    model.zero_grad(set_to_none=True)
    model.fc1(HATPayload(x, task_id=1, mask_scale=10.0)).data.sum().backward()
    assert model.fc1.task_embedding.grad is not None
    assert model.fc2.task_embedding.grad is None and model.fc2.weight.grad is None


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_segments_get_the_gradients_of_a_plain_backward(reentrant):
    """Recomputed inside the backward (torch.utils.checkpoint, both kinds), a segment reuses the
    forward's masks; reentrant recomputation runs the shared mask node's backward again."""
    import copy

    from torch.utils.checkpoint import checkpoint

    import hat

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3))
    model = hat.convert(plain, HATConfig(num_tasks=2)).double()
    twin = copy.deepcopy(model)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=reentrant)
    for m in (model, twin):
        hat.set_task(m, 1, mask_scale=20.0)
    head = checkpoint(model[:2], x, use_reentrant=reentrant)
    model[2:](head).square().sum().backward()
    twin(x.detach()).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-300, msg=name)


def test_a_deleted_model_is_freed_though_its_config_lives_on():
    import gc
    import weakref

    cfg = HATConfig(num_tasks=2)  # kept, as a module-level config would be
    model = _TwoLayers(cfg)
    model(HATPayload(torch.randn(3, 6), task_id=0, mask_scale=5.0)).data.sum().backward()
    embedding = weakref.ref(model.fc1.task_embedding)
    del model
    gc.collect()
    assert embedding() is None


def test_set_task_writes_the_task_buffers_only_when_their_value_changes():
    model = hat.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), HATConfig(num_tasks=3))
    layer = model[0]
    hat.set_task(model, 1, mask_scale=2.0)
    versions = layer.hat_task._version, layer.hat_scale._version
    hat.set_task(model, 1, mask_scale=2.0)  # the same selection: no write (an op per module and step)
    assert (layer.hat_task._version, layer.hat_scale._version) == versions
    hat.set_task(model, 2, mask_scale=3.0)
    assert int(layer.hat_task) == 2 and float(layer.hat_scale) == 3.0
    layer.hat_task.fill_(0)  # written by someone else: the next selection writes again
    hat.set_task(model, 2, mask_scale=3.0)
    assert int(layer.hat_task) == 2
    layer._buffers["hat_scale"] = torch.zeros(())  # replaced (as .to() replaces buffers): written again
    hat.set_task(model, 2, mask_scale=3.0)
    assert float(layer.hat_scale) == 3.0
    hat.set_task(model, None)
    assert int(layer.hat_task) == 3 and float(layer.hat_scale) == 0.0


def test_masks_are_recomputed_after_a_fused_step_under_a_dispatch_mode():
    # fused AdamW writes the embeddings without bumping their version counters, and under a
    # TorchDispatchMode (FlopCounterMode, say) the foreach clamps of the step do not either:
    # the masks cached before the step must not be served after it
    import copy

    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = hat.convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), HATConfig(num_tasks=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    x, y = torch.rand(32, 8), torch.randint(0, 2, (32,))
    with Passthrough():
        for _ in range(3):
            hat.set_task(model, 0, mask_scale=5.0)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        out = model(x)
    twin = copy.deepcopy(model)  # its own config, so no cached mask
    hat.set_task(twin, 0, mask_scale=5.0)
    assert torch.equal(out, twin(x))
