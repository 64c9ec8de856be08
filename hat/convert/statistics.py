"""BatchNorm statistics of a finished task, taken with its final weights and hard masks.

A task-indexed BatchNorm's running statistics come from training batches (see
``_TaskIndexedBatchNorm``), each forwarded with the weights of its step: the last one is one
optimizer step behind the weights evaluation uses, and in short schedules that step alone can
move the statistics far (eval at chance after 100% train accuracy). So a converted model keeps
the inputs of the latest training batches of a task (cloned, a few hundred samples at most), and
when that task's training ends (the model's next call evaluates, trains another task or runs
without a task), it forwards them once more, in one call without gradients, in training mode
with the task's hard masks: every task-indexed BatchNorm's row of
that task is replaced by the statistics of the network evaluation runs. Only that task's rows
change; every other task stays bit-identical.

The refresh is a second call of the model: forward hooks see it, and modules that keep state in
training mode (other than the task's BatchNorm rows) see one more batch. Random generators are
forked, so the user's random stream is unchanged.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from hat.modules.norm import _TaskIndexedBatchNorm
from hat.payload import HATPayload
from hat.tracking.selection import check_selection, is_per_sample
from hat.tracking.tracked import task_modules

__all__ = ["before_call"]

_REFRESHING = [False]


# the inputs kept for a refresh: the task's latest training batches, up to this many samples and
# bytes (at least the latest batch); statistics over a few hundred samples are steady
KEEP_SAMPLES = 512
KEEP_BYTES = 64 * 2**20


class _Batch(NamedTuple):
    args: tuple
    kwargs: dict
    size: int  # samples (dimension 0 of the first tensor)
    nbytes: int
    ids: torch.Tensor | None  # the per-sample ids selected with set_task (payloads carry their own)


@dataclass
class _Pending:
    """The latest training batches of the task (or tasks, with per-sample ids) being trained
    (their inputs, cloned). ``key``: the task, or the tasks present."""

    key: Any
    batches: deque[_Batch] = field(default_factory=deque)

    def add(self, batch: _Batch) -> None:
        self.batches.append(batch)
        while len(self.batches) > 1 and (
                sum(b.size for b in self.batches) - self.batches[0].size >= KEEP_SAMPLES
                or sum(b.nbytes for b in self.batches) > KEEP_BYTES):
            self.batches.popleft()

    def call(self) -> tuple[tuple, dict, torch.Tensor | None]:
        """One call over every kept batch, concatenated along dimension 0 (with their per-sample
        ids); the latest batch alone where the calls differ other than in their batch tensors."""
        latest = self.batches[-1]
        flats = [tree_flatten((b.args, b.kwargs)) for b in self.batches]
        spec = flats[-1][1]
        if len(flats) == 1 or any(f[1] != spec for f in flats):
            return latest.args, latest.kwargs, latest.ids
        leaves = []
        for i, leaf in enumerate(flats[-1][0]):
            column = [_data(f[0][i]) for f in flats]
            data = _data(leaf)
            if isinstance(data, torch.Tensor) and data.dim() > 0 and all(
                    isinstance(c, torch.Tensor) and c.shape[0] == b.size and c.shape[1:] == data.shape[1:]
                    for c, b in zip(column, self.batches)):
                joined = torch.cat(column)
                if isinstance(leaf, HATPayload):
                    task_ids = [f[0][i].task_id for f in flats]
                    ids = torch.cat(task_ids) if isinstance(leaf.task_id, torch.Tensor) else leaf.task_id
                    joined = HATPayload(joined, task_id=ids)
                leaves.append(joined)
            elif all(c is leaf or (not isinstance(c, torch.Tensor) and c == leaf) for c in column):
                leaves.append(leaf)
            else:
                return latest.args, latest.kwargs, latest.ids
        ids = None if latest.ids is None else torch.cat([b.ids for b in self.batches])
        args, kwargs = tree_unflatten(leaves, spec)
        return args, kwargs, ids


def _norms(root: nn.Module) -> list[nn.Module]:
    norms = root.__dict__.get("_hat_stat_norms")
    if norms is None:
        norms = [m for m in root.modules() if isinstance(m, _TaskIndexedBatchNorm) and m.track_running_stats]
        root.__dict__["_hat_stat_norms"] = norms
        for m in norms:  # the refresh replaces their rows: their training batches skip the near-hard rule
            m.__dict__["_hat_refreshed"] = True
    return [m for m in norms if m.refresh_at_task_end]


def _selected(args: tuple, kwargs: dict, norms: list[nn.Module]) -> Any:
    """The task (int, None or per-sample ids) this call runs: a payload's (models that take
    payloads at their root select it in their forward), else the one selected with ``hat.set_task``."""
    for a in tree_flatten((args, kwargs))[0]:
        if isinstance(a, HATPayload):
            return a._selection
    return norms[0]._hat_state[0]


def _key(task: Any) -> Any:
    """What a task's training is recognized by: the task, or the tasks present."""
    return task.tasks if is_per_sample(task) else task


