"""Forgetting a trained task on request: ``forget_task(model, t)``.

What task ``t`` owns goes back to what a fresh model holds, and what no task that stays needs is
given back to later tasks:

- its own rows: ``task_embedding[t]`` of every HAT layer drawn again as at construction (the
  config's ``init_strat``); row ``t`` of every task-indexed norm (affine and running statistics),
  head and per-task parameter copied from the no-task row (the values the layer was converted or
  built with, unless the model was trained with ``task_id=None``); its trained flag cleared;
- the weight entries it alone protected: those that HAT's conditioning protected with ``t``
  trained and does not protect for the tasks that stay are re-initialised as the layer's torch
  class initialises them (``reset_parameters``), not zeroed.

Every other trained task's evaluation outputs (hard masks) stay bit-identical: nothing that the
protection of the remaining tasks covers is written, and their rows are not touched.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from hat._checks import check_task_id
from hat._scores_state import drop as drop_task_scores
from hat.errors import HATTypeError, HATValueError
from hat.modules._base import HATMasked
from hat.protect.hooks import _plain_used, trained_tasks
from hat.tracking.tracked import TaskTracked, invalidate, task_modules
from hat.types_ import ForgetResult

__all__ = ["check_trained_task", "forget_task", "forget_tasks"]

# per-task buffers of task-indexed norms, one row per task slot like their affine parameters
_ROW_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class _Change(NamedTuple):
    """One tensor of one module and the entries forgetting resets (bool, the tensor's shape).
    ``how``: "embedding" (rows drawn again as at construction), "row" (rows copied from the
    no-task row, the last), "init" (entries re-initialised by the layer's torch class)."""

    module: nn.Module
    name: str
    entries: torch.Tensor
    how: str


def forget_task(model: nn.Module, task_id: Any, *, dry_run: bool = False, seed: int | None = None) -> ForgetResult:
    """Forget trained task ``task_id`` of ``model`` (any model with HAT layers: ``hat.convert``ed,
    a ``hat.timm_models`` network, or built from ``hat.modules``): its rows are reset and the weight
    entries it alone used are released for later tasks. Returns a ``ForgetResult``: per parameter
    or buffer (its name in ``model.state_dict()``), True where an entry was reset.

    - Task ``task_id``'s ``task_embedding`` rows are drawn again as a new layer draws them
      (``HATConfig.init_strat``, from torch's global random generator); its rows of task-indexed
      norms (weight, bias, running statistics), heads (``TaskIndexedLinear``) and per-task
      parameters are copied from the no-task row, which holds the values the layer was converted
      or built with; its trained flag is cleared (``hat.trained_tasks`` no longer lists it); its
      task-prediction statistics (``hat.fit_task_scores``) are removed.
    - Weight and bias entries that HAT's conditioning protected while ``task_id`` was trained,
      and does not protect for the trained tasks that stay, are released: ``hat.capacity`` counts
      their units as free and the next task trains them. They are re-initialised as the layer's
      torch class initialises a new layer (``reset_parameters()`` of a fresh copy), not zeroed:
      rows and columns of zeros make the released units identical (each computes what the others
      compute and gets the same gradient, so they stay copies of one feature), and a unit whose
      incoming and outgoing weights are all zero gets no gradient at all.
    - Entries no trained task ever protected (free before) are left as they are: they hold no
      task's knowledge, and later training already owns them.
    - Every other trained task's outputs in evaluation (hard masks) stay bit-identical.

    Optimizer state is not touched: momentum buffers and Adam moments of released entries still
    hold what ``task_id``'s training left there (they are free entries now, so this affects only
    how the next task starts, never the tasks that stay). For a clean start, drop it for those
    parameters (``optimizer.state.pop(p, None)`` for each parameter named in the result with an
    entry set) or create a new optimizer. Plain (non-HAT) parameters keep their values; the record
    that ``task_id`` used them is dropped, so a later task may train those no other task used.

    ``dry_run=True`` changes nothing and returns what would be reset. ``seed``: the new values are
    drawn from a generator seeded with it, the global one left as it was; under DDP pass the same
    seed on every rank, so that the ranks stay identical (without it each rank draws from its own
    global generator). Weights a parameter with ``requires_grad=False`` holds (kept fixed) are
    never released.

        result = hat.forget_task(model, 1)
        result.get_num_forgotten("weight")   # (entries reset, entries in all weights)
    """
    return forget_tasks(model, [task_id], dry_run=dry_run, seed=seed, caller="forget_task")[0]


def forget_tasks(model: nn.Module, task_ids: Iterable[Any], *, locked_task_ids: Any = None, dry_run: bool = False,
                 seed: int | None = None, prefix: str = "", caller: str = "forget_tasks") -> tuple[ForgetResult, int]:
    """Forget several trained tasks at once (``forget_task`` for each, in one pass), keeping
    ``locked_task_ids`` intact (None: every other trained task). A trained task neither forgotten
    nor locked keeps its rows and flag, but entries it shares only with forgotten tasks are
    released (hat-cl's ``locked_task_ids``). Returns the result, its names prefixed with
    ``prefix``, and how many weight and bias entries were released."""
    modules, tasks, locked = _check(model, task_ids, locked_task_ids, dry_run, caller)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise HATTypeError(f"{caller}: seed must be an int or None; got {seed!r}")
    changes = _plan(modules, tasks, locked)
    names = {id(m): name for name, m in model.named_modules()}
    result = ForgetResult()
    for c in changes:
        owner = names[id(c.module)]
        result[f"{prefix}{owner}.{c.name}" if owner else prefix + c.name] = c.entries
    released = sum(int(c.entries.sum()) for c in changes if c.how == "init")
    if not dry_run:
        _settle_statistics(model, tasks)
        with _drawing(model, seed):
            _apply(changes, tasks)
        _untrain(model, modules, tasks)
        drop_task_scores(model, tasks)  # its task-prediction statistics go with it
    return result, released


@contextlib.contextmanager
def _drawing(model: nn.Module, seed: int | None) -> Iterator[None]:
    """Random draws from torch's global generators, or, with ``seed``, from generators seeded with
    it that are dropped after (the global ones, CUDA's included, continue as before)."""
    if seed is None:
        yield
        return
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# -- checks (nothing is changed before they pass) ---------------------------------------------------
def check_trained_task(model: nn.Module, task_id: Any, name: str = "task_id") -> int:
    """``task_id`` as an int, or a clear error: a task id in range for every task-aware module of
    ``model`` (TaskIndexError), of a task the model has trained (HATValueError)."""
    modules = task_modules(model)
    if not modules:
        raise HATValueError(f"{type(model).__name__} has no HAT or task-indexed module: it has no tasks")
    for n in sorted({m.num_tasks for m in modules}):
        value = check_task_id(task_id, n, name=name, allow_none=False)
    trained = trained_tasks(model)
    if value not in trained:
        allowed = f"one of the trained tasks {trained}" if trained else "a trained task (the model has none)"
        raise HATValueError(f"{name} must be {allowed}; got {value}, which has not been trained "
                            "(or was forgotten already); see hat.trained_tasks(model)")
    return value


def _check(model: Any, task_ids: Iterable[Any], locked_task_ids: Any, dry_run: Any,
           caller: str) -> tuple[list[TaskTracked], frozenset[int], frozenset[int]]:
    if not isinstance(model, nn.Module):
        raise HATTypeError(f"{caller}: model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(dry_run, bool):
        raise HATTypeError(f"{caller}: dry_run must be True or False; got {dry_run!r}")
    modules = task_modules(model)
    if not modules:
        raise HATValueError(f"{caller}: {type(model).__name__} has no HAT or task-indexed module; nothing to forget")
    tasks = frozenset(check_trained_task(model, t) for t in task_ids)
    if locked_task_ids is None:
        return modules, tasks, frozenset(trained_tasks(model)) - tasks
    if isinstance(locked_task_ids, (str, bytes)) or not isinstance(locked_task_ids, Iterable):
        raise HATTypeError(f"locked_task_ids must be a list of trained task ids or None; got {locked_task_ids!r}")
    locked = frozenset(check_trained_task(model, t, "an entry of locked_task_ids") for t in locked_task_ids)
    if locked & tasks:
        forgotten = sorted(tasks)[0] if len(tasks) == 1 else sorted(tasks)
        raise HATValueError(f"locked_task_ids must not hold the task being forgotten; got locked_task_ids="
                            f"{sorted(locked)} with task_id={forgotten}")
    return modules, tasks, locked


# -- what changes (a pure function of the model's state) ----------------------------------------------
def _plan(modules: list[TaskTracked], tasks: frozenset[int], locked: frozenset[int]) -> list[_Change]:
    changes: list[_Change] = []
    for m in modules:
        changes += _row_changes(m, tasks)
        changes += _released(m, tasks, locked)
    return changes


def _row_changes(m: TaskTracked, tasks: frozenset[int]) -> list[_Change]:
    """The rows of ``tasks`` in ``m``'s per-task parameters and buffers."""
    out = []
    rows = sorted(tasks)
    for name in m._hat_row_params:
        p = m._parameters.get(name)
        if p is None:
            continue
        if isinstance(m, HATMasked) and name == "task_embedding":
            out.append(_Change(m, name, _row_mask(p, rows), "embedding"))
        elif p.shape[0] == m.num_tasks + 1:
            out.append(_Change(m, name, _row_mask(p, rows), "row"))
        else:
            raise HATValueError(f"cannot forget: {type(m).__name__}.{name} has {p.shape[0]} rows, not one per task "
                                f"slot ({m.num_tasks + 1})")
    for name in _ROW_BUFFERS:
        b = m._buffers.get(name)
        if isinstance(b, torch.Tensor) and b.dim() >= 1 and b.shape[0] == m.num_tasks + 1:
            out.append(_Change(m, name, _row_mask(b, rows), "row"))
    return out


def _row_mask(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    mask = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    mask[rows] = True
    return mask


def _released(m: TaskTracked, tasks: frozenset[int], locked: frozenset[int]) -> list[_Change]:
    """The entries of ``m``'s unit-protected parameters (weight, bias) that the protection of
    ``tasks | locked`` covers and that of ``locked`` does not. A frozen parameter (``requires_grad``
    False: pretrained weights the user keeps fixed) is left out: no task trained it."""
    params = [(n, m._parameters.get(n)) for n in m._hat_unit_params]
    params = [(n, p) for n, p in params if p is not None and p.requires_grad]
    if not params:
        return []
    if _reset_method(m) is None:
        raise HATTypeError(f"cannot forget: {type(m).__name__}'s torch class {m._hat_base.__name__} has no "
                           "reset_parameters() to re-initialise released weights with")
    before = _tasks_tensor(tasks | locked, m)
    after = _tasks_tensor(locked, m)
    return [_Change(m, n, _protected(m, n, p, before) & ~_protected(m, n, p, after), "init") for n, p in params]


def _tasks_tensor(tasks: frozenset[int], m: TaskTracked) -> torch.Tensor:
    out = torch.zeros(m.num_tasks, dtype=torch.bool, device=m.hat_trained.device)
    out[sorted(tasks)] = True
    return out


def _protected(m: TaskTracked, name: str, p: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    """Bool, ``p``'s shape: the entries a step protects while ``tasks`` are trained (as
    ``TaskTracked._hat_step_masks`` decides)."""
    if not bool(tasks.any()):
        return torch.zeros(p.shape, dtype=torch.bool, device=p.device)
    if m.__dict__.get("_hat_read_directly") is not None:  # read outside its forward: protected whole
        return torch.ones(p.shape, dtype=torch.bool, device=p.device)
    factors = m._hat_unit_mask(name, tasks)
    if factors is None:
        return torch.zeros(p.shape, dtype=torch.bool, device=p.device)
    mask = torch.ones(p.shape, dtype=torch.bool, device=p.device)
    for f in factors:
        mask &= f
    return mask


# -- applying it ------------------------------------------------------------------------------------
def _apply(changes: list[_Change], tasks: frozenset[int]) -> None:
    """Write the changes: every new value is drawn first, then everything is written."""
    embeddings = {id(c.module): _initial_embedding(c.module) for c in changes if c.how == "embedding"}
    inits = {id(m): _initial_values(m) for m in {id(c.module): c.module for c in changes if c.how == "init"}.values()}
    rows = torch.tensor(sorted(tasks), dtype=torch.long)
    with torch.no_grad():
        for c in changes:
            # from the dicts, not the attribute: a per-task parameter's attribute reads the selected row
            t = c.module._parameters.get(c.name, c.module._buffers.get(c.name))
            if c.how == "embedding":
                t[rows] = embeddings[id(c.module)][rows].to(t.device)
            elif c.how == "row":
                t[rows] = t[-1].unsqueeze(0).expand(len(rows), *t.shape[1:]).clone()
            else:
                t.copy_(torch.where(c.entries, inits[id(c.module)][c.name], t))


def _initial_embedding(m: HATMasked) -> torch.Tensor:
    """The task embedding a new layer with ``m``'s config would start with."""
    from hat.modules.masker import HATMasker

    emb = m.task_embedding
    return HATMasker(emb.shape[1], m.hat_config, device=emb.device, dtype=emb.dtype).task_embedding.detach()


def _reset_method(m: TaskTracked) -> Any:
    base = getattr(m, "_hat_base", None)
    return getattr(base, "reset_parameters", None) or getattr(base, "_reset_parameters", None)


def _initial_values(m: TaskTracked) -> dict[str, torch.Tensor]:
    """What the layer's torch class gives a new layer of ``m``'s shape: ``reset_parameters()`` run
    on a plain copy holding copies of ``m``'s parameters (one that it does not set keeps ``m``'s
    value, so its entries do not change)."""
    plain = m._hat_plain_copy(None)  # m's torch class; its parameter dict its own, HAT children made plain
    for name, p in list(plain._parameters.items()):
        if p is not None:
            plain._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
    with torch.no_grad():
        _reset_method(m)(plain)
    return {name: p.detach() for name, p in plain._parameters.items() if p is not None}


def _untrain(model: nn.Module, modules: list[TaskTracked], tasks: frozenset[int]) -> None:
    """Clear the tasks' trained flags and what the process recorded about them; every module's
    cached protection is rebuilt at the next step."""
    rows = sorted(tasks)
    for m in modules:
        m.hat_trained[rows] = False
        step = m._hat_step
        step.trained = None
        step.witnessed.difference_update(tasks)
        near_hard = m.__dict__.get("_hat_near_hard_batches")  # BatchNorm rows started anew by the next batch
        if near_hard is not None:
            for t in rows:
                near_hard.pop(t, None)
        invalidate(m)
    owned = {id(p) for m in modules for p in m._parameters.values() if p is not None}
    for p in model.parameters():
        used = None if id(p) in owned else _plain_used(p)
        if used is not None:
            for t in rows:
                if t < len(used):
                    used[t] = False


def _settle_statistics(model: nn.Module, tasks: frozenset[int]) -> None:
    """A converted model refreshes a task's BatchNorm rows when its training ends, at its next
    call (``hat.convert.statistics``). A forgotten task's refresh would undo the reset: it is
    dropped; one shared with tasks that stay (per-sample ids) runs now, before the reset."""
    from hat.convert.statistics import refresh_pending

    for m in model.modules():
        pending = m.__dict__.get("_hat_stats_pending")
        if pending is None:
            continue
        involved = set(pending.key) if isinstance(pending.key, tuple) else {pending.key}
        if not involved & tasks:
            continue
        if involved <= tasks:
            del m.__dict__["_hat_stats_pending"]
        else:
            refresh_pending(m)
