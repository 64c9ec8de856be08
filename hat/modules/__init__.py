"""HAT layers and task-indexed layers."""

from __future__ import annotations

from hat.modules.attention import HATMultiheadAttention
from hat.modules.conv import HATConv1d, HATConv2d, HATConv3d
from hat.modules.linear import HATLinear, TaskIndexedLinear
from hat.modules.masker import FixedMask, HATMasker
from hat.modules.norm import (
    TaskIndexedBatchNorm1d,
    TaskIndexedBatchNorm2d,
    TaskIndexedBatchNorm3d,
    TaskIndexedGroupNorm,
    TaskIndexedLayerNorm,
    TaskIndexedLayerNorm2d,
    TaskIndexedSyncBatchNorm,
)
from hat.modules.task_parameter import TaskIndexedParameter

__all__ = [
    "FixedMask",
    "HATConv1d",
    "HATConv2d",
    "HATConv3d",
    "HATLinear",
    "HATMasker",
    "HATMultiheadAttention",
    "TaskIndexedBatchNorm1d",
    "TaskIndexedBatchNorm2d",
    "TaskIndexedBatchNorm3d",
    "TaskIndexedGroupNorm",
    "TaskIndexedLayerNorm",
    "TaskIndexedLayerNorm2d",
    "TaskIndexedLinear",
    "TaskIndexedParameter",
    "TaskIndexedSyncBatchNorm",
]
