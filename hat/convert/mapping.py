"""Which module types ``hat.convert`` swaps, and for which HAT or task-indexed type.

Exact types only: a subclass can compute something else (weight standardization, a fused
activation), so each one that converts is listed here, where it is known what it computes.
timm's and torchvision's layers are listed when those libraries are imported (a model built
with them imported them already).
"""

from __future__ import annotations

import sys

from torch import nn

from hat.modules import (
    HATConv1d,
    HATConv2d,
    HATConv3d,
    HATLinear,
    HATMultiheadAttention,
    TaskIndexedBatchNorm1d,
    TaskIndexedBatchNorm2d,
    TaskIndexedBatchNorm3d,
    TaskIndexedGroupNorm,
    TaskIndexedLayerNorm,
    TaskIndexedLayerNorm2d,
    TaskIndexedSyncBatchNorm,
)

__all__ = ["DEFAULT_MAPPING", "default_mapping"]

# torch's own layers
DEFAULT_MAPPING: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: HATLinear,
    nn.Conv1d: HATConv1d,
    nn.Conv2d: HATConv2d,
    nn.Conv3d: HATConv3d,
    nn.BatchNorm1d: TaskIndexedBatchNorm1d,
    nn.BatchNorm2d: TaskIndexedBatchNorm2d,
    nn.BatchNorm3d: TaskIndexedBatchNorm3d,
    nn.SyncBatchNorm: TaskIndexedSyncBatchNorm,
    nn.LayerNorm: TaskIndexedLayerNorm,
    nn.GroupNorm: TaskIndexedGroupNorm,
    nn.MultiheadAttention: HATMultiheadAttention,
}

# timm.layers names -> the HAT type (getattr: names differ between timm versions)
_TIMM = {
    # norm-act layers: the norm task-indexed, their drop and act kept
    "BatchNormAct2d": TaskIndexedBatchNorm2d,
    "SyncBatchNormAct": TaskIndexedSyncBatchNorm,
    "GroupNormAct": TaskIndexedGroupNorm,
    "GroupNorm1Act": TaskIndexedGroupNorm,
    "LayerNormAct": TaskIndexedLayerNorm,
    "LayerNormAct2d": TaskIndexedLayerNorm2d,
    # norms
    "LayerNorm": TaskIndexedLayerNorm,
    "LayerNorm2d": TaskIndexedLayerNorm2d,
    "GroupNorm": TaskIndexedGroupNorm,
    "GroupNorm1": TaskIndexedGroupNorm,
    # convolutions and linear layers computed by their torch parent's forward (padding aside)
    "Conv2dSame": HATConv2d,
    "Linear": HATLinear,
    # weight-standardized convolutions: whole rows of used units (see hat.modules._generated)
    "StdConv2d": HATConv2d,
    "StdConv2dSame": HATConv2d,
    "ScaledStdConv2d": HATConv2d,
    "ScaledStdConv2dSame": HATConv2d,
}


def default_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """The types ``hat.convert`` swaps by default: torch's, and timm's and torchvision's where
    they are imported."""
    table = dict(DEFAULT_MAPPING)
    if "timm" in sys.modules:
        try:
            from timm import layers
        except Exception:  # noqa: BLE001 - a timm that cannot import here (torch 2.13 raises RuntimeError)
            layers = None
        for name, target in _TIMM.items():
            cls = getattr(layers, name, None) if layers is not None else None
            if isinstance(cls, type):
                table[cls] = target
    if "torchvision" in sys.modules:
        try:
            from torchvision.models.convnext import LayerNorm2d
        except Exception:  # noqa: BLE001
            LayerNorm2d = None
        if LayerNorm2d is not None:
            table[LayerNorm2d] = TaskIndexedLayerNorm2d
    return table
