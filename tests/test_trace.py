"""The first-call trace of a converted model (``hat/_trace.py``).

Each masked layer learns, position by position, which HAT layer's unit its input holds: through
concatenations (SqueezeNet's fire module), channel splits and shuffles (ShuffleNet), squeeze-excite
gates, attention (the value units reach the output projection), reshapes, slices and added or
multiplied parameters. The tests assert the exact links, what ``hat.coverage`` reports, and, on the
digits data, that the links found keep task 0's evaluation outputs bit-identical after task 1 trains.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hat
from hat import HATConfig
from hat.modules import TaskIndexedBatchNorm2d
from hat.utils import get_hat_reg_term

SCHEDULE = (1.0, 10.0, 100.0)  # a short mask-scale annealing, one block of steps per scale


# -- helpers -----------------------------------------------------------------------------------------
def _convert(model: nn.Module) -> nn.Module:
    return hat.convert(model, HATConfig(num_tasks=2))


def _trace(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Call the converted model once (its first call traces); the hat warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(x)
    return [str(w.message) for w in caught if str(w.message).startswith("hat")]


def _coverage(model: nn.Module) -> dict[str, hat.LayerCoverage]:
    return {r.name: r for r in hat.coverage(model)}


def _parts(link) -> list[tuple[nn.Module | None, list[int] | None]]:
    """A link's parts as (source, index as a list or None) for exact comparisons."""
    return [(p.source, None if p.index is None else p.index.tolist()) for p in link.parts]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, task: int,
           steps: int = 3, batch: int = 32) -> None:
    model.train()
    g = torch.Generator().manual_seed(task)
    for s in SCHEDULE:
        hat.set_task(model, task, mask_scale=s)
        for _ in range(steps):
            idx = torch.randint(len(x), (batch,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx]) + 0.75 * get_hat_reg_term(model, task_id=task, mask_scale=s)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@torch.no_grad()
def _eval(model: nn.Module, x: torch.Tensor, task: int) -> torch.Tensor:
    model.eval()
    with hat.task(model, task):
        return model(x)


def _task0_before_and_after_task1(model: nn.Module, digit_tasks) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train task 0, record its eval outputs, train task 1 with the same optimizer, evaluate task 0
    again. Also returns the parameters as they were between the two tasks."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.05)
    x0, y0, x0_test, _ = digit_tasks[0]
    _train(model, optimizer, x0, y0, 0)
    ref = _eval(model, x0_test, 0)
    between = {n: p.detach().clone() for n, p in model.named_parameters()}
    x1, y1, _, _ = digit_tasks[1]
    _train(model, optimizer, x1, y1, 1)
    return ref, _eval(model, x0_test, 0), between


def _assert_exact_and_not_vacuous(model: nn.Module, layer_name: str, ref: torch.Tensor, got: torch.Tensor,
                                  between: dict) -> None:
    layer = model.get_submodule(layer_name)
    # the check means something only if task 0 leaves some of the layer's input positions free
    # (per-unit protection, found through the link, is what keeps the rest) and task 1 did
    # change the layer's weights
    used = layer._hat_link.used(torch.tensor([True, False]))
    assert not bool(used.all()), "task 0 should leave some input positions of the layer unused"
    assert not torch.equal(between[f"{layer_name}.weight"], layer.weight), "task 1 should train the layer"
    assert torch.equal(ref, got)


