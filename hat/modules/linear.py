"""HATLinear and TaskIndexedLinear."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hat._checks import check_task_id
from hat.config import HATConfig
from hat.errors import HATTypeError
from hat.modules._base import TaskModule
from hat.modules._masked import MaskedLayer
from hat.payload import HATPayload
from hat.tracking.selection import grouped, is_per_sample
from hat.tracking.tracked import Selection, check_config, rows

__all__ = ["HATLinear", "TaskIndexedLinear"]


class HATLinear(MaskedLayer, nn.Linear):
    """``y = (x W^T + b) * mask(t)``, the mask over the ``out_features`` units.

    Shapes: input ``[*, in_features]``, output ``[*, out_features]``; the task embedding is
    ``[num_tasks, out_features]``. A plain tensor input runs the plain layer (no task).

    Example::

        layer = HATLinear(128, 32, HATConfig(num_tasks=5))
        out = layer(HATPayload(torch.rand(10, 128), task_id=0, mask_scale=10.0)).data
    """

    _hat_base = nn.Linear
    _hat_default_mask_dim = -1

    def __init__(self, in_features: int, out_features: int, hat_config: HATConfig, bias: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        check_config(hat_config)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._hat_init_mask(hat_config, out_features, device, dtype)

    def _hat_in_units(self) -> int:
        return self.in_features


class TaskIndexedLinear(TaskModule, nn.Module):
    """One linear head per task, plus a head for "no task": ``y = x W[t]^T + b[t]``.

    ``weight`` is ``[num_tasks + 1, out_features, in_features]`` (the last row serves
    ``task_id=None``); only the rows of the tasks being trained ever change. Output units are
    not masked: a task-incremental classifier keeps all of its classes.
    """

    _hat_row_params = ("weight", "bias")

    def __init__(self, num_tasks: int, in_features: int, out_features: int, bias: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        num_tasks = HATConfig(num_tasks=num_tasks).num_tasks  # same validation as the config
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_tasks + 1, out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_tasks + 1, out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()
        self._hat_init_tracking(num_tasks, device)

    def reset_parameters(self) -> None:
        # each head initialised as nn.Linear initialises its weight and bias
        for w in self.weight:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _hat_forward_payload(self, payload: HATPayload, sel: Selection) -> HATPayload:
        y = self._heads(payload.data, sel.task)  # reports the slots to the probe
        return payload._derive(y, mask=None, unit_mask=None, unit_dim=-1, src=None)

    def _hat_forward_tensor(self, x: torch.Tensor, sel: Selection) -> torch.Tensor:
        return self._heads(x, sel.task)

    def _heads(self, x: torch.Tensor, task: Any) -> torch.Tensor:
        """The head of ``task`` (None: the no-task head; per-sample ids: each sample its task's; in
        compiled code the 0-d task buffer)."""
        if is_per_sample(task):
            return grouped(x, task, self._head)
        return self._head(x, task if isinstance(task, torch.Tensor) else self._hat_slot(task))

    def _head(self, x: torch.Tensor, slot: Any) -> torch.Tensor:
        weight, bias = rows(self, slot, self.weight, self.bias)
        if weight.dim() == 3:  # per-sample ids in compiled code: each sample's head, gathered
            y = torch.einsum("b...i,boi->b...o", x, weight)
            return y if bias is None else y + bias.view(bias.shape[0], *([1] * (x.dim() - 2)), -1)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"num_tasks={self.num_tasks}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")

    @classmethod
    def from_base_module(cls, base_module: nn.Module, hat_config: Any = None, num_tasks: Any = None,
                         **kwargs: Any) -> TaskIndexedLinear:
        """One head per task (and the no-task slot), each a copy of ``base_module``'s weights."""
        n = _num_tasks_from(cls, hat_config, num_tasks)
        if not isinstance(base_module, nn.Linear):
            raise HATTypeError(f"{cls.__name__}.from_base_module expects an nn.Linear; "
                               f"got {type(base_module).__name__}")
        w = base_module.weight
        new = cls(n, base_module.in_features, base_module.out_features, bias=base_module.bias is not None,
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w.detach().expand_as(new.weight))
            if new.bias is not None:
                new.bias.copy_(base_module.bias.detach().expand_as(new.bias))
        new.train(base_module.training)
        return new

    def to_base_module(self, task_id: Any = None, **kwargs: Any) -> nn.Linear:
        """The plain nn.Linear head of ``task_id`` (None: the no-task head)."""
        slot = self._hat_slot(check_task_id(task_id, self.num_tasks))
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                          dtype=self.weight.dtype).to_empty(device=self.weight.device)
        plain.weight = nn.Parameter(self.weight.detach()[slot].clone())
        if self.bias is not None:
            plain.bias = nn.Parameter(self.bias.detach()[slot].clone())
        plain.train(self.training)
        return plain


def _num_tasks_from(cls: type, hat_config: Any, num_tasks: Any) -> int:
    if hat_config is not None:
        check_config(hat_config)
        if num_tasks is not None and num_tasks != hat_config.num_tasks:
            raise HATTypeError(f"{cls.__name__}.from_base_module: num_tasks={num_tasks!r} disagrees with "
                               f"hat_config.num_tasks={hat_config.num_tasks}")
        return hat_config.num_tasks
    if num_tasks is None:
        raise HATTypeError(f"{cls.__name__}.from_base_module needs hat_config=HATConfig(...) or num_tasks=...")
    return HATConfig(num_tasks=num_tasks).num_tasks
