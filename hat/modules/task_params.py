"""Per-task copies of the small parameters a module holds itself (layer scales, class tokens,
position embeddings, relative position biases).

Such a parameter is not part of a layer HAT masks, so it cannot be shared unit by unit: left
shared, the first task that trains it would freeze it for every later one. ``hat.convert`` gives
each one rows ``[num_tasks + 1, *shape]`` instead (the last row serves ``task_id=None``), all
starting from the original value, and swaps the module's class for one deriving from it whose
attribute of that name reads the selected task's row: the module's own forward runs unchanged.
Only the rows of the tasks being trained change. Parameters larger than ``MAX_ENTRIES`` stay
shared (frozen whole once a task trained them). The derived classes are made by
``hat.modules._generated.derive_params``; ``make_task_parameters`` there applies them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hat._checks import check_task_id
from hat.errors import HATTypeError
from hat.tracking.selection import is_per_sample
from hat.tracking.tracked import TaskTracked, rows

__all__ = ["MAX_ENTRIES", "TaskParameters", "candidates"]

# a parameter with more entries than this stays shared: num_tasks + 1 copies would cost too much
MAX_ENTRIES = 2**20


class TaskParameters(TaskTracked):
    """Mixed into the class of a module whose own parameters ``_hat_row_params`` are per task.
    The derived classes (``hat.modules._generated.derive_params``) give each name a property
    returning the selected task's row."""

    def _hat_param_row(self, name: str) -> torch.Tensor | None:
        p = self._parameters.get(name)
        if p is None:
            return None
        if torch.compiler.is_compiling():
            task: Any = self.hat_ids if self._hat_per_sample else self.hat_task
        else:
            task = self._hat_state[0]
        if (isinstance(task, torch.Tensor) and task.dim() == 1) or is_per_sample(task):
            # a token [1, ...] per sample: [batch, ...]
            if p.shape[1] != 1:
                raise HATTypeError(
                    f"per-sample task ids: {type(self).__name__}.{name} of shape {tuple(p.shape[1:])} is per task but "
                    "not a token (a leading dimension of 1) that can be taken per sample; select one task at a time")
            ids = task if isinstance(task, torch.Tensor) else task.ids.to(p.device)
            return self._hat_mark(p.index_select(0, ids).flatten(0, 1), ids)
        slot = task if isinstance(task, torch.Tensor) else self._hat_slot(task)
        return rows(self, slot, p)[0]  # reports the slot to the probe: the task trained here

    def to_base_module(self, task_id: Any = None, **kwargs: Any) -> nn.Module:
        """This module, of the class it had before conversion, with ``task_id``'s rows (None: the
        no-task row). Its children are kept as they are."""
        task = check_task_id(task_id, self.num_tasks)
        slot = self._hat_slot(task)
        plain = self._hat_plain_copy(task)
        for name in self._hat_row_params:
            p = self._parameters.get(name)
            if p is not None:
                plain._parameters[name] = nn.Parameter(p.detach()[slot].clone(), requires_grad=p.requires_grad)
        return plain


    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in self._hat_row_params:  # hat 0.2's ViT stored a token [1, ...] as [num_tasks + 1, ...]
            p, saved = self._parameters.get(name), state_dict.get(prefix + name)
            if p is not None and isinstance(saved, torch.Tensor) and p.dim() >= 2 and p.shape[1] == 1 \
                    and saved.shape == p.shape[:1] + p.shape[2:]:
                state_dict[prefix + name] = saved.unsqueeze(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def candidates(module: nn.Module) -> list[str]:
    """The parameters of ``module`` itself that would become per task."""
    return [name for name, p in module._parameters.items()
            if p is not None and p.requires_grad and 0 < p.numel() <= MAX_ENTRIES]
