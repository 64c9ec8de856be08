"""HATMasker: a stand-alone learnable mask over features."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hat._checks import check_task_id
from hat.config import HATConfig
from hat.modules._base import HATMasked
from hat.payload import HATPayload, _along
from hat.tracking.tracked import Selection, check_config

__all__ = ["FixedMask", "HATMasker"]


class HATMasker(HATMasked, nn.Module):
    """``y = x * mask(t)`` over ``num_features`` features along ``mask_dim`` (default: last).

    Put it in front of a network to learn, per task, which input features (e.g. pixels of a
    flattened image) the task needs: ``masker.get_mask(t)`` is then a feature-importance map.
    """

    _hat_has_weights = False  # it masks its input: nothing of its own to protect per unit, no coverage entry

    def _hat_apply_trace(self, rec: Any, seen: list[tuple[Any, int]]) -> None:
        """Its mask is over its own input: no input link to learn."""

    def __init__(self, num_features: int, hat_config: HATConfig, device: Any = None, dtype: Any = None) -> None:
        check_config(hat_config)
        super().__init__()
        self.num_features = num_features
        self._hat_init_mask(hat_config, num_features, device, dtype)

    def _hat_forward_payload(self, payload: HATPayload, sel: Selection) -> HATPayload:
        if sel.task is None:  # no task: nothing here trains, the input passes untouched
            return payload._derive(payload.data, mask=None, unit_mask=None, unit_dim=-1, src=None)
        return self._hat_masked_payload(payload, payload.data, sel)  # marks the probe

    def _hat_forward_tensor(self, x: torch.Tensor, sel: Selection) -> torch.Tensor:
        if sel.task is None:  # no task: nothing here trains, the input passes untouched
            return x
        return self._hat_apply_mask(x, sel)

    def to_base_module(self, task_id: Any = None, **kwargs: Any) -> nn.Module:
        """A fixed module multiplying by the hard mask of ``task_id`` (None: nn.Identity)."""
        task = check_task_id(task_id, self.num_tasks)
        if task is None:
            return nn.Identity()
        return FixedMask(self._hat_mask(task, None).detach().clone(), self.mask_dim)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}"


class FixedMask(nn.Module):
    """``y = x * mask`` along ``dim``, the mask a buffer: what HATMasker exports for one task."""

    def __init__(self, mask: torch.Tensor, dim: int = -1) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * _along(self.mask, self.dim, x.dim())

    def extra_repr(self) -> str:
        return f"units={self.mask.numel()}, dim={self.dim}"
