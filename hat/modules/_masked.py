"""The forward and conditioning shared by HATLinear and HATConv*."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from hat import _trace
from hat._checks import check_task_id
from hat._core import HATMasked, _check_config
from hat._errors import HATTypeError, HATValueError
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
        if self._hat_defer:  # the task-indexed BatchNorm right after applies the mask, and marks the probe
            return y
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

    # -- conversion ---------------------------------------------------------------------------
    def _hat_base_args(self) -> dict[str, Any]:
        """The torch layer's constructor arguments (without device and dtype)."""
        raise NotImplementedError

    @classmethod
    def _hat_args_of(cls, base: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_base_module(cls, base_module: nn.Module, hat_config: Any = None, **kwargs: Any) -> MaskedLayer:
        """The HAT layer for a torch layer of exactly ``cls``'s base type, sharing its weight and
        bias Parameters (pretrained weights are kept as they are)."""
        if hat_config is None:
            raise HATTypeError(f"{cls.__name__}.from_base_module needs hat_config=HATConfig(num_tasks=...)")
        _check_config(hat_config)
        if not isinstance(base_module, cls._hat_base):
            raise HATTypeError(f"{cls.__name__}.from_base_module expects a {cls._hat_base.__name__}; "
                               f"got {type(base_module).__name__}")
        weight = base_module.weight
        new = cls(**cls._hat_args_of(base_module), hat_config=hat_config, device="meta", dtype=weight.dtype)
        new.to_empty(device=weight.device)
        new._hat_reinit()
        new.weight = weight
        new.bias = base_module.bias
        new.train(base_module.training)
        return new

    def to_base_module(self, task_id: Any = None, **kwargs: Any) -> nn.Module:
        """The torch layer computing this layer's output for ``task_id`` with the hard mask folded
        into weight and bias (``task_id=None``: the unmasked layer). A layer whose mask a
        task-indexed BatchNorm applies (converted models) is returned unmasked: the norm folds it."""
        task = check_task_id(task_id, self.num_tasks)
        weight = self.weight.detach().clone()
        bias = None if self.bias is None else self.bias.detach().clone()
        if task is not None and not self._hat_defer:
            if self.mask_dim != self._hat_default_mask_dim:
                raise HATValueError(f"to_base_module: the mask of {type(self).__name__} is over dimension {self.mask_dim}, "
                                    "which cannot be folded into its weight")
            mask = (self.task_embedding.detach()[task] > 0).to(weight.dtype)
            weight.mul_(mask.view(-1, *([1] * (weight.dim() - 1))))
            if bias is not None:
                bias.mul_(mask)
        plain = self._hat_base(**self._hat_base_args(), device="meta", dtype=weight.dtype)
        plain.to_empty(device=weight.device)
        plain.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        plain.bias = None if bias is None else nn.Parameter(bias, requires_grad=self.bias.requires_grad)
        plain.train(self.training)
        return plain
