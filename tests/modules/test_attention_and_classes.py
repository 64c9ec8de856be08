"""``nn.MultiheadAttention``, per-task parameters of other modules (torchvision's ViT tokens), the
classes ``hat.convert`` derives for subclasses of the torch layers (timm's Conv2dSame, StdConv2d,
ScaledStdConv2d), pickling such a model into a new process, and ``hat.coverage``.

Real torch, timm and torchvision modules trained on the digits; the references are the model
before, the rows of its parameters, and the plain model ``hat.unconvert`` gives back.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm.layers as tl
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.vision_transformer import Encoder

import hat
from hat import HATConfig
from hat.masks.units import UnitMap
from hat.modules import HATConv2d, HATLinear, HATMultiheadAttention

from helpers import eval_logits, tensor_forward, train_task

NUM_TASKS = 2
EMBED = 16
REPO = Path(__file__).resolve().parents[2]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, data: tuple, t: int, *, n: int = 128, epochs: int = 2,
           batch_size: int = 32, prep=lambda x: x) -> None:
    """HAT's training loop (tests/helpers.py): the mask scale annealed 1/s_max -> s_max in each epoch,
    the regularizer; the task selected with hat.set_task."""
    train_task(model, optimizer, prep(data[0][:n]), data[1][:n], t, epochs=epochs, batch_size=batch_size,
               forward=tensor_forward)


def _eval(model: nn.Module, x: torch.Tensor, t: int) -> torch.Tensor:
    logits = eval_logits(model, x, t, forward=tensor_forward)
    model.eval()  # as the callers expect after an evaluation
    return logits


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    # one optimizer for the whole task sequence, with decoupled weight decay on every parameter
    return torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.05)


# -- 1. nn.MultiheadAttention ------------------------------------------------------------------------
class RowAttention(nn.Module):
    """The 8 rows of a digit as 8 tokens of 8 features, projected to EMBED, one self-attention layer,
    a residual, mean over tokens, a linear head. ``kdim`` other than EMBED: the raw rows are the keys
    and values."""

    def __init__(self, **mha_kwargs) -> None:
        super().__init__()
        self.embed = nn.Linear(8, EMBED)
        self.attn = nn.MultiheadAttention(EMBED, 2, batch_first=True, **mha_kwargs)
        self.fc = nn.Linear(EMBED, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(1, 2)  # [N, 1, 8, 8] -> [N, 8 tokens, 8 features]
        tokens = self.embed(rows)
        kv = tokens if self.attn._qkv_same_embed_dim else rows
        out, _ = self.attn(tokens, kv, kv, need_weights=False)
        return self.fc(F.relu(out + tokens).mean(1))


def test_multihead_attention_converts_with_an_out_proj_reading_the_value_units():
    model = hat.convert(RowAttention(), HATConfig(num_tasks=NUM_TASKS))
    attn = model.attn
    assert type(attn) is HATMultiheadAttention
    assert isinstance(attn.out_proj, HATLinear)
    assert attn.task_embedding.shape == (NUM_TASKS, 3 * EMBED)  # one unit per query, key and value output
    link = attn.out_proj._hat_link
    assert isinstance(link, UnitMap) and link.size == EMBED
    (part,) = link.parts  # out_proj reads the heads' outputs: the value units 2E..3E of the attention
    assert part.source is attn
    assert torch.equal(part.index, torch.arange(2 * EMBED, 3 * EMBED))


def test_multihead_attention_keeps_task_0_exact_and_unconverts_to_torch_attention(digit_tasks):
    torch.manual_seed(0)
    model = hat.convert(RowAttention(), HATConfig(num_tasks=NUM_TASKS))
    optimizer = _adamw(model)
    probe = digit_tasks[0][2][:64]
    _train(model, optimizer, digit_tasks[0], 0)
    task0 = _eval(model, probe, 0)
    assert (task0.argmax(1) == digit_tasks[0][3][:64]).float().mean() > 0.8  # it learned something
    _train(model, optimizer, digit_tasks[1], 1)
    assert not torch.equal(_eval(model, probe, 1), task0)
    assert torch.equal(_eval(model, probe, 0), task0)

    for t in (0, 1):
        plain = hat.unconvert(model, t)
        assert type(plain.attn) is nn.MultiheadAttention
        assert not hat.tracking.tracked.task_modules(plain)
        plain.eval()
        with torch.no_grad():
            got = plain(probe)  # torch's fast path in eval: its own kernels, equal up to the last bits
        torch.testing.assert_close(got, _eval(model, probe, t), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mha_kwargs", [{"add_bias_kv": True}, {"kdim": 8, "vdim": 8}], ids=["add_bias_kv", "kdim"])
def test_multihead_attention_it_does_not_cover_stays_plain_and_coverage_says_so(digit_tasks, mha_kwargs):
    torch.manual_seed(0)
    model = hat.convert(RowAttention(**mha_kwargs), HATConfig(num_tasks=NUM_TASKS))
    assert type(model.attn) is nn.MultiheadAttention
    assert type(model.embed) is HATLinear  # the rest converts
    model.eval()
    with pytest.warns(UserWarning, match="attn"), torch.no_grad(), hat.task(model, 0):
        model(digit_tasks[0][2][:4])  # it still runs; the first call traces and warns of the plain layer
    report = {r.name: r for r in hat.coverage(model)}
    assert report["attn"].protection == "plain" and report["attn"].kind == "MultiheadAttention"
    assert report["embed"].protection != "plain"


# -- 2. torchvision's ViT: class token and position embedding per task ---------------------------------
def _vit_input(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=32, mode="nearest").expand(-1, 3, -1, -1)  # 8x8 digits as 32x32 RGB


def test_vit_class_token_and_position_embedding_are_per_task_and_only_the_trained_row_moves(digit_tasks):
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=2)
    token, pos = model.class_token.detach().clone(), model.encoder.pos_embedding.detach().clone()
    hat.convert(model, HATConfig(num_tasks=NUM_TASKS))
    rows = {"class_token": (model, token), "pos_embedding": (model.encoder, pos)}
    for name, (owner, original) in rows.items():
        stacked = owner._parameters[name]
        assert stacked.shape == (NUM_TASKS + 1, *original.shape), name
        assert all(torch.equal(stacked[k], original) for k in range(NUM_TASKS + 1)), name  # every row starts equal
        assert getattr(owner, name).shape == original.shape  # the module's own forward reads one row
    assert isinstance(model, VisionTransformer)  # still the torchvision class

    optimizer = _adamw(model)
    probe = _vit_input(digit_tasks[0][2][:32])
    _train(model, optimizer, digit_tasks[0], 0, n=96, prep=_vit_input)
    task0 = _eval(model, probe, 0)
    before = {name: owner._parameters[name].detach().clone() for name, (owner, _) in rows.items()}
    _train(model, optimizer, digit_tasks[1], 1, n=96, prep=_vit_input)
    for name, (owner, _) in rows.items():
        after = owner._parameters[name].detach()
        assert torch.equal(after[0], before[name][0]), f"{name}: task 0's row moved"
        assert torch.equal(after[NUM_TASKS], before[name][NUM_TASKS]), f"{name}: the no-task row moved"
        assert not torch.equal(after[1], before[name][1]), f"{name}: task 1's row did not train"
    assert torch.equal(_eval(model, probe, 0), task0)

    plain = hat.unconvert(model, 0)  # the torchvision classes again, with task 0's rows
    assert type(plain) is VisionTransformer and type(plain.encoder) is Encoder
    assert torch.equal(plain._parameters["class_token"], before["class_token"][0])
    assert torch.equal(plain.encoder._parameters["pos_embedding"], before["pos_embedding"][0])
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(probe), task0, atol=1e-5, rtol=0)  # torch's attention fast path


# -- 3. subclasses of the torch layers ----------------------------------------------------------------
def timm_conv_net() -> nn.Sequential:
    """timm's 'same'-padded and weight-standardized convolutions on 1x8x8 digits."""
    return nn.Sequential(
        tl.Conv2dSame(1, 16, 3, stride=2), nn.ReLU(),  # 8x8 -> 4x4
        tl.StdConv2d(16, 16, 3, padding=1), nn.ReLU(),
        tl.ScaledStdConv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 2),
    )


