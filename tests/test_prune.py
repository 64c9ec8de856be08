"""hat.prune: a plain model per task with the units the task does not use removed, its outputs
those of the HAT model (eval mode, hard masks), loadable without hat; and its report."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import hat
import hat.timm_models  # registers the hat_* models in timm
from hat import training

from convert_models import SmallResNet, sequential_cnn

TASKS = 3


class OneHead(nn.Module):
    """SmallResNet (residual stages, Linear -> LayerNorm) with one shared head."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallResNet(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, 0)


class Gated(nn.Module):
    """conv/BN/ReLU, a squeeze-excite gate over its channels, a reshape to explicit sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.squeeze = nn.Conv2d(16, 4, 1)
        self.excite = nn.Conv2d(4, 16, 1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 64, 32)
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(y.mean((2, 3), keepdim=True)))))
        y = F.relu(self.conv2(y * gate))
        y = y.reshape(y.shape[0], 8 * 64)  # explicit sizes: conv2's channels cannot be cut
        return self.head(F.relu(self.fc(y)))


def depthwise() -> nn.Sequential:
    """A MobileNet-style block: pointwise, depthwise 3x3 (groups = channels), pointwise."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 2),
    )


def _gray(x: torch.Tensor) -> torch.Tensor:
    return x


def _rgb16(x: torch.Tensor) -> torch.Tensor:
    return x.repeat(1, 3, 2, 2)


def _build(arch: str) -> tuple[nn.Module, object]:
    cfg = hat.HATConfig(num_tasks=TASKS)
    if arch == "mlp":
        return hat.convert(nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                                         nn.Linear(32, 2)), cfg), _gray
    if arch == "cnn_bn":
        return hat.convert(sequential_cnn(), cfg), _gray
    if arch == "residual":
        return hat.convert(OneHead(), cfg), _gray
    if arch == "depthwise":
        return hat.convert(depthwise(), cfg), _gray
    if arch == "gated":
        return hat.convert(Gated(), cfg), _gray
    if arch == "hat_resnet18s":
        return timm.create_model("hat_resnet18s", hat_config=cfg, num_classes=2), _rgb16
    if arch == "hat_vit_tiny":
        return timm.create_model("hat_vit_tiny_patch16_224", hat_config=cfg, num_classes=2, img_size=16,
                                 patch_size=4, depth=2), _rgb16
    raise AssertionError(arch)


_CACHE: dict[str, tuple[nn.Module, object]] = {}


def trained(arch: str, digit_tasks: list) -> tuple[nn.Module, object]:
    """``arch`` trained on the first TASKS digit tasks (cached: the tests only read it)."""
    if arch not in _CACHE:
        torch.manual_seed(0)
        model, prep = _build(arch)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        epochs = 1 if arch.startswith("hat_") else 3
        for t in range(TASKS):
            x, y = digit_tasks[t][:2]
            training.train_task(model, opt, (prep(x), y), t, epochs=epochs, batch_size=32, forward="set_task",
                                max_scale=100, generator=torch.Generator().manual_seed(t))
        _CACHE[arch] = (model, prep)
    return _CACHE[arch]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


ARCHS = ["mlp", "cnn_bn", "residual", "depthwise", "gated", "hat_resnet18s", "hat_vit_tiny"]


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_model_computes_the_task_and_is_smaller(arch, digit_tasks):
    model, prep = trained(arch, digit_tasks)
    x_test = prep(digit_tasks[0][2][:64])
    training.predict(model, x_test, 0, forward="set_task")  # BatchNorm statistics pending after training settle
    before = _state(model)
    shrunk = False
    for t in range(TASKS):
        pruned = hat.prune(model, t, x_test[:2])
        assert not any(type(m).__module__.split(".")[0] == "hat" for m in pruned.modules())
        reference = training.predict(model, x_test, t, forward="set_task")
        pruned.eval()
        with torch.no_grad():
            got = pruned(x_test)
        scale = reference.abs().max()
        assert torch.allclose(got, reference, rtol=0, atol=1e-5 * float(scale)), float((got - reference).abs().max())
        full = sum(p.numel() for p in hat.unconvert(model, t).parameters())
        small = sum(p.numel() for p in pruned.parameters())
        assert small <= full
        shrunk |= small < full
    assert shrunk, "no task lost a single unit"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the HAT model is left as it is


