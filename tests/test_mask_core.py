"""The mask and its gradient: the paper's formulas, computed independently here."""

from __future__ import annotations

import pytest
import torch

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
    expected = weights * scale * sig * (1 - sig) * 100.0 * (torch.cosh((scale * e).clamp(-50, 50)) + 1) / (scale * (torch.cosh(e) + 1))
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