def test_timm_conv_subclasses_convert_to_classes_deriving_from_both(digit_tasks):
    torch.manual_seed(0)
    plain = timm_conv_net()
    model = hat.convert(copy.deepcopy(plain), HATConfig(num_tasks=NUM_TASKS))
    for i, cls in [(0, tl.Conv2dSame), (2, tl.StdConv2d), (4, tl.ScaledStdConv2d)]:
        assert isinstance(model[i], HATConv2d) and isinstance(model[i], cls), type(model[i])
        assert type(model[i]) is not HATConv2d and type(model[i]) is not cls
    assert "gain" in model[4]._hat_unit_params  # ScaledStdConv2d's per-unit gain is protected with its unit
    x = digit_tasks[0][2][:8]
    with torch.no_grad():
        h = F.relu(plain[0](x))
        with hat.task(model.eval(), 0):
            out = model(x)
            got_same, got_std = model[0](x), model[2](h)
        # each class's own forward runs ("same" padding, weight standardization), then the mask
        assert torch.equal(got_same, plain[0](x) * model[0].get_mask(0).view(1, -1, 1, 1))
        assert torch.equal(got_std, plain[2](h) * model[2].get_mask(0).view(1, -1, 1, 1))
    assert out.shape == (8, 2)
    report = {r.name: r for r in hat.coverage(model)}
    assert report["0"].protection == "unit"
    for name in ("2", "4"):
        assert report[name].protection == "rows"
        assert "weight standardization" in report[name].reason

    back = hat.unconvert(model, 0)  # timm's classes again, the mask folded into weight, bias and gain
    assert [type(m) for m in back] == [type(m) for m in plain]
    with torch.no_grad():
        assert torch.equal(back.eval()(x), out)


