"""HATConfig: hat-cl's defaults, the mapping protocol, and settings that change what layers do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hat import HATConfig, HATPayload
from hat.modules import HATConv2d, HATLinear

FIELDS = ["num_tasks", "mask_dim", "init_strat", "max_trn_mask_scale", "attn_clamp", "grad_comp_clamp",
          "grad_comp_factor", "gate"]


def test_defaults_are_hat_cl_s():
    cfg = HATConfig(num_tasks=5)
    assert cfg.num_tasks == 5
    assert cfg.mask_dim is None
    assert cfg.init_strat == "normal"
    assert cfg.max_trn_mask_scale == 100
    assert cfg.attn_clamp == 6
    assert cfg.grad_comp_clamp == 50
    assert cfg.grad_comp_factor == 100
    assert cfg.gate is torch.sigmoid


def test_num_tasks_positional():
    assert HATConfig(4) == HATConfig(num_tasks=4)


def test_unpacks_as_a_mapping():
    gate = torch.sigmoid
    cfg = HATConfig(num_tasks=3, mask_dim=1, init_strat="dense", max_trn_mask_scale=400.0, attn_clamp=5.0,
                    grad_comp_clamp=40.0, grad_comp_factor=400.0, gate=gate)
    as_dict = dict(cfg)
    assert list(as_dict) == FIELDS
    assert as_dict == {"num_tasks": 3, "mask_dim": 1, "init_strat": "dense", "max_trn_mask_scale": 400.0,
                       "attn_clamp": 5.0, "grad_comp_clamp": 40.0, "grad_comp_factor": 400.0, "gate": gate}
    assert HATConfig(**cfg) == cfg
    assert HATConfig(**dict(cfg)) == cfg
    assert len(cfg) == len(FIELDS)
    assert cfg["init_strat"] == "dense"
    assert "num_tasks" in cfg and "foo" not in cfg
    with pytest.raises(KeyError):
        cfg["foo"]

    def takes_kwargs(**kwargs):
        return kwargs

    assert takes_kwargs(**cfg) == as_dict
    # a copy with one field changed, the way users write it
    other = HATConfig(**{**cfg, "num_tasks": 7})
    assert other.num_tasks == 7 and other.init_strat == "dense"
    assert other != cfg


def test_equality_compares_every_field():
    assert HATConfig(num_tasks=2) == HATConfig(num_tasks=2)
    assert HATConfig(num_tasks=2) != HATConfig(num_tasks=3)
    assert HATConfig(num_tasks=2) != HATConfig(num_tasks=2, attn_clamp=5.0)


def test_numbers_become_floats():
    cfg = HATConfig(num_tasks=2, max_trn_mask_scale=400, attn_clamp=3)
    assert type(cfg.max_trn_mask_scale) is float and cfg.max_trn_mask_scale == 400.0
    assert type(cfg.attn_clamp) is float


# -- settings that change what layers do ----------------------------------------------------------------
def _embedding(layer: nn.Module, pattern: list[float]) -> None:
    with torch.no_grad():
        layer.task_embedding[0] = torch.tensor(pattern)


def test_mask_dim_override_changes_the_masked_dim():
    torch.manual_seed(0)
    pattern = [1.0, -1.0, 1.0, -1.0, 1.0]
    hard = torch.tensor(pattern) > 0
    x = torch.randn(5, 2, 3)  # dim 0 and the output's last dim both have 5 entries

    default = HATLinear(3, 5, HATConfig(num_tasks=2)).eval()
    _embedding(default, pattern)
    out = default(HATPayload(x, task_id=0)).data
    plain = nn.Linear.forward(default, x)
    assert default.mask_dim == -1
    assert torch.equal(out[..., hard], plain[..., hard])
    assert torch.equal(out[..., ~hard], torch.zeros_like(out[..., ~hard]))

    along0 = HATLinear(3, 5, HATConfig(num_tasks=2, mask_dim=0)).eval()
    along0.load_state_dict(default.state_dict())
    out0 = along0(HATPayload(x, task_id=0)).data
    assert along0.mask_dim == 0
    assert torch.equal(out0[hard], plain[hard])
    assert torch.equal(out0[~hard], torch.zeros_like(out0[~hard]))
    assert not torch.equal(out0, out)


def test_mask_dim_default_for_convolutions_is_channels():
    torch.manual_seed(1)
    conv = HATConv2d(2, 4, 3, HATConfig(num_tasks=2), padding=1).eval()
    _embedding(conv, [1.0, -1.0, -1.0, 1.0])
    assert conv.mask_dim == 1
    x = torch.randn(3, 2, 4, 4)
    out = conv(HATPayload(x, task_id=0)).data
    plain = nn.Conv2d.forward(conv, x)
    assert torch.equal(out[:, [0, 3]], plain[:, [0, 3]])
    assert torch.equal(out[:, [1, 2]], torch.zeros(3, 2, 4, 4))
    # channels-last layout: mask_dim=-1 masks the last dim instead
    last = HATConv2d(2, 4, 3, HATConfig(num_tasks=2, mask_dim=-1), padding=1).eval()
    last.load_state_dict(conv.state_dict())
    x = torch.randn(3, 2, 4, 4)
    out = last(HATPayload(x, task_id=0)).data
    plain = nn.Conv2d.forward(last, x)
    assert torch.equal(out[..., [0, 3]], plain[..., [0, 3]])
    assert torch.equal(out[..., [1, 2]], torch.zeros(3, 4, 4, 2))


@pytest.mark.parametrize("strat, on", [("dense", 1.0), ("sparse", 0.0)])
def test_init_strat(strat, on):
    layer = HATLinear(3, 50, HATConfig(num_tasks=4, init_strat=strat))
    assert torch.equal(layer.task_embedding, torch.full((4, 50), 1.0 if strat == "dense" else -1.0))
    for t in range(4):
        assert torch.equal(layer.get_mask(t), torch.full((50,), on))


def test_init_strat_normal():
    torch.manual_seed(2)
    layer = HATLinear(3, 1000, HATConfig(num_tasks=2))
    e = layer.task_embedding.detach()
    assert abs(e.mean().item()) < 0.1 and abs(e.std().item() - 1) < 0.1
    on = layer.get_mask(0).mean().item()
    assert 0.4 < on < 0.6


def test_gate_is_used_for_soft_masks():
    def hard_sigmoid(z: torch.Tensor) -> torch.Tensor:
        return (z / 4 + 0.5).clamp(0, 1)

    layer = HATLinear(3, 4, HATConfig(num_tasks=2, gate=hard_sigmoid))
    _embedding(layer, [1.0, -1.0, 0.25, -3.0])
    torch.testing.assert_close(layer.get_mask(0, 2.0), torch.tensor([1.0, 0.0, 0.625, 0.0]))
    # the hard mask is e > 0 whatever the gate
    assert torch.equal(layer.get_mask(0), torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_attn_clamp_bounds_embeddings_after_a_step():
    torch.manual_seed(3)
    layer = HATLinear(3, 8, HATConfig(num_tasks=2, attn_clamp=0.5))
    row0 = layer.task_embedding[0].detach().clone()
    assert row0.abs().max() > 0.5  # N(0, 1) init: the row of the other task is not clamped below
    opt = torch.optim.SGD(layer.parameters(), lr=100.0)
    x = torch.randn(16, 3)
    loss = layer(HATPayload(x, task_id=1, mask_scale=1.0)).data.sum()
    loss.backward()
    opt.step()
    e = layer.task_embedding.detach()
    assert e[1].abs().max().item() == pytest.approx(0.5)  # the huge step was clamped
    assert e[1].abs().max().item() <= 0.5
    assert torch.equal(e[0], row0)  # only the rows of the task being trained change


def test_grad_comp_factor_scales_embedding_gradients():
    """The compensation's s_max multiplies the embedding gradient (gradients of other
    parameters are untouched)."""
    grads = {}
    weights = {}
    for factor in (100.0, 400.0):
        torch.manual_seed(4)
        layer = HATLinear(3, 8, HATConfig(num_tasks=2, grad_comp_factor=factor))
        x = torch.randn(16, 3)
        layer(HATPayload(x, task_id=0, mask_scale=5.0)).data.square().sum().backward()
        grads[factor] = layer.task_embedding.grad[0].clone()
        weights[factor] = layer.weight.grad.clone()
    torch.testing.assert_close(grads[400.0], grads[100.0] * 4)
    assert torch.equal(weights[400.0], weights[100.0])
