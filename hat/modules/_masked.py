"""The forward and conditioning shared by HATLinear and HATConv*."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from hat._checks import check_task_id
from hat.errors import HATTypeError, HATValueError
from hat.modules._base import HATMasked
from hat.payload import HATPayload
from hat.tracking.tracked import Selection, check_config, shallow_clone


class MaskedLayer(HATMasked):
    """A torch layer (``_hat_base``) whose output units are masked per task.

    The torch layer's own forward computes ``y``; the mask multiplies ``y`` along
    ``mask_dim`` when the payload's ``.data`` is read, or is folded into a following
    task-indexed norm.
    """

    _hat_base: ClassVar[type[nn.Module]]
    _hat_unit_params = ("weight", "bias")
    # the parameter whose rows are the output units and whose columns read the input units
    _hat_weight_name: ClassVar[str] = "weight"
    # set by the trace of a converted model: a task-indexed BatchNorm right after applies the mask
    _hat_defer = False
    # why this layer protects whole rows of used units whatever its input (None: per unit)
    _hat_whole_rows: ClassVar[str | None] = None
    _hat_can_defer = True

    def _hat_forward_payload(self, payload: HATPayload, sel: Selection) -> HATPayload:
        self._hat_record_link(payload)
        y = self._hat_base.forward(self, payload.data)
        return self._hat_masked_payload(payload, y, sel)  # marks the probe

    def _hat_forward_tensor(self, x: torch.Tensor, sel: Selection) -> torch.Tensor:
        """A plain tensor in: the task selected by ``hat.set_task`` (none: the plain layer)."""
        y = self._hat_base.forward(self, x)
        if self._hat_defer and sel.task is not None:  # the task-indexed BatchNorm right after applies the mask
            return y  # (and reports the task to this layer's probe through it)
        return self._hat_apply_mask(y, sel)

    def _hat_in_units(self) -> int:
        raise NotImplementedError

    def _hat_unit_mask(self, name: str, protected: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        out_used = self.used_units(protected)
        param = self._parameters[name]
        if name != self._hat_weight_name:  # a bias, a per-unit gain: one entry (or block) per output unit
            return (out_used.view(-1, *([1] * (param.dim() - 1))),)
        groups = getattr(self, "groups", 1)
        in_used = None if self._hat_whole_rows else self._hat_input_used(protected, self._hat_in_units())
        trailing = [1] * (param.dim() - 2)
        rows = out_used.view(-1, 1, *trailing)
        if in_used is None:  # input mask unknown: protect whole rows of used units
            return (rows,)
        # weight[o, j] reads input unit (group of o) * in_per_group + j: a mask over (o, j), not
        # over the kernel, kept as two factors (rows, and the input units each row reads)
        in_per_group = param.shape[1]
        if groups == 1:
            return rows, in_used.view(1, in_per_group, *trailing)
        in_w = in_used.view(groups, in_per_group).repeat_interleave(param.shape[0] // groups, dim=0)
        return rows, in_w.view(param.shape[0], in_per_group, *trailing)

    # -- conversion ---------------------------------------------------------------------------
    @classmethod
    def from_base_module(cls, base_module: nn.Module, hat_config: Any = None, **kwargs: Any) -> MaskedLayer:
        """The HAT layer for ``base_module``, an instance of ``cls``'s torch layer or of a subclass
        of it (timm's ``Conv2dSame``, ``StdConv2d`` ...): a new module of a class deriving from both,
        sharing every Parameter, buffer and attribute of ``base_module`` (pretrained weights are
        kept as they are), with a task embedding per output unit added."""
        if hat_config is None:
            raise HATTypeError(f"{cls.__name__}.from_base_module needs hat_config=HATConfig(num_tasks=...)")
        check_config(hat_config)
        if not isinstance(base_module, cls._hat_base):
            raise HATTypeError(f"{cls.__name__}.from_base_module expects a {cls._hat_base.__name__}; "
                               f"got {type(base_module).__name__}")
        weight = getattr(base_module, cls._hat_weight_name)
        extras = tuple(n for n, p in base_module._parameters.items() if p is not None and n not in cls._hat_unit_params)
        odd = [f"{n} {tuple(base_module._parameters[n].shape)}" for n in extras
               if base_module._parameters[n].shape[:1] != weight.shape[:1]]
        if odd:
            raise HATTypeError(f"{cls.__name__}.from_base_module: {type(base_module).__name__} has parameter(s) "
                               f"{', '.join(odd)} that do not hold one entry per output unit; hat cannot protect them")
        new = shallow_clone(base_module, hat_class(cls, type(base_module)))
        if extras:  # a per-unit gain (ScaledStdConv2d): protected with its unit, like the bias
            new.__dict__["_hat_unit_params"] = (*cls._hat_unit_params, *extras)
        new._hat_init_mask(hat_config, weight.shape[0], weight.device, weight.dtype)
        return new

    def to_base_module(self, task_id: Any = None, **kwargs: Any) -> nn.Module:
        """The torch layer (of the class this one was converted from) computing this layer's output
        for ``task_id`` with the hard mask folded into weight, bias and any per-unit parameter
        (``task_id=None``: the unmasked layer). A layer whose mask a task-indexed BatchNorm applies
        (converted models) is returned unmasked: the norm folds it."""
        task = check_task_id(task_id, self.num_tasks)
        mask = None
        if task is not None and not self._hat_defer:
            if self.mask_dim != self._hat_default_mask_dim:
                raise HATValueError(f"to_base_module: the mask of {type(self).__name__} "
                                    f"is over dimension {self.mask_dim}, "
                                    "which cannot be folded into its weight")
            mask = (self.task_embedding.detach()[task] > 0).to(getattr(self, self._hat_weight_name).dtype)
        plain = self._hat_plain_copy(task)
        for name in self._hat_unit_params:
            p = self._parameters.get(name)
            if p is None:
                continue
            value = p.detach().clone()
            if mask is not None:
                value.mul_(mask.view(-1, *([1] * (value.dim() - 1))))
            plain._parameters[name] = nn.Parameter(value, requires_grad=p.requires_grad)
        plain.train(self.training)
        return plain


def hat_class(hat_cls: type, base: type) -> type:
    """``hat_cls`` (HATLinear, HATConv2d ...) for a torch layer of class ``base``: ``hat_cls`` itself
    for its own torch layer, else a class deriving from both (``hat.modules._generated``), so that
    ``base``'s forward computes the output and ``isinstance`` checks for ``base`` keep working."""
    if base is hat_cls._hat_base:
        return hat_cls
    from hat.modules import _generated

    return _generated.derive(hat_cls, base)
