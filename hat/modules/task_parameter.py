"""``TaskIndexedParameter``: hat-cl's per-task parameter (a class token, a position embedding), one
value per task, as a module that indexes like hat-cl's list (``p[task_id]``, ``len(p)``, ``for row
in p``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hat._checks import check_task_id
from hat.config import HATConfig
from hat.errors import HATTypeError, HATValueError
from hat.modules.task_params import TaskParameters
from hat.payload import HATPayload
from hat.tracking.tracked import rows

__all__ = ["TaskIndexedParameter"]


class TaskIndexedParameter(TaskParameters, nn.Module):
    """One value of ``data``'s shape per task, stacked in one Parameter ``weight`` of shape
    ``[num_tasks + 1, *data.shape]``: row ``t`` is task ``t``'s, the last row serves ``task_id=None``
    and keeps ``data`` (``hat.forget_task`` resets a task's row to it). Every row starts as a copy
    of ``data``, in storage of its own.

    ``p[t]`` is task ``t``'s row (``p[None]`` the no-task row, ``p[payload]`` the payload's task),
    a view that gradients flow through; a step of any torch.optim optimizer changes only the rows
    of the tasks it trains, and earlier tasks' rows stay bit-identical. ``p()`` is the row of the
    task ``hat.set_task`` selected. ``len(p)`` is ``num_tasks`` and iterating gives the task rows,
    as hat-cl's list did (``for row in p: nn.init.trunc_normal_(row, std=0.02)`` sets every task's).

    hat-cl made every entry a Parameter of the *same* tensor, so training one task moved all
    of them (its ViT forgot earlier tasks); state dicts saved by hat-cl (``<name>.0``,
    ``<name>.1`` ...) load into the rows.

        self.pos_embed = TaskIndexedParameter(num_tasks=5, data=torch.randn(1, 197, 192) * 0.02)
        x = x + self.pos_embed[payload.task_id]
    """

    _hat_row_params = ("weight",)
    _hat_takes_payload = False  # a parameter: nothing to apply to a payload's data
    #: hat-cl's ``base_class``: what one row is
    base_class = nn.Parameter

    def __init__(self, num_tasks: int, data: torch.Tensor | None = None, requires_grad: bool = True) -> None:
        super().__init__()
        num_tasks = HATConfig(num_tasks=num_tasks).num_tasks  # the config's checks and messages
        if data is None:
            data = torch.empty(0)
        if not isinstance(data, torch.Tensor):
            raise HATTypeError(f"data must be a torch.Tensor or None; got {type(data).__name__}")
        if not isinstance(requires_grad, bool):
            raise HATTypeError(f"requires_grad must be True or False; got {requires_grad!r}")
        data = data.detach()
        self.weight = nn.Parameter(data.unsqueeze(0).expand(num_tasks + 1, *data.shape).clone(),
                                   requires_grad=requires_grad)
        self._hat_init_tracking(num_tasks, data.device)

    # -- hat-cl's list interface ---------------------------------------------------------------
    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, HATPayload):
            key = key.task_id
        if isinstance(key, torch.Tensor) and key.dim() == 1:
            raise HATTypeError("TaskIndexedParameter takes one task id (an int, None or a payload with one task); "
                               "got per-sample ids")
        slot = self._hat_slot(check_task_id(key, self.num_tasks))
        return rows(self, slot, self.weight)[0]  # reports the task to the probe: the step protects the others

    def __len__(self) -> int:
        return self.num_tasks

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[t] for t in range(self.num_tasks))

    def forward(self) -> torch.Tensor:
        """The row of the task ``hat.set_task`` selected (None: the no-task row)."""
        return self._hat_param_row("weight")

    # -- conversion ------------------------------------------------------------------------------
    @classmethod
    def from_base_module(cls, base_module: torch.Tensor, hat_config: Any = None, num_tasks: Any = None,
                         **kwargs: Any) -> TaskIndexedParameter:
        """A TaskIndexedParameter whose every row is a copy of ``base_module`` (a Parameter)."""
        if hat_config is not None:
            num_tasks = hat_config.num_tasks
        if num_tasks is None:
            raise HATTypeError("TaskIndexedParameter.from_base_module needs hat_config=HATConfig(...) or num_tasks=...")
        if not isinstance(base_module, torch.Tensor):
            raise HATTypeError(f"TaskIndexedParameter.from_base_module expects a Parameter; "
                               f"got {type(base_module).__name__}")
        return cls(num_tasks, base_module, requires_grad=base_module.requires_grad)

    def load_from_base_module(self, base_module: torch.Tensor) -> None:
        """Copy ``base_module`` (a Parameter of one row's shape) into every row."""
        value = base_module.detach() if isinstance(base_module, torch.Tensor) else None
        if value is None or value.shape != self.weight.shape[1:]:
            got = tuple(value.shape) if value is not None else type(base_module).__name__
            raise HATValueError(f"load_from_base_module expects a tensor of shape {tuple(self.weight.shape[1:])}; "
                                f"got {got}")
        with torch.no_grad():
            self.weight.copy_(value.expand_as(self.weight))

    def to_base_module(self, task_id: Any = None, **kwargs: Any) -> nn.Parameter:
        """Task ``task_id``'s row (None: the no-task row) as a Parameter of its own."""
        slot = self._hat_slot(check_task_id(task_id, self.num_tasks))
        return nn.Parameter(self.weight.detach()[slot].clone(), requires_grad=self.weight.requires_grad)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        """Also loads hat-cl's keys: one per task, ``<prefix>0`` ... ``<prefix>{num_tasks - 1}``
        (the no-task row and the trained flags, which hat-cl had not, keep their values)."""
        keys = [f"{prefix}{t}" for t in range(self.num_tasks)]
        if prefix + "weight" not in state_dict and all(k in state_dict for k in keys):
            saved = [state_dict.pop(k) for k in keys]
            state_dict[prefix + "weight"] = torch.stack([*saved, self.weight.detach()[-1].to(saved[0].device)])
            state_dict.setdefault(prefix + "hat_trained", self.hat_trained.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, shape={tuple(self.weight.shape[1:])}"
