"""Exact protection of earlier tasks around every ``optimizer.step()``.

HAT conditions gradients, but momentum, Adam's moments and weight decay move parameters
whose gradient is zero. So around each step of any torch.optim optimizer (global step hooks,
installed once when ``hat`` is imported) we

- before the step: work out which tasks the step trains (the tasks whose gradients reached
  the optimizer's HAT modules since the last step), which trained tasks it must not touch,
  and copy the parameters that hold protected entries;
- after the step: clamp the task embeddings, put every protected entry back to the bit, and
  mark the trained tasks.

Plain (non-HAT) parameters in the same optimizer that receive a nonzero gradient while some
task trains become "used" by that task, and are protected whole while later tasks train.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from hat._checks import check_task_id
from hat._core import HATMasked, TaskTracked, live_modules, task_modules
from hat._errors import HATValueError

__all__ = ["mark_trained", "trained_tasks", "install"]

# id(plain parameter) -> (weakref to it, bool [num_tasks]: the tasks that trained it). Keyed by id:
# tensors compare elementwise, so they cannot be dictionary keys themselves.
_PLAIN_USED: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def _plain_used(p: torch.Tensor) -> torch.Tensor | None:
    entry = _PLAIN_USED.get(id(p))
    return entry[1] if entry is not None and entry[0]() is p else None


def _set_plain_used(p: torch.Tensor, used: torch.Tensor) -> None:
    key = id(p)
    _PLAIN_USED[key] = (weakref.ref(p, lambda _r, _k=key: _PLAIN_USED.pop(_k, None)), used)


@dataclass
class _Plan:
    key: tuple[int, ...]
    modules: list[TaskTracked]
    plain: list[nn.Parameter]
    in_optimizer: set[int]


@dataclass
class _Pending:
    modules: list[TaskTracked]
    training: dict[int, torch.Tensor]
    saved: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = field(default_factory=list)


_PLANS: weakref.WeakKeyDictionary[Any, _Plan] = weakref.WeakKeyDictionary()
_PENDING: weakref.WeakKeyDictionary[Any, _Pending] = weakref.WeakKeyDictionary()


def _plan(optimizer: torch.optim.Optimizer) -> _Plan:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    key = tuple(id(p) for p in params)
    plan = _PLANS.get(optimizer)
    if plan is not None and plan.key == key:
        return plan
    owners: dict[int, TaskTracked] = {}
    for module in live_modules():
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] = module
    modules: list[TaskTracked] = []
    seen: set[int] = set()
    plain: list[nn.Parameter] = []
    for p in params:
        owner = owners.get(id(p))
        if owner is None:
            plain.append(p)
        elif id(owner) not in seen:
            seen.add(id(owner))
            modules.append(owner)
    plan = _Plan(key, modules, plain if modules else [], set(key))
    _PLANS[optimizer] = plan
    return plan


def _pre_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _PENDING.pop(optimizer, None)
    plan = _plan(optimizer)
    if not plan.modules:
        return
    # the slots this step trains, and the trained tasks, per num_tasks (one model: one entry)
    training: dict[int, torch.Tensor] = {}
    trained: dict[int, torch.Tensor] = {}
    for m in plan.modules:
        t = m.num_tasks
        training[t] = m._hat_bwd if t not in training else training[t] | m._hat_bwd
        trained[t] = m.hat_trained if t not in trained else trained[t] | m.hat_trained
    pending = _Pending(plan.modules, training)
    _PENDING[optimizer] = pending
    protected = {t: trained[t] & ~training[t][:t] for t in training}
    plain_training = {t: not bool(training[t][:t].any()) and bool(training[t][t]) for t in training}
    saved = pending.saved
    for m in plan.modules:
        t = m.num_tasks
        if plain_training[t]:
            continue  # task_id=None: plain training, nothing protected
        for p, mask in m._hat_step_masks(training[t], protected[t]):
            if id(p) in plan.in_optimizer and bool(mask.any()):
                saved.append((p, None if bool(mask.all()) else mask, p.detach().clone()))
    if plan.plain:
        _protect_plain(plan.plain, training, protected, plain_training, saved)


def _protect_plain(plain: list[nn.Parameter], training: dict[int, torch.Tensor], protected: dict[int, torch.Tensor],
                   plain_training: dict[int, bool], saved: list) -> None:
    num_tasks = max(training)
    if plain_training[num_tasks]:
        return
    now = training[num_tasks][:num_tasks]
    newly: list[nn.Parameter] = []
    for p in plain:
        used = _plain_used(p)
        if used is not None and bool((used & protected[num_tasks]).any()):
            saved.append((p, None, p.detach().clone()))
        if p.grad is not None and bool(now.any()) and bool(p.grad.any()):
            if used is None:
                used = torch.zeros(num_tasks, dtype=torch.bool)
                _set_plain_used(p, used)
                newly.append(p)
            used |= now.cpu()
    if newly:
        shapes = ", ".join(str(tuple(p.shape)) for p in newly[:8]) + (" ..." if len(newly) > 8 else "")
        warnings.warn(
            f"hat: {len(newly)} plain (non-HAT) parameter(s) of shape {shapes} were trained by task(s) "
            f"{now.nonzero().flatten().tolist()}; they are now protected whole while later tasks train. "
            "Give each task its own head (hat.modules.TaskIndexedLinear) to keep them trainable.",
            stacklevel=5,  # the user's optimizer.step() line
        )


def _post_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    pending = _PENDING.pop(optimizer, None)
    if pending is None:
        return
    with torch.no_grad():
        for m in pending.modules:
            if isinstance(m, HATMasked):
                clamp = m.hat_config.attn_clamp
                m.task_embedding.clamp_(-clamp, clamp)
        for p, mask, old in pending.saved:
            if mask is None:
                p.copy_(old)
            else:
                p.copy_(torch.where(mask, old, p))
        for m in pending.modules:
            t = m.num_tasks
            m.hat_trained.logical_or_(pending.training[t][:t])
            m._hat_bwd.zero_()


def mark_trained(model: nn.Module, task_id: Any) -> None:
    """Record that ``task_id`` was trained, for loops that update parameters without torch.optim.

    With any torch.optim optimizer this happens on its own at the first step of the task.
    """
    modules = task_modules(model)
    if not modules:
        raise HATValueError(f"mark_trained: {type(model).__name__} has no HAT or task-indexed module")
    checked = [check_task_id(task_id, m.num_tasks, allow_none=False) for m in modules]
    for m, t in zip(modules, checked):
        m.hat_trained[t] = True


def trained_tasks(model: nn.Module) -> list[int]:
    """The tasks that some module of ``model`` has been trained on, sorted."""
    out: set[int] = set()
    for m in task_modules(model):
        out.update(m.hat_trained.nonzero().flatten().tolist())
    return sorted(out)


_HANDLES: list[Any] = []


def install() -> None:
    """Register the global optimizer step hooks (idempotent)."""
    if not _HANDLES:
        _HANDLES.append(register_optimizer_step_pre_hook(_pre_step))
        _HANDLES.append(register_optimizer_step_post_hook(_post_step))
