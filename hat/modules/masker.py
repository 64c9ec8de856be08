"""HATMasker: a stand-alone learnable mask over features."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hat import _trace
from hat._checks import check_task_id
from hat._core import HATMasked, _check_config
from hat._selection import is_per_sample
from hat.config import HATConfig
from hat.payload import HATPayload, _along

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
        _check_config(hat_config)
        super().__init__()
        self.num_features = num_features
        self._hat_init_mask(hat_config, num_features, device, dtype)

    def forward(self, input: Any) -> Any:
        if isinstance(input, HATPayload):
            task, scale = self._hat_begin(input)
            if task is None:  # no task: nothing here trains, the input passes untouched
                return input._derive(input.data, mask=None, unit_mask=None, unit_dim=-1, src=None)
            return self._hat_masked_payload(input, input.data, task, scale)  # marks the probe
        rec = _trace.active()
        if rec is not None:
            return rec.call(self, input, self._hat_forward_tensor)
        return self._hat_forward_tensor(input)

    def _hat_forward_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            x = self._hat_mark(x, self.hat_task)
            return x * _along(self._hat_mask_tensor(self.hat_task, self.hat_scale), self.mask_dim, x.dim())
        task, scale = self._hat_selected()
        if task is None:  # no task: nothing here trains, the input passes untouched
            return x
        if is_per_sample(task):
            x = self._hat_mark(x, task.fits(x.shape[0]).ids.to(x.device))
            return x * _along(self._hat_sample_masks(task, scale), self.mask_dim, x.dim())
        mask, marked = self._hat_mask_marked(task, scale, True)
        return (x if marked else self._hat_mark(x, task)) * _along(mask, self.mask_dim, x.dim())

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
