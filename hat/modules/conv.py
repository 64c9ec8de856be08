"""HATConv1d, HATConv2d, HATConv3d."""

from __future__ import annotations

from typing import Any

from torch import nn

from hat.config import HATConfig
from hat.modules._masked import MaskedLayer
from hat.tracking.tracked import check_config

__all__ = ["HATConv1d", "HATConv2d", "HATConv3d"]


class _HATConvNd(MaskedLayer):
    """``y = convNd(x) * mask(t)``, the mask over the ``out_channels`` channels (dimension 1).

    Same arguments as the torch convolution, with ``hat_config`` fourth as in hat-cl. Grouped
    and depthwise convolutions are supported: weight ``[o, j]`` is protected when output
    channel ``o`` and the input channel it reads are both used by an earlier task.
    """

    _hat_default_mask_dim = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, hat_config: HATConfig,
                 stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: Any = None, dtype: Any = None) -> None:
        check_config(hat_config)
        self._hat_base.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                                device=device, dtype=dtype)
        self._hat_init_mask(hat_config, out_channels, device, dtype)

    def _hat_in_units(self) -> int:
        return self.in_channels


class HATConv1d(_HATConvNd, nn.Conv1d):
    __doc__ = _HATConvNd.__doc__
    _hat_base = nn.Conv1d


class HATConv2d(_HATConvNd, nn.Conv2d):
    __doc__ = _HATConvNd.__doc__
    _hat_base = nn.Conv2d


class HATConv3d(_HATConvNd, nn.Conv3d):
    __doc__ = _HATConvNd.__doc__
    _hat_base = nn.Conv3d