def _masks(model: nn.Module, name: str, t: int) -> torch.Tensor:
    return model.get_submodule(name).task_embedding.detach()[t] > 0


def test_plain_layers_keep_exactly_the_units_the_task_uses(digit_tasks):
    model, _ = trained("mlp", digit_tasks)
    for report in hat.prune_report(model):
        for layer in hat.capacity(model):
            used = next(u.used for u in layer.tasks if u.task == report.task)
            kept = report.kept.get(layer.name, (layer.units, layer.units))
            assert kept == (used, layer.units)


def test_residual_stream_keeps_the_union_of_its_writers(digit_tasks):
    model, _ = trained("hat_resnet18s", digit_tasks)
    writers = ["conv1", "layer1.0.conv2", "layer1.1.conv2"]  # the stem and both blocks write layer1's stream
    for report in hat.prune_report(model, [0, 2]):
        union = torch.stack([_masks(model, w, report.task) for w in writers]).any(0)
        for w in writers:
            assert report.kept[w] == (int(union.sum()), 64)
        inner = _masks(model, "layer1.0.conv1", report.task)  # read by one conv only: its own units
        assert report.kept["layer1.0.conv1"] == (int(inner.sum()), 64)


def test_what_a_cut_would_change_is_kept_whole(digit_tasks):
    gated, _ = trained("gated", digit_tasks)
    report = hat.prune_report(gated, 0)[0]
    assert "conv" not in report.kept  # gated per channel by the squeeze-excite product
    assert "conv2" not in report.kept  # reshaped to explicit sizes
    assert "squeeze" in report.kept or "fc" in report.kept
    residual, _ = trained("residual", digit_tasks)
    assert "net.fc" not in hat.prune_report(residual, 0)[0].kept  # read by a LayerNorm
    vit, _ = trained("hat_vit_tiny", digit_tasks)
    kept = hat.prune_report(vit, 0)[0].kept
    # the stream is dense (position embedding) and read by LayerNorms: only the MLP hidden units and the heads
    assert set(kept) <= {f"blocks.{i}.{layer}" for i in (0, 1) for layer in ("mlp.fc1", "attn.qkv")}


def test_attention_heads_narrow_to_the_widest_heads_used_dimensions(digit_tasks):
    vit, prep = trained("hat_vit_tiny", digit_tasks)
    x = prep(digit_tasks[2][2][:8])
    pruned = hat.prune(vit, 2, x[:1]).eval()
    for i in (0, 1):
        on = (vit.blocks[i].attn.qkv.task_embedding.detach()[2] > 0).view(3, 3, 64)
        widest = max(int((on[0] & on[1]).sum(1).max()), int(on[2].sum(1).max()))
        attention = pruned.blocks[i].attn
        assert attention.head_dim == widest < 64
        assert attention.qkv.out_features == 3 * 3 * widest and attention.proj.in_features == 3 * widest
    reference = training.predict(vit, x, 2, forward="set_task")
    for fused in (True, False):  # torch's kernel with its default scale, and timm's own q * scale
        for block in pruned.blocks:
            block.attn.fused_attn = fused
        with torch.no_grad():
            assert torch.allclose(pruned(x), reference, rtol=0, atol=1e-5 * float(reference.abs().max()))


def test_report_counts_with_the_flop_counter(digit_tasks):
    model, prep = trained("cnn_bn", digit_tasks)
    x = prep(digit_tasks[1][2][:1])
    report = hat.prune_report(model, 1, x)[0]
    pruned = hat.prune(model, 1, x).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pruned(x)
    assert report.flops_pruned == counter.get_total_flops() < report.flops
    assert report.params_pruned == sum(p.numel() for p in pruned.parameters()) < report.params
    assert 0 <= report.max_abs_diff < 1e-4


def test_multiple_of_rounds_widths_up_with_unused_units_and_stays_exact(digit_tasks):
    model, prep = trained("hat_resnet18s", digit_tasks)
    x = prep(digit_tasks[1][2][:16])
    exact = hat.prune_report(model, 1, x[:1])[0]
    rounded = hat.prune_report(model, 1, x[:1], multiple_of=16)[0]
    for name, (kept, units) in rounded.kept.items():
        assert kept % 16 == 0 or kept == units
        assert kept >= exact.kept[name][0]
    assert rounded.params_pruned >= exact.params_pruned
    pruned = hat.prune(model, 1, x[:1], multiple_of=16).eval()
    reference = training.predict(model, x, 1, forward="set_task")
    with torch.no_grad():
        assert torch.allclose(pruned(x), reference, rtol=0, atol=1e-5 * float(reference.abs().max()))
    with pytest.raises(hat.HATValueError, match="multiple_of must be a positive int"):
        hat.prune(model, 1, x[:1], multiple_of=0)


