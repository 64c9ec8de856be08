"""Exact protection of earlier tasks around every ``optimizer.step()``.

HAT conditions gradients, but momentum, Adam's moments and weight decay move parameters
whose gradient is zero. So around each step of any torch.optim optimizer (global step hooks,
installed once when ``hat`` is imported) we

- before the step: work out which tasks the step trains (the tasks whose gradients reached
  the optimizer's HAT modules since the last step), which trained tasks it must not touch,
  copy the parameters that hold protected entries, and, for an optimizer that is not
  elementwise (see ``_ELEMENTWISE``), condition their gradients as HAT does;
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
from hat._runtime import RUNTIME
from hat.errors import HATValueError
from hat.modules._base import HATMasked
from hat.tracking.tracked import TaskTracked, live_modules, on_first_module, task_modules

__all__ = ["condition_gradients", "install", "mark_trained", "trained_tasks"]

# torch.optim optimizers whose update of an entry reads that entry's gradient and state alone. For
# them the exact restore after the step is all the protection needs: conditioning the gradient
# too (two more passes over the gradient of every protected weight) would change only the state
# of entries the step is not allowed to change. Any other optimizer gets HAT's conditioned
# gradient before its step as well: in Adafactor, LBFGS or Muon one entry's gradient moves the
# update of the others, and a subclass or a third-party optimizer may do the same.
_ELEMENTWISE = frozenset({
    torch.optim.ASGD, torch.optim.Adadelta, torch.optim.Adagrad, torch.optim.Adam, torch.optim.AdamW,
    torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Rprop,
    torch.optim.SGD, torch.optim.SparseAdam,
})

def _plain_used(p: torch.Tensor) -> list[bool] | None:
    """Per task: did it train plain parameter ``p`` (None: none has)."""
    entry = RUNTIME.plain_used.get(id(p))  # keyed by id: tensors compare elementwise
    return entry[1] if entry is not None and entry[0]() is p else None


def _set_plain_used(p: torch.Tensor, used: list[bool]) -> None:
    table = RUNTIME.plain_used
    key = id(p)
    table[key] = (weakref.ref(p, lambda _r, _k=key: table.pop(_k, None)), used)


@dataclass
class _Protection:
    """What one step protects for one combination of training and protected tasks: the
    parameters, their snapshot buffers and masks. Built once and reused for every step of a task
    (rebuilt when the cache generation of one of its modules moves), so that a step costs no
    Python per parameter.

    Masks are ``Split`` factors (unit vectors broadcast over the parameter), never full size:
    ``part`` parameters are protected where ``rows`` is 1, ``grid`` parameters where ``rows``
    and ``cols`` both are (a weight: the output units and the input units that protected tasks
    use)."""

    whole: list[torch.Tensor] = field(default_factory=list)  # parameters restored whole
    whole_saved: list[torch.Tensor] = field(default_factory=list)
    part: list[torch.Tensor] = field(default_factory=list)  # parameters protected by row
    part_saved: list[torch.Tensor] = field(default_factory=list)
    part_rows: list[torch.Tensor] = field(default_factory=list)
    grid: list[torch.Tensor] = field(default_factory=list)  # parameters protected by row and column
    grid_saved: list[torch.Tensor] = field(default_factory=list)
    grid_rows: list[torch.Tensor] = field(default_factory=list)
    grid_free: list[torch.Tensor] = field(default_factory=list)  # 1 - cols
    # parameters whose gradient HAT conditions, with their masks' factors (None: no cols)
    conditioned: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]] = field(
        default_factory=list)
    # task embeddings, grouped by their config's attn_clamp (clamped after every step)
    clamps: list[tuple[float, list[torch.Tensor]]] = field(default_factory=list)

    def add(self, optimizer: Any, p: torch.Tensor, split: Any, condition: bool = False) -> None:
        buf = _buffer(optimizer, p)
        if split is None:
            self.whole.append(p)
            self.whole_saved.append(buf)
        elif split.cols is None:
            self.part.append(p)
            self.part_saved.append(buf)
            self.part_rows.append(split.rows)
        else:
            self.grid.append(p)
            self.grid_saved.append(buf)
            self.grid_rows.append(split.rows)
            self.grid_free.append(1 - split.cols)
        if condition:
            # HAT's conditioning (the gradient of protected entries is 0), for optimizers in which
            # the gradient of one entry moves the update of others
            self.conditioned.append((p, split.rows, split.cols, buf))


@dataclass
class _Plan:
    key: tuple[int, ...]
    modules: list[TaskTracked]
    plain: list[nn.Parameter]
    in_optimizer: set[int]
    condition: bool  # condition gradients before the step (the optimizer is not elementwise)
    protections: dict[Any, _Protection] = field(default_factory=dict)
    seen: int = -1  # RUNTIME.generation when the generations below were read
    generations: tuple[Any, ...] = ()  # its modules' cache generations

    def protection(self, optimizer: Any, training: dict[int, set[int]],
                   protected: dict[int, frozenset[int]]) -> _Protection:
        if self.seen != RUNTIME.generation:  # some module's caches moved: were they this plan's?
            self.seen = RUNTIME.generation
            generations = tuple(m._hat_cache_generation() for m in self.modules)
            if generations != self.generations:
                self.generations = generations
                self.protections.clear()
        key = tuple((n, frozenset(training[n]), protected[n]) for n in sorted(training))
        got = self.protections.get(key)
        if got is None:
            if len(self.protections) > 16:
                self.protections.clear()
            got = self.protections[key] = _Protection()
            for _, p, split, condition in _protected_entries(self.modules, training, protected):
                if id(p) in self.in_optimizer:
                    got.add(optimizer, p, split, condition and self.condition)
            by_clamp: dict[float, list[torch.Tensor]] = {}
            for m in self.modules:
                if isinstance(m, HATMasked):
                    by_clamp.setdefault(m.hat_config.attn_clamp, []).append(m.task_embedding)
            got.clamps = list(by_clamp.items())
        return got


@dataclass
class _Pending:
    """What the post-step hook must do for one optimizer step. The tensors are the parameters
    themselves: the hooks run under no_grad, where in-place foreach ops on them are allowed."""

    modules: list[TaskTracked]
    newly_trained: dict[int, list[int]]  # id(module) -> tasks to mark trained after the step
    protection: _Protection
    plain: list[torch.Tensor] = field(default_factory=list)  # plain parameters restored whole this step
    plain_saved: list[torch.Tensor] = field(default_factory=list)

    def add_whole(self, optimizer: Any, p: torch.Tensor) -> None:
        self.plain.append(p)
        self.plain_saved.append(_buffer(optimizer, p))

    def snapshot(self) -> None:
        # multi-tensor ops: one call for all parameters instead of a few per parameter
        pr = self.protection
        _condition([(p.grad, rows, cols, buf) for p, rows, cols, buf in pr.conditioned if p.grad is not None])
        params = pr.whole + self.plain + pr.part + pr.grid  # one call for every kind
        if params:
            torch._foreach_copy_(pr.whole_saved + self.plain_saved + pr.part_saved + pr.grid_saved, params)

    def restore(self) -> None:
        pr = self.protection
        for clamp, embeddings in pr.clamps:
            torch._foreach_clamp_min_(embeddings, -clamp)
            torch._foreach_clamp_max_(embeddings, clamp)
        whole, saved = pr.whole + self.plain, pr.whole_saved + self.plain_saved
        if whole:
            torch._foreach_copy_(whole, saved)
        # lerp(p, old, w): torch computes p + w * (old - p) for w < 0.5 and old - (old - p) * (1 - w)
        # otherwise, so a 0/1 weight gives p or old exactly, in one pass over the parameter
        if pr.grid:
            # two passes with the unit vectors: the snapshot takes the new values in columns no
            # protected task reads, then the protected rows take the snapshot: old exactly where
            # row and column are protected, new everywhere else (the snapshot is taken anew
            # before every step). The second pass is the one of the parameters protected by row.
            torch._foreach_lerp_(pr.grid_saved, pr.grid, pr.grid_free)
        if pr.part or pr.grid:
            torch._foreach_lerp_(pr.part + pr.grid, pr.part_saved + pr.grid_saved, pr.part_rows + pr.grid_rows)


def _plan(optimizer: torch.optim.Optimizer) -> _Plan:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    key = tuple(id(p) for p in params)
    plan = RUNTIME.plans.get(optimizer)
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
    plan = _Plan(key, modules, plain if modules else [], set(key), type(optimizer) not in _ELEMENTWISE)
    RUNTIME.plans[optimizer] = plan
    return plan


def _pre_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    RUNTIME.pending.pop(optimizer, None)
    plan = _plan(optimizer)
    if not plan.modules:
        return
    training, protected = _step_tasks(plan.modules)
    newly = {id(m): sorted(t for t in training[m.num_tasks] - m._hat_trained_set() if t < m.num_tasks)
             for m in plan.modules}
    pending = _Pending(plan.modules, newly, plan.protection(optimizer, training, protected))
    RUNTIME.pending[optimizer] = pending
    if plan.plain:
        n = max(training)
        if training[n] != {n}:
            witnessed = set().union(*(m._hat_step.witnessed for m in plan.modules if m.num_tasks == n))
            unseen = protected[n] - witnessed
            _protect_plain(optimizer, plan.plain, n, training[n] - {n}, protected[n], unseen, pending)
    with torch.no_grad():
        pending.snapshot()


def _step_tasks(modules: list[TaskTracked]) -> tuple[dict[int, set[int]], dict[int, frozenset[int]]]:
    """Per num_tasks (one model: one entry): the slots the latest backwards trained, and the
    trained tasks that must not change."""
    _read_latest(modules)
    training: dict[int, set[int]] = {}
    trained: dict[int, set[int]] = {}
    for m in modules:
        training.setdefault(m.num_tasks, set()).update(m._hat_step.bwd)
        trained.setdefault(m.num_tasks, set()).update(m._hat_trained_set())
    return training, {n: frozenset(trained[n] - training[n]) for n in training}


def _protected_entries(modules: list[TaskTracked], training: dict[int, set[int]],
                       protected: dict[int, frozenset[int]]) -> Any:
    """(module, parameter, its protected entries, condition its gradient) for one step; nothing
    where only "no task" trains (plain training protects nothing)."""
    for m in modules:
        n = m.num_tasks
        if training[n] != {n}:
            for p, split, condition in m._hat_step_masks(training[n], protected[n]):
                yield m, p, split, condition


def _read_latest(modules: list[TaskTracked]) -> None:
    """Turn the reports of the latest backwards into slot sets: probe gradients (one sync for
    all) and the slots the group mask node reported in Python."""
    reading = [m for m in modules if m._hat_step.latest is not None]
    from_probe: dict[int, set[int]] = {}
    if reading:
        grads = [m._hat_step.latest for m in reading]
        device = grads[0].device
        if any(g.device != device for g in grads):
            grads = [g.to(device) for g in grads]
        flat = (torch.cat(grads) if len(grads) > 1 else grads[0]).tolist()  # one op and one sync for all
        i = 0
        for m, g in zip(reading, grads):
            n = g.shape[0]
            from_probe[id(m)] = {s for s in range(n) if flat[i + s] != 0}
            i += n
    for m in modules:
        step = m._hat_step
        if step.reported_graph is not None or id(m) in from_probe:
            step.take(from_probe.get(id(m)))


def _buffer(optimizer: Any, p: torch.Tensor) -> torch.Tensor:
    """A snapshot buffer for ``p``, kept across steps: allocating megabytes every step costs
    page faults that show in the step time."""
    buffers = RUNTIME.buffers.setdefault(optimizer, {})
    buf = buffers.get(id(p))
    if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
        buf = buffers[id(p)] = torch.empty_like(p, memory_format=torch.contiguous_format)
    return buf


def _protect_plain(optimizer: Any, plain: list[nn.Parameter], num_tasks: int, now: set[int], protected: frozenset[int],
                   unseen: frozenset[int], pending: _Pending) -> None:
    """Record which tasks train each plain parameter and protect those that trained tasks use.

    The record lives in this process only. ``unseen``: protected tasks trained before this
    model object existed (it was copied or loaded from a checkpoint): which plain parameters
    they used is unknown, so every plain parameter without a record is assumed used by them.
    """
    assumed: list[nn.Parameter] = []
    blocked: list[nn.Parameter] = []
    for p in plain:
        used = _plain_used(p)
        if used is None and unseen:
            used = [t in unseen for t in range(num_tasks)]
            _set_plain_used(p, used)
            assumed.append(p)
        has_grad = bool(now) and p.grad is not None and bool(p.grad.any())
        if used is not None and any(used[t] for t in protected):
            pending.add_whole(optimizer, p)
            if has_grad and id(p) not in RUNTIME.warned_blocked:
                RUNTIME.warned_blocked.add(id(p))
                blocked.append(p)
        if has_grad:
            if used is None:
                used = [False] * num_tasks
                _set_plain_used(p, used)
            for t in now:
                used[t] = True
    if assumed:
        warnings.warn(
            f"hat: task(s) {sorted(unseen)} were trained before this model was copied or loaded, and which plain "
            f"(non-HAT) parameters they used is not known here; {len(assumed)} plain parameter(s) of shape "
            f"{_shapes(assumed)} are protected whole to keep those tasks intact. Per-task heads that should stay "
            "trainable belong in hat.modules.TaskIndexedLinear.",
            stacklevel=4,
        )
    if blocked:
        # per-task heads never get here: only a plain parameter that a later task also trains
        warnings.warn(
            f"hat: {len(blocked)} plain (non-HAT) parameter(s) of shape {_shapes(blocked)} get gradients from task(s) "
            f"{sorted(now)} but an earlier task trained them, so they stay frozen to keep it intact. Make them "
            "task-aware (hat.convert them, or use hat.modules.TaskIndexedLinear for a shared head).",
            stacklevel=4,  # the user's optimizer.step() line
        )


# plain parameters (by id) already warned about, so that a warning comes once


def _shapes(params: list[nn.Parameter]) -> str:
    return ", ".join(str(tuple(p.shape)) for p in params[:8]) + (" ..." if len(params) > 8 else "")


def _post_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    RUNTIME.steps += 1  # any step may have changed embeddings: cached masks are recomputed
    pending = RUNTIME.pending.pop(optimizer, None)
    if pending is None:
        return
    with torch.no_grad():
        pending.restore()  # clamps the embeddings, then puts protected entries back
        for m in pending.modules:
            m._hat_end_step(pending.newly_trained[id(m)])


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
        m.__dict__["_hat_trained_here"] = True
        m._hat_step.trained = None


def _condition(entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]) -> None:
    """``g -= g * rows * cols`` for each (gradient, rows, cols, scratch): exactly 0 on protected
    entries and ``g`` elsewhere (0/1 factors), in multi-tensor ops. ``scratch`` (the snapshot
    buffer, written again after this; None: a temporary) holds ``g * cols``."""
    by_row = [(g, rows) for g, rows, cols, _ in entries if cols is None]
    if by_row:
        torch._foreach_addcmul_([g for g, _ in by_row], [g for g, _ in by_row], [r for _, r in by_row], value=-1.0)
    grid = [e for e in entries if e[2] is not None]
    if grid:
        grads = [g for g, *_ in grid]
        # g * cols written straight into the scratch: one pass (a foreach copy and multiply took two)
        scratch = [torch.mul(g, cols) if buf is None else torch.mul(g, cols, out=buf) for g, _, cols, buf in grid]
        torch._foreach_addcmul_(grads, scratch, [rows for _, rows, _, _ in grid], value=-1.0)


def condition_gradients(model: nn.Module) -> None:
    """Apply HAT's gradient conditioning to ``model``'s gradients now (after ``backward()``).

    ``optimizer.step()`` restores protected entries exactly with any torch.optim optimizer, and
    conditions the gradients itself for those that are not elementwise (Adafactor, LBFGS, Muon,
    subclasses and third-party optimizers): for SGD, Adam and the other elementwise ones the
    restore alone keeps earlier tasks intact, and the gradients they leave are not conditioned.
    Call it in loops that update parameters by hand (with ``mark_trained``
    after each task), or before gradient clipping to clip the conditioned gradients, as the paper
    does. Calling it twice changes nothing (the masks are 0/1).
    """
    modules = task_modules(model)
    if not modules:
        raise HATValueError(f"condition_gradients: {type(model).__name__} has no HAT or task-indexed module")
    training, protected = _step_tasks(modules)
    _condition([(p.grad, split.rows, split.cols, None)
                for _, p, split, condition in _protected_entries(modules, training, protected)
                if condition and p.grad is not None])


def trained_tasks(model: nn.Module) -> list[int]:
    """The tasks that some module of ``model`` has been trained on, sorted."""
    out: set[int] = set()
    for m in task_modules(model):
        out.update(m.hat_trained.nonzero().flatten().tolist())
    return sorted(out)


_HANDLES: list[Any] = []


def install() -> None:
    """Register the global optimizer step hooks (idempotent). Done when the first task-aware
    module is made: a process that imports hat but builds no HAT model has no hooks."""
    if not _HANDLES:
        _HANDLES.append(register_optimizer_step_pre_hook(_pre_step))
        _HANDLES.append(register_optimizer_step_post_hook(_post_step))


def uninstall() -> None:
    """Remove the global optimizer step hooks (idempotent): steps then protect nothing until
    ``install()`` or the next task-aware module made."""
    while _HANDLES:
        _HANDLES.pop().remove()


def installed() -> bool:
    return bool(_HANDLES)


on_first_module(install)