def _keep(a: Any) -> Any:
    if isinstance(a, HATPayload):  # the refresh runs the task with its hard masks
        return HATPayload(_copy(a.data), task_id=a.task_id)
    return _copy(a) if isinstance(a, torch.Tensor) else a


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone() if t.requires_grad else t.clone()  # (a detach is one more op per step)


def _data(a: Any) -> Any:
    return a.data if isinstance(a, HATPayload) else a


def before_call(root: nn.Module, args: tuple, kwargs: dict) -> None:
    """Called before every call of a converted model: keeps the latest training batch of the
    task being trained, and refreshes the statistics of a task whose training has ended."""
    if _REFRESHING[0]:
        return
    norms = _norms(root)
    if not norms:
        return
    task = _selected(args, kwargs, norms)
    training = root.training and torch.is_grad_enabled() and task is not None
    pending = root.__dict__.get("_hat_stats_pending")
    if pending is not None and not (training and _key(task) == pending.key):
        del root.__dict__["_hat_stats_pending"]
        _refresh(root, norms, pending)
    if training:
        kept_args, kept_kwargs = tree_map(_keep, (args, kwargs))
        tensors = [_data(a) for a in tree_flatten((kept_args, kept_kwargs))[0] if isinstance(_data(a), torch.Tensor)]
        if not tensors or tensors[0].dim() == 0:
            return
        payload_ids = any(isinstance(a, HATPayload) for a in tree_flatten((args, kwargs))[0])
        ids = task.ids.clone() if is_per_sample(task) and not payload_ids else None
        batch = _Batch(kept_args, kept_kwargs, tensors[0].shape[0], sum(t.nbytes for t in tensors), ids)
        pending = root.__dict__.get("_hat_stats_pending")
        if pending is None:
            pending = root.__dict__["_hat_stats_pending"] = _Pending(_key(task))
        pending.add(batch)


def refresh_pending(root: nn.Module) -> None:
    """Refresh now what ``before_call`` would refresh at the next call (before a checkpoint or an
    export that must carry the final statistics)."""
    pending = root.__dict__.pop("_hat_stats_pending", None)
    if pending is not None:
        _refresh(root, _norms(root), pending)


def _refresh(root: nn.Module, norms: list[nn.Module], pending: _Pending) -> None:
    modules = task_modules(root)
    selections = [(m, m._hat_state) for m in modules]
    flags = [(m, m.training) for m in root.modules()]
    devices = sorted({p.device.index or 0 for p in root.parameters() if p.device.type == "cuda"})
    tasks = pending.key if isinstance(pending.key, tuple) else (pending.key,)
    _REFRESHING[0] = True
    try:
        args, kwargs, ids = pending.call()
        for m in norms:
            for t in tasks:
                m._hat_near_hard.pop(m._hat_slot(t), None)  # the next batch replaces the row
        for m in modules:  # hard masks; per-sample ids kept with the batches (payloads carry theirs)
            if ids is not None:
                m._hat_select(check_selection(ids, m.num_tasks), None)
            elif not isinstance(pending.key, tuple):
                m._hat_select(pending.key if pending.key < m.num_tasks else None, None)
        root.train()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            root(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - the call the user made must still run
        warnings.warn(f"hat: the BatchNorm statistics of task(s) {list(tasks)} could not be refreshed with their final "
                      f"weights ({type(err).__name__}: {err}); they stay as training left them", stacklevel=4)
    finally:
        _REFRESHING[0] = False
        for m in norms:
            for t in tasks:
                m._hat_near_hard.pop(m._hat_slot(t), None)  # later training starts the row anew
        for m, flag in flags:
            m.training = flag
        for m, (t, s) in selections:
            m._hat_select(t, s)