def test_scaled_std_conv_gain_changes_only_on_units_no_earlier_task_uses(digit_tasks):
    torch.manual_seed(0)
    model = hat.convert(timm_conv_net(), HATConfig(num_tasks=NUM_TASKS))
    optimizer = _adamw(model)
    probe = digit_tasks[0][2][:64]
    _train(model, optimizer, digit_tasks[0], 0)
    task0 = _eval(model, probe, 0)
    conv = model[4]
    gain, weight = conv.gain.detach().clone(), conv.weight.detach().clone()
    used = conv.get_mask(0).bool()
    assert used.any() and not used.all(), "task 0 should leave some of the 16 units free"
    _train(model, optimizer, digit_tasks[1], 1)
    assert torch.equal(conv.gain[used], gain[used])  # task 0's units: gain and whole weight rows untouched
    assert torch.equal(conv.weight[used], weight[used])
    assert not torch.equal(conv.gain[~used], gain[~used])  # the free units trained (and decayed)
    assert torch.equal(_eval(model, probe, 0), task0)


# -- 4. pickling a model with derived classes into a new process ----------------------------------------
CHILD = """
import torch
model = torch.load("model.pt", weights_only=False)  # neither hat nor timm imported yet: the pickle imports them
x, expected = torch.load("probe.pt")
names = [type(m).__name__ for m in model]
assert names[0].startswith("HATConv2d__") and names[2].startswith("TaskParameters__"), names
import hat
import timm.layers
assert isinstance(model[0], timm.layers.Conv2dSame) and isinstance(model[0], hat.modules.HATConv2d)
assert isinstance(model[3], timm.layers.StdConv2d)
model.eval()
with torch.no_grad(), hat.task(model, 0):
    out = model(x)
assert torch.equal(out, expected), (out - expected).abs().max()
plain = hat.unconvert(model, 0).eval()
assert type(plain[0]) is timm.layers.Conv2dSame and type(plain[2]) is timm.layers.LayerScale2d
with torch.no_grad():
    assert torch.equal(plain(x), expected)
print("loaded-ok")
"""


def test_a_pickled_model_with_derived_classes_loads_in_a_new_process(digit_tasks, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        tl.Conv2dSame(1, 8, 3, stride=2),  # HATConv2d__timm...Conv2dSame
        tl.BatchNormAct2d(8),
        tl.LayerScale2d(8, init_values=0.5),  # its gamma per task: TaskParameters__timm...LayerScale2d__gamma
        tl.StdConv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 2),
    )
    hat.convert(model, HATConfig(num_tasks=NUM_TASKS))
    _train(model, _adamw(model), digit_tasks[0], 0, n=64, epochs=1)
    x = digit_tasks[0][2][:16]
    expected = _eval(model, x, 0)
    torch.save(model, tmp_path / "model.pt")
    torch.save((x, expected), tmp_path / "probe.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", CHILD], check=False, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("loaded-ok")


# -- 5. coverage of a conv that include= leaves plain --------------------------------------------------
def test_coverage_reports_a_conv_left_plain_by_include(digit_tasks):
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 2),
    )
    hat.convert(model, HATConfig(num_tasks=NUM_TASKS), include=["0", "5"])  # conv "2" stays plain
    assert type(model[2]) is nn.Conv2d
    model.eval()
    with pytest.warns(UserWarning, match="plain"), torch.no_grad(), hat.task(model, 0):
        model(digit_tasks[0][2][:4])
    report = {r.name: r for r in hat.coverage(model)}
    assert report["2"].protection == "plain" and report["2"].kind == "Conv2d"
    assert "not converted" in report["2"].reason
    assert report["0"].protection != "plain"
