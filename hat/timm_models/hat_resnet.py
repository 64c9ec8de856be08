"""HAT ResNets from timm's ResNet: ``hat_resnet18``, ``hat_resnet34`` (ImageNet stem, timm's
pretrained weights) and ``hat_resnet18s``, ``hat_resnet34s`` (small images such as 32x32: a
3x3 stride-1 first convolution, max-pool kept, as in hat-cl; no pretrained weights).

Every convolution becomes a ``HATConv2d``, every BatchNorm a ``TaskIndexedBatchNorm2d`` (masks
applied after it), the classifier a ``TaskIndexedLinear``; residual additions carry the union
of their inputs' masks.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from hat.errors import HATValueError
from hat.timm_models._common import HATTimmModel, finish, key_check, plain_cfg, require_config

__all__ = ["HATResNet"]


class HATResNet(HATTimmModel, ResNet):
    """timm's ResNet, converted to HAT (see ``hat.timm_models``)."""


def _small_cfg() -> dict[str, Any]:
    return dict(url="", num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0,
                interpolation="bilinear", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                first_conv="conv1", classifier="fc", license="apache-2.0")


default_cfgs = generate_default_cfgs({
    "hat_resnet18.a1_in1k": plain_cfg("resnet18.a1_in1k"),
    "hat_resnet34.a1_in1k": plain_cfg("resnet34.a1_in1k"),
    "hat_resnet18s": _small_cfg(),
    "hat_resnet34s": _small_cfg(),
})


def _create(variant: str, layers: tuple[int, ...], pretrained: bool, small: bool, **kwargs: Any) -> nn.Module:
    hat_config = require_config(variant, kwargs.pop("hat_config", None))
    if small and pretrained:
        raise HATValueError(f"{variant} has no pretrained weights (its first convolution is made for small images); "
                            f"use pretrained=False, or {variant[:-1]} for timm's ImageNet weights")
    model = build_model_with_cfg(ResNet, variant, pretrained, block=BasicBlock, layers=layers,
                                 pretrained_filter_fn=key_check(variant), **kwargs)
    if small:  # the stem conv is `conv1` in the ResNet and in its features_only wrapper alike
        conv = model.get_submodule("conv1")
        model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False,
                                device=conv.weight.device, dtype=conv.weight.dtype)
    return finish(model, HATResNet if isinstance(model, ResNet) else type(model), hat_config)


@register_model
def hat_resnet18(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-18 with HAT; ``pretrained=True`` loads timm's resnet18 weights."""
    return _create("hat_resnet18", (2, 2, 2, 2), pretrained, False, **kwargs)


@register_model
def hat_resnet34(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-34 with HAT; ``pretrained=True`` loads timm's resnet34 weights."""
    return _create("hat_resnet34", (3, 4, 6, 3), pretrained, False, **kwargs)


@register_model
def hat_resnet18s(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-18 with HAT for small images (3x3 stride-1 first convolution); no pretrained weights."""
    return _create("hat_resnet18s", (2, 2, 2, 2), pretrained, True, **kwargs)


@register_model
def hat_resnet34s(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-34 with HAT for small images (3x3 stride-1 first convolution); no pretrained weights."""
    return _create("hat_resnet34s", (3, 4, 6, 3), pretrained, True, **kwargs)