def test_example_defaults_to_the_first_call(digit_tasks):
    model, prep = trained("cnn_bn", digit_tasks)
    example_args, _ = model.__dict__["_hat_example"]
    assert example_args[0].shape[0] == 1
    pruned = hat.prune(model, 0).eval()
    x = prep(digit_tasks[0][2][:16])
    assert torch.allclose(pruned(x), training.predict(model, x, 0, forward="set_task"), atol=1e-4)


@pytest.mark.parametrize("arch", ["cnn_bn", "hat_resnet18s"])
def test_pruned_model_loads_in_a_process_without_hat(arch, digit_tasks, tmp_path):
    model, prep = trained(arch, digit_tasks)
    x = prep(digit_tasks[2][2][:8])
    pruned = hat.prune(model, 2, x).eval()
    with torch.no_grad():
        expected = pruned(x)
    torch.save(pruned, tmp_path / "model.pt")
    torch.export.save(torch.export.export(pruned, (x,)), tmp_path / "model.pt2")
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hat"] = None  # importing hat now fails
        import torch
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
        with torch.no_grad():
            assert torch.equal(model(io["x"]), io["expected"])
        program = torch.export.load({str(tmp_path / "model.pt2")!r})
        assert torch.allclose(program.module()(io["x"]), io["expected"], atol=1e-5)
        assert not any(name == "hat" or name.startswith("hat.") for name, m in sys.modules.items() if m)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_unconvert_of_a_timm_model_is_timm_alone(digit_tasks):
    model, _ = trained("hat_resnet18s", digit_tasks)
    plain = hat.unconvert(model, 0)
    assert type(plain) is timm.models.resnet.ResNet
    assert not any(k.startswith("_hat_") or k == "hat_config" for m in plain.modules() for k in m.__dict__)


def test_bad_input_is_refused_and_changes_nothing(digit_tasks):
    model, prep = trained("mlp", digit_tasks)
    training.predict(model, prep(digit_tasks[0][2][:4]), 0, forward="set_task")
    before = _state(model)
    with pytest.raises(hat.TaskIndexError, match=r"task_id.*\[0, 3\).*7"):
        hat.prune(model, 7)
    with pytest.raises(hat.HATTypeError, match="task_id must be an int"):
        hat.prune(model, "0")
    fresh, _ = _build("mlp")
    with pytest.raises(hat.HATValueError, match=r"task_id must be a trained task \(the model has none\); got 0"):
        hat.prune(fresh, 0)
    with pytest.raises(hat.HATValueError, match="got 2, which has not been trained"):
        hat.prune_report(fresh, [2])
    with pytest.raises(hat.HATValueError, match="example_input must be a tensor"):
        hat.prune(model, 0, example_input="pixels")
    with pytest.raises(hat.HATTypeError, match=r"torch\.nn\.Module"):
        hat.prune(object(), 0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_model_never_called_needs_an_example(digit_tasks):
    model, prep = _build("mlp")
    hat.mark_trained(model, 0)
    with pytest.raises(hat.HATValueError, match="example_input=None and the model has not been called"):
        hat.prune(model, 0)
    x = prep(digit_tasks[0][2][:4])
    pruned = hat.prune(model, 0, x).eval()
    assert torch.allclose(pruned(x), training.predict(model, x, 0, forward="set_task"), atol=1e-5)


def test_payload_models_are_named_as_not_followed():
    from hat.modules import HATLinear, TaskIndexedLinear

    cfg = hat.HATConfig(num_tasks=2)

    class PayloadMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = HATLinear(64, 16, hat_config=cfg)
            self.head = TaskIndexedLinear(2, 16, 2)

        def forward(self, p: hat.HATPayload) -> hat.HATPayload:
            return self.head(p.forward_by(self.fc))

    model = PayloadMLP()
    hat.mark_trained(model, 0)
    with pytest.raises(hat.HATValueError, match="takes payloads"):
        hat.prune(model, 0, hat.HATPayload(torch.rand(2, 64), task_id=0))
