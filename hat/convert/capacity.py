"""``hat.capacity(model)``: per HAT layer and trained task, which units the task uses, how many
of them an earlier task already used (shared), how many it added, and how many units no trained
task uses (free, what later tasks can still train)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from hat.errors import HATTypeError
from hat.modules._base import HATMasked

__all__ = ["LayerCapacity", "TaskCapacity", "capacity"]


class TaskCapacity(NamedTuple):
    """One trained task in one layer: ``used`` units (hard mask on), of which ``shared`` were used
    by an earlier task (a lower task id) and ``added`` were not (``used = shared + added``)."""

    task: int
    used: int
    shared: int
    added: int


class LayerCapacity(NamedTuple):
    """One HAT layer: its ``units``, each trained task's use in task order, and the units no
    trained task uses (``free = units - sum of added``)."""

    name: str
    units: int
    tasks: tuple[TaskCapacity, ...]
    free: int

    @property
    def used(self) -> int:
        """Units some trained task uses."""
        return self.units - self.free


def capacity(model: nn.Module) -> list[LayerCapacity]:
    """The capacity report of every HAT layer of ``model`` (itself included), in
    ``model.named_modules()`` order; layers whose masks are over their input (``HATMasker``)
    are left out. Hard masks (``task_embedding > 0``) of the tasks each layer has trained."""
    if not isinstance(model, nn.Module):
        raise HATTypeError(f"capacity: model must be a torch.nn.Module; got {type(model).__name__}")
    report = []
    for name, m in model.named_modules():
        if not isinstance(m, HATMasked) or not getattr(m, "_hat_has_weights", True):
            continue
        with torch.no_grad():
            on = m.task_embedding.detach() > 0
            taken = torch.zeros(on.shape[1], dtype=torch.bool, device=on.device)
            tasks = []
            for t in m.hat_trained.nonzero().flatten().tolist():
                used, shared = int(on[t].sum()), int((on[t] & taken).sum())
                tasks.append(TaskCapacity(t, used, shared, used - shared))
                taken |= on[t]
        report.append(LayerCapacity(name, int(on.shape[1]), tuple(tasks), int((~taken).sum())))
    return report
