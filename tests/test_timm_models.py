"""The HAT networks registered in timm, parametrized over timm.list_models('hat_*')."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")  # the timm extra is installed by `make test`; a bare install skips here

import hat  # noqa: E402
import hat.timm_models  # noqa: E402
from hat import HATConfig, HATPayload  # noqa: E402
from hat.modules import TaskIndexedLinear  # noqa: E402

NAMES = timm.list_models("hat_*")
EXPECTED = ["hat_resnet18", "hat_resnet18s", "hat_resnet34", "hat_resnet34s", "hat_vit_tiny_patch16_224"]


def _create(name: str, num_tasks: int = 3, **kwargs):
    if "vit" in name:
        kwargs.setdefault("img_size", 32)  # 4 patches: fast on 2 cores
    return timm.create_model(name, hat_config=HATConfig(num_tasks=num_tasks), num_classes=2, **kwargs)


@pytest.fixture(scope="module")
def digit_images(digit_tasks):
    """The digits tasks as 3x32x32 images (nearest upsampling, grey to RGB)."""
    def up(x):
        return F.interpolate(x, size=32, mode="nearest").expand(-1, 3, -1, -1).contiguous()
    return [(up(x_tr[:64]), y_tr[:64], up(x_te[:32])) for x_tr, y_tr, x_te, _ in digit_tasks[:2]]


def _stem(model):
    return model.conv1 if hasattr(model, "conv1") else model.patch_embed.proj


def test_exactly_the_promised_models_are_registered():
    assert NAMES == EXPECTED


@pytest.mark.parametrize("name", NAMES)
def test_payload_and_set_task_forward_backward(name):
    model = _create(name)
    x = torch.randn(2, 3, 32, 32)
    out = model(HATPayload(x, task_id=1, mask_scale=10.0))
    assert isinstance(out, HATPayload) and out.data.shape == (2, 2) and out.task_id == 1
    out.data.sum().backward()
    assert _stem(model).weight.grad.abs().sum() > 0
    model.zero_grad()
    hat.set_task(model, 2, mask_scale=5.0)
    y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 2)
    feats = model.forward_features(x)
    assert model.forward_head(feats).shape == (2, 2)
    assert type(model.get_classifier()) is TaskIndexedLinear


@pytest.mark.parametrize("name", NAMES)
def test_hat_cl_style_backbone_and_head(name):
    """hat-cl code: head(backbone(payload).data) trains the backbone."""
    backbone = timm.create_model(
        name, hat_config=HATConfig(num_tasks=3), num_classes=0, **({"img_size": 32} if "vit" in name else {}))
    head = torch.nn.Linear(backbone.num_features, 2)
    pld = HATPayload(torch.randn(2, 3, 32, 32), task_id=0, mask_scale=20.0)
    head(backbone(pld).data).sum().backward()
    assert _stem(backbone).weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_the_stem_with_grad_checkpointing(name):
    model = _create(name)
    model.set_grad_checkpointing(True)
    hat.set_task(model, 0, mask_scale=10.0)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert _stem(model).weight.grad is not None and _stem(model).weight.grad.abs().sum() > 0


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. a layer left shared and frozen would warn
@pytest.mark.parametrize("name", NAMES)
def test_earlier_task_bit_identical_after_adamw_steps_on_a_later_task(name, digit_images):
    torch.manual_seed(0)
    model = _create(name, num_tasks=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    def train(task, steps=3):
        x, y, _ = digit_images[task]
        model.train()
        for s in range(steps):
            hat.set_task(model, task, mask_scale=10.0 * (s + 1))
            loss = F.cross_entropy(model(x[:16]), y[:16])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def logits(task):
        model.eval()
        with hat.task(model, task):
            return model(digit_images[0][2])

    train(0)
    before = logits(0)
    train(1)
    assert torch.equal(logits(0), before)
    assert not torch.equal(logits(1), logits(0))


@pytest.mark.parametrize("name", NAMES)
def test_timm_features_keep_working(name):
    model = _create(name)
    names = model.no_weight_decay()
    embeddings = {n for n, _ in model.named_parameters() if n.endswith("task_embedding")}
    assert embeddings and embeddings <= names
    model.reset_classifier(5)
    hat.set_task(model, 0)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert type(model.get_classifier()) is TaskIndexedLinear
    feats = timm.create_model(name, hat_config=HATConfig(num_tasks=2), features_only=True,
                              **({"img_size": 32} if "vit" in name else {}))
    hat.set_task(feats, 1, mask_scale=4.0)
    maps = feats(torch.randn(2, 3, 64 if name in ("hat_resnet18", "hat_resnet34") else 32,
                             64 if name in ("hat_resnet18", "hat_resnet34") else 32))
    assert isinstance(maps, list) and len(maps) >= 3
    sum(m.sum() for m in maps).backward()


# -- pretrained weights the timm way, offline -----------------------------------------------------
@pytest.mark.parametrize("name, plain_name", [("hat_resnet18", "resnet18"), ("hat_vit_tiny_patch16_224",
                                                                             "vit_tiny_patch16_224")])
def test_pretrained_from_a_local_file(tmp_path, name, plain_name):
    kwargs = {"img_size": 32} if "vit" in name else {}
    torch.manual_seed(0)
    plain = timm.create_model(plain_name, num_classes=7, **kwargs)
    with torch.no_grad():  # statistics as a trained model has them
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"{plain_name}.pth"
    torch.save(plain.state_dict(), path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              hat_config=HATConfig(num_tasks=3), num_classes=2, **kwargs)
    got = model.state_dict()
    classifier = model.pretrained_cfg["classifier"]
    for key, value in plain.state_dict().items():
        if key.startswith(classifier + "."):
            continue  # num_classes differs: dropped, as timm does
        assert key in got, key
        have = got[key]
        if have.shape != value.shape:  # task-indexed: every slot, no-task slot included, is the pretrained one
            assert have.shape[0] == 4, key
            stacked = value if value.dim() == have.dim() else value.unsqueeze(0)  # [C] -> [1, C]; [1, N, D] as is
            assert torch.equal(have, stacked.expand_as(have)), key
        else:
            assert torch.equal(have, value), key
    plain.eval()
    model.eval()
    x = torch.randn(2, 3, 32, 32) if "vit" in name else torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        hat.set_task(model, None)
        torch.testing.assert_close(model.forward_features(x), plain.forward_features(x))


def test_pretrained_file_of_another_architecture_names_the_keys(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit hat_resnet18: unexpected layer1\.2\.conv1\.weight"):
        timm.create_model("hat_resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          hat_config=HATConfig(num_tasks=2))


def test_bad_input():
    with pytest.raises(TypeError, match=r"hat_config=hat.HATConfig\(num_tasks=...\)"):
        timm.create_model("hat_resnet18s")
    with pytest.raises(ValueError, match="hat_resnet18s has no pretrained weights"):
        timm.create_model("hat_resnet18s", pretrained=True, hat_config=HATConfig(num_tasks=2))
    saved = timm.create_model("hat_resnet18s", hat_config=HATConfig(num_tasks=3)).state_dict()
    other = timm.create_model("hat_resnet18s", hat_config=HATConfig(num_tasks=5))
    with pytest.raises(ValueError, match=r"num_tasks=3.*num_tasks=5"):
        other.load_state_dict(saved)