# -- concatenation (SqueezeNet's fire module) -----------------------------------------------------
class Fire(nn.Module):
    """stem -> squeeze -> cat(expand 1x1 (3 channels), expand 3x3 (5 channels)) -> BatchNorm -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.e1 = nn.Conv2d(4, 3, 1)
        self.e3 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.squeeze(F.relu(self.stem(x))))
        y = F.relu(self.bn(torch.cat([self.e1(s), self.e3(s)], dim=1)))
        return self.head(F.relu(self.c(y)).mean((2, 3)))


def test_a_concatenation_places_each_branch_units_at_its_offset(digit_tasks):
    torch.manual_seed(0)
    model = _convert(Fire())
    assert _trace(model, digit_tasks[0][0][:4]) == []  # every layer traced per unit: nothing to warn about
    link = model.c._hat_link
    assert link.size == 8 and link.dense_reason is None
    assert _parts(link) == [
        (model.e1, [0, 1, 2, -1, -1, -1, -1, -1]),  # expand 1x1's 3 units first
        (model.e3, [-1, -1, -1, 0, 1, 2, 3, 4]),  # then expand 3x3's 5, from offset 3
    ]
    assert model.e1._hat_link.identity_of() is model.squeeze and model.e3._hat_link.identity_of() is model.squeeze
    assert {r.protection for r in hat.coverage(model)} == {"unit"}


def test_a_batchnorm_after_a_concatenation_masks_with_both_sources_and_none_defers_to_it(digit_tasks):
    torch.manual_seed(0)
    model = _convert(Fire())
    _trace(model, digit_tasks[0][0][:4])
    unit_map = model.bn._hat_unit_map
    assert unit_map is not None and unit_map.identity_of() is None
    assert unit_map.sources == (model.e1, model.e3)
    assert unit_map.same_as(model.c._hat_link)  # the norm passes the concatenation's units on
    # each branch is read by the concatenation, not by the norm alone: both mask their own output
    assert not model.e1._hat_defer and not model.e3._hat_defer
    # the norm turns a masked 0 into beta; its output must be 0 again wherever the branch that
    # holds the position does not use its unit (task 1's hard masks)
    out = {}
    model.bn.register_forward_hook(lambda m, i, o: out.__setitem__("bn", o))
    with torch.no_grad():
        model.bn.bias.normal_()  # a nonzero beta in every task row, so an unmasked 0 would show
    model.eval()
    with torch.no_grad(), hat.task(model, 1):
        model(digit_tasks[0][0][:8])
    off = torch.cat([model.e1.get_mask(1), model.e3.get_mask(1)]) == 0
    assert off.any() and not off.all(), "the normal initialisation leaves some units off"
    assert torch.equal(out["bn"][:, off].abs().sum(), torch.tensor(0.0))
    assert bool((out["bn"][:, ~off] != 0).any())


def test_a_concatenation_then_batchnorm_keeps_task_0_exact_after_task_1(digit_tasks):
    torch.manual_seed(0)
    model = _convert(Fire())
    ref, got, between = _task0_before_and_after_task1(model, digit_tasks)
    # the norm masks with the same map the protection reads, so a misplaced offset would stay
    # self-consistent (and exact): the link itself must be right too
    assert _parts(model.c._hat_link)[1][1] == [-1, -1, -1, 0, 1, 2, 3, 4]
    _assert_exact_and_not_vacuous(model, "c", ref, got, between)


# -- channel split and shuffle (ShuffleNet v2) ----------------------------------------------------
def _channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class Shuffle(nn.Module):
    """ShuffleNet v2's unit: half the channels pass, the other half goes through a branch, the halves
    are concatenated back and shuffled in 2 groups."""

    def __init__(self, split: str = "chunk") -> None:
        super().__init__()
        self.split = split
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.branch_bn = nn.BatchNorm2d(4)
        self.c = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.stem_bn(self.stem(x)))
        keep, other = s.chunk(2, dim=1) if self.split == "chunk" else torch.split(s, [4, 4], dim=1)
        y = torch.cat([keep, F.relu(self.branch_bn(self.branch(other)))], dim=1)
        return self.head(F.relu(self.c(_channel_shuffle(y, 2))).mean((2, 3)))


@pytest.mark.parametrize("split", ["chunk", "split"])
def test_a_channel_split_sends_the_second_half_of_the_units_to_the_branch(digit_tasks, split):
    torch.manual_seed(0)
    model = _convert(Shuffle(split))
    assert _trace(model, digit_tasks[0][0][:4]) == []
    assert _parts(model.branch._hat_link) == [(model.stem, [4, 5, 6, 7])]


def test_a_channel_shuffle_permutes_the_link_like_the_channels(digit_tasks):
    torch.manual_seed(0)
    model = _convert(Shuffle())
    _trace(model, digit_tasks[0][0][:4])
    # before the shuffle: positions 0..3 hold stem units 0..3, positions 4..7 branch units 0..3;
    # 2 groups of 4 interleave: new position j holds old channel (j % 2) * 4 + j // 2
    perm = [(j % 2) * 4 + j // 2 for j in range(8)]
    assert perm == [0, 4, 1, 5, 2, 6, 3, 7]
    before_stem = [0, 1, 2, 3, -1, -1, -1, -1]
    before_branch = [-1, -1, -1, -1, 0, 1, 2, 3]
    assert _parts(model.c._hat_link) == [
        (model.stem, [before_stem[p] for p in perm]),
        (model.branch, [before_branch[p] for p in perm]),
    ]
    # and the model's own shuffle moves a channel-numbered tensor the same way
    numbered = torch.arange(8.0).view(1, 8, 1, 1)
    assert _channel_shuffle(numbered, 2).flatten().long().tolist() == perm


def test_each_conv_read_only_by_its_batchnorm_leaves_its_mask_to_it_across_a_split(digit_tasks):
    torch.manual_seed(0)
    model = _convert(Shuffle())
    _trace(model, digit_tasks[0][0][:4])
    assert model.stem._hat_defer and model.stem_bn._hat_unit_map.identity_of() is model.stem
    assert model.branch._hat_defer and model.branch_bn._hat_unit_map.identity_of() is model.branch
    assert not model.c._hat_defer  # read by a ReLU, not by a norm


def test_a_split_and_shuffle_keep_task_0_exact_after_task_1(digit_tasks):
    torch.manual_seed(0)
    model = _convert(Shuffle())
    ref, got, between = _task0_before_and_after_task1(model, digit_tasks)
    assert _parts(model.c._hat_link)[0] == (model.stem, [0, -1, 1, -1, 2, -1, 3, -1])
    _assert_exact_and_not_vacuous(model, "c", ref, got, between)


# -- gates ---------------------------------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 8)
        self.c = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        x = x * gate[:, :, None, None]
        return self.head(F.relu(self.c(x)).mean((2, 3)))


def test_a_squeeze_excite_gate_keeps_the_units_it_scales(digit_tasks):
    torch.manual_seed(0)
    model = _convert(SqueezeExcite())
    assert _trace(model, digit_tasks[0][0][:4]) == []
    # sigmoid(0) = 0.5 makes the gate dense, but a product is 0 wherever x is: x's units pass
    assert model.c._hat_link.identity_of() is model.stem
    # a spatial mean keeps each channel's zeros; fc2 reads fc1's units
    assert model.fc1._hat_link.identity_of() is model.stem
    assert model.fc2._hat_link.identity_of() is model.fc1
    assert {r.protection for r in hat.coverage(model)} == {"unit"}


class SigmoidBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.b(torch.sigmoid(self.a(x)))).mean((2, 3)))


def test_a_sigmoid_between_two_convs_makes_the_second_protect_whole_rows(digit_tasks):
    model = _convert(SigmoidBetween())
    with pytest.warns(UserWarning, match=r"1 protect whole rows .*\(b\)"), torch.no_grad():
        model(digit_tasks[0][0][:4])
    link = model.b._hat_link
    assert link.sources == () and link.identity_of() is None
    assert link.dense_reason == "`sigmoid` does not keep 0 at 0"
    report = _coverage(model)
    assert report["a"].protection == "unit"
    assert report["b"].protection == "rows" and report["b"].traced == 0.0 and "sigmoid" in report["b"].reason


# -- attention -----------------------------------------------------------------------------------------
class Attention(nn.Module):
    """The digit's 8 rows as 8 tokens; timm's attention block: one qkv Linear, 2 heads, proj."""

    def __init__(self, manual: bool = False, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.manual, self.dim, self.heads = manual, dim, heads
        self.embed = nn.Linear(8, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        t = F.relu(self.embed(x.view(b, 8, 8)))
        n = t.shape[1]
        qkv = self.qkv(t).reshape(b, n, 3, self.heads, self.dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.manual:
            attn = torch.softmax(q @ k.transpose(-2, -1) * (self.dim // self.heads) ** -0.5, dim=-1)
            o = attn @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).reshape(b, n, self.dim)
        return self.head(F.relu(self.proj(o)).mean(1))


@pytest.mark.parametrize("manual", [False, True], ids=["sdpa", "softmax-matmul"])
def test_attention_gives_the_output_projection_the_value_units(digit_tasks, manual):
    torch.manual_seed(0)
    model = _convert(Attention(manual))
    assert _trace(model, digit_tasks[0][0][:4]) == []
    # qkv's units 0..15 are the queries, 16..31 the keys, 32..47 the values; each output of an
    # attention is a weighted sum of value rows, so it is 0 wherever the value unit is masked
    assert _parts(model.proj._hat_link) == [(model.qkv, list(range(32, 48)))]
    assert model.qkv._hat_link.identity_of() is model.embed
    assert {r.protection for r in hat.coverage(model)} == {"unit"}


def test_attention_keeps_task_0_exact_after_task_1(digit_tasks):
    torch.manual_seed(0)
    model = _convert(Attention())
    ref, got, between = _task0_before_and_after_task1(model, digit_tasks)
    assert _parts(model.proj._hat_link) == [(model.qkv, list(range(32, 48)))]
    _assert_exact_and_not_vacuous(model, "proj", ref, got, between)


# -- reshapes, slices and parameters -------------------------------------------------------------------
class FlattenAfterPool(nn.Module):
    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.c = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 2 * 3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.adaptive_avg_pool2d(F.relu(self.c(x)), (2, 3))  # [B, 3, 2, 3]
        if self.channels_last:
            y = y.permute(0, 2, 3, 1)  # [B, 2, 3, 3]: the channel runs fastest
        return self.head(F.relu(self.fc(y.flatten(1))))


def test_a_channel_major_flatten_repeats_each_channel_over_its_positions(digit_tasks):
    model = _convert(FlattenAfterPool())
    _trace(model, digit_tasks[0][0][:2])
    # 3 channels over 2x3 positions: channel c holds flattened inputs 6c .. 6c+5
    assert _parts(model.fc._hat_link) == [(model.c, [0] * 6 + [1] * 6 + [2] * 6)]


def test_a_channels_last_flatten_cycles_through_the_channels(digit_tasks):
    model = _convert(FlattenAfterPool(channels_last=True))
    _trace(model, digit_tasks[0][0][:2])
    assert _parts(model.fc._hat_link) == [(model.c, [0, 1, 2] * 6)]


class Sliced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c(F.relu(self.stem(x))[:, 2:6]).mean((2, 3)))


def test_basic_indexing_on_the_channels_slices_the_units(digit_tasks):
    model = _convert(Sliced())
    assert _trace(model, digit_tasks[0][0][:2]) == []
    assert _parts(model.c._hat_link) == [(model.stem, [2, 3, 4, 5])]


class Tokens(nn.Module):
    """The digit's rows as 8 tokens of 10 units; ``extra``: a position embedding added to them, or a
    per-unit scale multiplied in (plain parameters the model holds itself)."""

    def __init__(self, extra: str | None = None) -> None:
        super().__init__()
        self.extra = extra
        self.embed = nn.Linear(8, 10)
        self.pos = nn.Parameter(torch.randn(8, 10) * 0.02)
        self.gamma = nn.Parameter(torch.full((10,), 0.5))
        self.fc = nn.Linear(10, 6)
        self.odd = nn.Linear(5, 3)
        self.head = nn.Linear(9, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        t = F.relu(self.embed(x.view(b, 8, 8)))  # [B, 8, 10]
        if self.extra == "pos":
            t = t + self.pos
        elif self.extra == "scale":
            t = t * self.gamma
        rows = self.fc(t.flatten(0, 1)).view(b, 8, 6).mean(1)  # tokens of all samples as one batch
        odd = self.odd(t[..., 1::2]).mean(1)  # every other unit
        return self.head(torch.cat([rows, odd], dim=1))


def test_flattening_batch_and_tokens_keeps_the_units_and_a_strided_slice_picks_every_other(digit_tasks):
    model = _convert(Tokens())
    assert _trace(model, digit_tasks[0][0][:2]) == []
    assert model.fc._hat_link.identity_of() is model.embed
    assert _parts(model.odd._hat_link) == [(model.embed, [1, 3, 5, 7, 9])]


def test_multiplying_by_a_plain_parameter_keeps_the_units(digit_tasks):
    model = _convert(Tokens("scale"))
    assert _trace(model, digit_tasks[0][0][:2]) == []
    assert model.fc._hat_link.identity_of() is model.embed
    assert _parts(model.odd._hat_link) == [(model.embed, [1, 3, 5, 7, 9])]


def test_adding_a_position_embedding_makes_the_link_dense_with_a_reason(digit_tasks):
    model = _convert(Tokens("pos"))
    warned = _trace(model, digit_tasks[0][0][:2])
    assert len(warned) == 1 and "2 protect whole rows" in warned[0]
    reason = "a tensor or number that no mask reaches is added"
    for layer in (model.fc, model.odd):
        link = layer._hat_link
        assert link.sources == () and link.dense_reason == reason
    report = _coverage(model)
    assert report["embed"].protection == "unit"
    assert (report["fc"].protection, report["fc"].reason) == ("rows", reason)
    assert (report["odd"].protection, report["odd"].reason) == ("rows", reason)


# -- a weight used by hand ------------------------------------------------------------------------------
class ByHand(nn.Module):
    """``fc``'s weight is applied with F.linear in the model's forward: its mask never applies."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x.flatten(1)))
        return self.head(F.relu(F.linear(h, self.fc.weight, self.fc.bias)))


