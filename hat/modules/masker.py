"""HATMasker: a stand-alone learnable mask over features."""

from __future__ import annotations

from typing import Any

from torch import nn

from hat._core import HATMasked, _check_config
from hat.config import HATConfig
from hat.payload import HATPayload

__all__ = ["HATMasker"]


class HATMasker(HATMasked, nn.Module):
    """``y = x * mask(t)`` over ``num_features`` features along ``mask_dim`` (default: last).

    Put it in front of a network to learn, per task, which input features (e.g. pixels of a
    flattened image) the task needs: ``masker.get_mask(t)`` is then a feature-importance map.
    """

    def __init__(self, num_features: int, hat_config: HATConfig, device: Any = None, dtype: Any = None) -> None:
        _check_config(hat_config)
        super().__init__()
        self.num_features = num_features
        self._hat_init_mask(hat_config, num_features, device, dtype)

    def forward(self, input: Any) -> Any:
        if isinstance(input, HATPayload):
            task, scale = self._hat_begin(input)
            self._hat_note_forward(self._hat_slot(task))
            return self._hat_masked_payload(input, input.data, task, scale)
        return input

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}"
