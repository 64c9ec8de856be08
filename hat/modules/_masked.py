"""The forward and conditioning shared by HATLinear and HATConv*."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from hat._core import HATMasked
from hat.payload import HATPayload


class MaskedLayer(HATMasked):
    """A torch layer (``_hat_base``) whose output units are masked per task.

    The torch layer's own forward computes ``y``; the mask multiplies ``y`` along
    ``mask_dim`` when the payload's ``.data`` is read, or is folded into a following
    task-indexed norm.
    """

    _hat_base: ClassVar[type[nn.Module]]
    _hat_unit_params = ("weight", "bias")

    def forward(self, input: Any) -> Any:
        if isinstance(input, HATPayload):
            task, scale = self._hat_begin(input)
            self._hat_record_link(input)
            y = self._hat_base.forward(self, input.data)
            self._hat_note_forward(self._hat_slot(task))
            return self._hat_masked_payload(input, y, task, scale)
        return self._hat_base.forward(self, input)

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