def test_a_weight_read_outside_its_layer_is_reported_plain(digit_tasks):
    model = _convert(ByHand())
    with pytest.warns(UserWarning, match=r"1 are left plain.*\(fc\)"), torch.no_grad():
        model(digit_tasks[0][0][:2])
    assert model.fc.__dict__["_hat_read_directly"] == "linear"
    assert "_hat_read_directly" not in model.a.__dict__
    report = _coverage(model)
    assert report["a"].protection == "unit"
    assert report["fc"].protection == "plain" and report["fc"].traced == 0.0
    assert "`linear`" in report["fc"].reason


def test_a_weight_read_outside_its_layer_is_frozen_whole_and_task_0_stays_exact(digit_tasks):
    torch.manual_seed(0)
    model = _convert(ByHand())
    with pytest.warns(UserWarning, match="left plain"), torch.no_grad():
        model(digit_tasks[0][0][:2])  # the trace, before training
    ref, got, between = _task0_before_and_after_task1(model, digit_tasks)
    # no mask reaches fc's weight, so every entry is task 0's: none may move, bias included
    assert torch.equal(between["fc.weight"], model.fc.weight) and torch.equal(between["fc.bias"], model.fc.bias)
    assert not torch.equal(between["a.weight"], model.a.weight)  # task 1 did train the masked layer
    assert torch.equal(ref, got)


