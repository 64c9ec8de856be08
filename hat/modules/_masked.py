"""The forward and conditioning shared by HATLinear and HATConv*."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from hat import _trace
from hat._core import HATMasked
from hat.payload import HATPayload, _along


class MaskedLayer(HATMasked):
    """A torch layer (``_hat_base``) whose output units are masked per task.

    The torch layer's own forward computes ``y``; the mask multiplies ``y`` along
    ``mask_dim`` when the payload's ``.data`` is read, or is folded into a following
    task-indexed norm.
    """

    _hat_base: ClassVar[type[nn.Module]]
    _hat_unit_params = ("weight", "bias")
    # set by the trace of a converted model: a task-indexed BatchNorm right after applies the mask
    _hat_defer = False

    def forward(self, input: Any) -> Any:
        if isinstance(input, HATPayload):
            task, scale = self._hat_begin(input)
            self._hat_record_link(input)
            y = self._hat_base.forward(self, input.data)
            return self._hat_masked_payload(input, y, task, scale)  # marks the probe
        if _trace.ACTIVE is not None:
            return _trace.ACTIVE.call(self, input, self._hat_forward_tensor)
        return self._hat_forward_tensor(input)

    def _hat_forward_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """A plain tensor in: the task selected by ``hat.set_task`` (none: the plain layer)."""
        y = self._hat_base.forward(self, x)
        if torch.compiler.is_compiling():
            y = self._hat_mark(y, self.hat_task)
            if self._hat_defer:
                return y
            return y * _along(self._hat_mask_tensor(self.hat_task, self.hat_scale), self.mask_dim, y.dim())
        task, scale = self._hat_selected()
        if task is None:
            return self._hat_mark(y, self.num_tasks)
        if self._hat_defer:  # the task-indexed BatchNorm right after applies the mask
            return self._hat_mark(y, task)
        mask, marked = self._hat_mask_marked(task, scale, True)
        if not marked:
            y = self._hat_mark(y, task)
        return y * _along(mask, self.mask_dim, y.dim())

    def _hat_in_units(self) -> int:
        raise NotImplementedError

    def _hat_unit_mask(self, name: str, protected: torch.Tensor) -> torch.Tensor | None:
        out_used = self.used_units(protected)
        if name == "bias":
            return out_used
        weight = self.weight
        groups = getattr(self, "groups", 1)
        in_used = self._hat_input_used(protected, self._hat_in_units())
        trailing = [1] * (weight.dim() - 2)
        if in_used is None:  # input mask unknown: protect whole rows of used units
            return out_used.view(-1, 1, *trailing)
        # weight[o, j] reads input unit (group of o) * in_per_group + j
        in_per_group = weight.shape[1]
        in_w = in_used.view(groups, in_per_group).repeat_interleave(weight.shape[0] // groups, dim=0)
        return (out_used.view(-1, 1) & in_w).view(weight.shape[0], in_per_group, *trailing)
