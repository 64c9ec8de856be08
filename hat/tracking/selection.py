"""Per-sample task ids: one batch whose samples belong to different tasks.

``HATPayload(x, task_id=ids)`` and ``hat.set_task(model, ids)`` take a 1-D integer tensor with one
task id per sample. Every task-aware module then computes each sample as its task would alone:

- a HAT layer runs its torch layer once on the whole batch and multiplies each sample by its task's
  mask (``E[ids]``, soft or hard): a batch of T tasks costs about one forward, not T;
- norms, heads, attention and per-task parameters run once per task present on that task's
  samples (``grouped``): each group is computed exactly as a batch of that task alone, and a
  training BatchNorm takes each task's statistics from its own samples only.

Training on such a batch trains every task present; protection keeps every other trained task
exact (the probes report all tasks present to the step).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from hat._checks import check_task_id
from hat.errors import HATTypeError, TaskIndexError

__all__ = ["PerSample", "check_selection", "grouped", "is_per_sample"]


class PerSample:
    """Task ids per sample: ``ids`` (a LongTensor ``[B]``) and ``tasks``, the distinct ids present
    (read once, when the selection is made)."""

    __slots__ = ("_groups", "ids", "tasks")

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids.long()
        self.tasks: tuple[int, ...] = tuple(sorted(set(self.ids.tolist())))
        self._groups: dict[Any, list[tuple[int, torch.Tensor]]] = {}

    def __len__(self) -> int:
        return self.ids.shape[0]

    def groups(self, device: torch.device) -> list[tuple[int, torch.Tensor]]:
        """``(task, the indexes of its samples)`` for each task present, on ``device``."""
        got = self._groups.get(device)
        if got is None:
            ids = self.ids.to(device)
            got = self._groups[device] = [(t, (ids == t).nonzero().flatten()) for t in self.tasks]
        return got

    def fits(self, batch: int) -> PerSample:
        """This selection, for a batch of ``batch`` samples (or a clear error)."""
        if len(self) != batch:
            raise HATTypeError(f"task_id holds {len(self)} per-sample ids for a batch of {batch} samples; select "
                               "one id per sample (hat.set_task(model, ids) before each batch)")
        return self

    def checked(self, num_tasks: int, name: str = "task_id") -> PerSample:
        if self.tasks and self.tasks[-1] >= num_tasks:
            raise TaskIndexError(f"{name} holds task {self.tasks[-1]}; ids must be in [0, {num_tasks})")
        return self

    def __repr__(self) -> str:
        return f"PerSample({len(self)} samples of tasks {list(self.tasks)})"


def is_per_sample(task: Any) -> bool:
    return isinstance(task, PerSample)


def check_selection(task_id: Any, num_tasks: int | None, *, name: str = "task_id",
                    batch: int | None = None) -> int | PerSample | None:
    """``check_task_id``, or a 1-D integer tensor of per-sample ids (``batch`` of them, each in
    ``[0, num_tasks)``) as a ``PerSample``; a ``PerSample`` is checked against ``num_tasks``."""
    if isinstance(task_id, PerSample):
        return task_id if num_tasks is None else task_id.checked(num_tasks, name)
    if not (isinstance(task_id, torch.Tensor) and task_id.dim() == 1):
        return check_task_id(task_id, num_tasks, name=name)
    if task_id.dtype.is_floating_point or task_id.dtype.is_complex or task_id.dtype == torch.bool:
        raise HATTypeError(f"{name} as per-sample ids must be an integer tensor; got dtype {task_id.dtype}")
    if task_id.numel() == 0:
        raise HATTypeError(f"{name} as per-sample ids must hold one id per sample; got an empty tensor")
    if batch is not None and task_id.shape[0] != batch:
        raise HATTypeError(f"{name} holds {task_id.shape[0]} per-sample ids for a batch of {batch} samples")
    if bool((task_id < 0).any()):
        raise TaskIndexError(f"{name} holds a negative id; ids must be in [0, {num_tasks or 'num_tasks'})")
    selection = PerSample(task_id)
    return selection if num_tasks is None else selection.checked(num_tasks, name)


def grouped(x: torch.Tensor, selection: PerSample, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """``fn(samples, task)`` for each task present, on that task's samples of ``x`` (dimension 0),
    the outputs put back in the samples' order."""
    selection.fits(x.shape[0])
    if len(selection.tasks) == 1:
        return fn(x, selection.tasks[0])
    out = None
    for task, index in selection.groups(x.device):
        y = fn(x.index_select(0, index), task)
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out.index_copy_(0, index, y)  # autograd follows in-place copies into a tensor it did not make
    return out