# -- norms that cannot mask again, and weights read only for their metadata -------------------------------
class SharedLayerNorm(nn.Module):
    """One LayerNorm applied to two differently masked tensors (a shared norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 16)
        self.b = nn.Linear(64, 16)
        self.n = nn.LayerNorm(16)
        self.c = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        h = self.n(F.relu(self.a(x))) + self.n(F.relu(self.b(x)))
        return self.head(F.relu(self.c(h)))


class SharedBatchNorm(nn.Module):
    """One BatchNorm2d applied to the outputs of two convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.n = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.n(self.a(x)) + self.n(self.b(x))
        return self.head(F.relu(self.c(h)).mean((2, 3)))


class NormOverLength(nn.Module):
    """A LayerNorm over a Conv1d's length: the units run along the channels, not the normalized dim."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(8, 12, 3, padding=1)
        self.n = nn.LayerNorm(8)
        self.c = nn.Conv1d(12, 12, 3, padding=1)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.n(F.relu(self.a(x.view(-1, 8, 8))))
        return self.head(F.relu(self.c(h)).mean(2))


@pytest.mark.parametrize("make", [SharedLayerNorm, SharedBatchNorm, NormOverLength])
def test_a_norm_left_without_a_unit_map_does_not_pass_units_on(digit_tasks, make):
    torch.manual_seed(0)
    model = _convert(make())
    ref, got, between = _task0_before_and_after_task1(model, digit_tasks)
    assert not torch.equal(between["c.weight"], model.c.weight)
    assert torch.equal(ref, got)


class ReadsWeightDtype(nn.Module):
    """Casts to the dtype of ``fc``'s weight (as CLIP-style code does), then calls ``fc`` normally."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x.flatten(1))).to(self.fc.weight.dtype)
        return self.head(F.relu(self.fc(h)))


def test_reading_only_the_dtype_of_a_weight_is_not_a_read_by_hand(digit_tasks):
    model = _convert(ReadsWeightDtype())
    assert _trace(model, digit_tasks[0][0][:2]) == []
    assert model.fc.__dict__.get("_hat_read_directly") is None
    assert _coverage(model)["fc"].protection == "unit"


class _TwoWays(nn.Module):
    """``forward`` and ``run`` compute the same; ``run`` is called directly (no forward hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 8 * 8, 2)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


def test_a_model_trained_untraced_keeps_its_placement_when_called_later():
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 2, (64,))
    model = hat.convert(_TwoWays(), hat.HATConfig(num_tasks=2), mapping={nn.BatchNorm2d: TaskIndexedBatchNorm2d})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    hat.set_task(model, 0, mask_scale=100.0)
    for _ in range(3):  # trained through run(): the model's own call never happened, nothing traced
        loss = torch.nn.functional.cross_entropy(model.run(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad(), hat.task(model, 0):
        before = model.run(x)
        called = model(x)  # the first call: the placement task 0 trained with is kept
        after = model.run(x)
    assert torch.equal(before, after) and torch.equal(before, called)
    assert not any(getattr(m, "_hat_defer", False) for m in model.modules())
