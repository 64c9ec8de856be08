"""Leave capacity for later tasks: ``compress(model, t, data, budget=..., tolerance=...)`` after a
task trains releases the units it added that it needs least.

With short schedules (one epoch per task) HAT's regularizer has no time to shrink a task's
masks: each task keeps about the half of the units its random embedding switched on, and the
network is full after a few tasks, whose successors can then only reuse frozen features. After a
task trains, ``compress`` ranks the units it added (used by no other trained task) by how much
its loss depends on them (``|activation * d loss / d activation|``, a first-order estimate, on a
sample of the task's data) and switches the least needed off in the task's embedding:

- ``budget``: per layer, keep at most ``budget * free / remaining`` added units, ``free`` the
  units no other trained task uses and ``remaining`` the tasks not trained yet, this one included
  (each task's fair share of what is left, as PackNet gives each task a fixed share);
- ``tolerance``: release no unit whose loss would cost more than this much training accuracy
  (a fraction, on the sample): the least needed first, as many as the accuracy allows.

Only the task's own embedding changes, so every other task stays bit-identical; the released
units are free again (``hat.capacity``) and the next task's protection lets it train them.
Recover what the release cost with one more epoch on the task at the final masks
(``hat.training.finetune_task``), as PackNet fine-tunes after pruning. Before a task trains,
``switch_on_free_units`` lets it start with every free unit on, so that ``compress`` picks the
units it keeps from all that are free (with the random start, half of them never get a chance).

The recipe on permuted Fashion-MNIST (``benchmarks/permuted_fashion_mnist.py``, ``hat-cl run
--budget``): for each task, ``switch_on_free_units``, one epoch, ``compress(budget=...)``, one
fine-tune epoch.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hat.convert.trace import evaluating
from hat.errors import HATTypeError, HATValueError
from hat.modules._base import HATMasked
from hat.payload import HATPayload
from hat.tracking.tracked import invalidate

__all__ = ["CompressResult", "compress", "switch_on_free_units"]

# the embedding a released unit gets: off at any mask scale the schedules reach
_OFF = -1.0


class CompressResult(NamedTuple):
    """Per masked layer ``name -> (units released, units the task had added)``, and the task's
    accuracy on the sample before and after."""

    released: dict[str, tuple[int, int]]
    accuracy_before: float
    accuracy_after: float


def switch_on_free_units(model: nn.Module, task_id: int, *, reinit: bool = False,
                         optimizer: torch.optim.Optimizer | None = None) -> int:
    """Before task ``task_id`` trains: switch on, in its own embedding, every unit no other trained
    task uses (each keeps the magnitude it has, made positive), so that training and ``compress``
    can choose among all the free units. Units other tasks use keep their start (reusing them
    costs nothing). Other tasks are not touched. Returns how many units were switched on.

    ``reinit``: the weight entries no other trained task protects (those of free units, and the
    columns reading them) start again as the layer's torch class initializes a new layer: units
    released by earlier tasks do not start from features trained for another task. With
    ``optimizer``, its state for those entries (momentum, Adam's moments) is zeroed too (measured
    on permuted Fashion-MNIST: zeroed second moments make Adam's first steps on them large, and
    now and then a task trains badly; ``hat-cl run --budget`` leaves the state as it is). Either
    way, what the other tasks compute stays bit-identical."""
    from hat._checks import check_task_id

    if not isinstance(model, nn.Module):
        raise HATTypeError(f"switch_on_free_units: model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(reinit, bool):
        raise HATTypeError(f"switch_on_free_units: reinit must be True or False; got {reinit!r}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise HATTypeError(f"switch_on_free_units: optimizer must be a torch.optim.Optimizer or None; got "
                           f"{type(optimizer).__name__}")
    layers = [m for m in model.modules() if isinstance(m, HATMasked) and getattr(m, "_hat_has_weights", True)]
    if not layers:
        raise HATValueError(f"switch_on_free_units: {type(model).__name__} has no HAT layer")
    t = check_task_id(task_id, layers[0].num_tasks, allow_none=False)
    switched = 0
    with torch.no_grad():
        for m in layers:
            others = m.hat_trained.clone()
            others[t] = False
            free = ~m.used_units(others)
            row = m.task_embedding[t]
            switched += int((free & (row <= 0)).sum())
            row[free] = row[free].abs().clamp_min(1e-3)
            if reinit and bool(others.any()):  # before any task trained nothing is stale: nothing to restart
                _restart_free_entries(m, others, optimizer)
            invalidate(m)
    return switched


def _restart_free_entries(m: HATMasked, others: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Re-initialize the entries of ``m``'s weight and bias that the tasks ``others`` do not protect."""
    from hat.forget import _initial_values, _protected

    fresh = _initial_values(m)
    for name in m._hat_unit_params:
        p = m._parameters.get(name)
        if p is None or not p.requires_grad or name not in fresh:
            continue
        free = ~_protected(m, name, p, others)
        p[free] = fresh[name].to(p.dtype)[free]
        state = optimizer.state.get(p) if optimizer is not None else None
        for value in (state or {}).values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                value[free] = 0


def _check(budget: Any, tolerance: Any, samples: Any) -> None:
    if budget is None and tolerance is None:
        raise HATValueError("compress: give budget (a fraction in (0, 1]) or tolerance (>= 0), or both")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
            raise HATTypeError(f"compress: budget must be a number in (0, 1] or None; got {budget!r}")
        if not 0 < budget <= 1:
            raise HATValueError(f"compress: budget must be in (0, 1] (the share of a task's fair part of the free "
                                f"units it may keep); got {budget!r}")
    if tolerance is not None:
        if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real):
            raise HATTypeError(f"compress: tolerance must be a number >= 0 or None; got {tolerance!r}")
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise HATValueError(f"compress: tolerance must be a finite number >= 0 (a fraction of accuracy); "
                                f"got {tolerance!r}")
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise HATTypeError(f"compress: samples must be a positive int; got {samples!r}")
    if samples < 1:
        raise HATValueError(f"compress: samples must be a positive int; got {samples!r}")


def _logits(model: nn.Module, forward: Any, x: torch.Tensor, task_id: int) -> torch.Tensor:
    from hat.training import _call

    return _call(model, forward, x, task_id, None)


def _importance(model: nn.Module, layers: list[HATMasked], forward: Any, loss_fn: Any, x: torch.Tensor,
                y: torch.Tensor, task_id: int) -> list[torch.Tensor]:
    """Per layer, per unit: the mean over samples of ``|sum over positions of y * dL/dy|`` of the
    layer's output (the first-order change of the loss if the unit were switched off)."""
    outputs: dict[int, list[torch.Tensor]] = {id(m): [] for m in layers}

    def keep(module: nn.Module, args: Any, out: Any) -> None:
        t = out.data if isinstance(out, HATPayload) else out
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.retain_grad()
            outputs[id(module)].append(t)

    handles = [m.register_forward_hook(keep) for m in layers]
    try:  # evaluation mode: hard masks, running statistics, the network the task is evaluated with
        with evaluating(model), torch.enable_grad():
            loss = loss_fn(_logits(model, forward, x, task_id), y)
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    scores = []
    for m in layers:
        units = m.task_embedding.shape[1]
        total = torch.zeros(units)
        for t in outputs[id(m)]:
            if t.grad is None:
                continue
            dim = m.mask_dim % t.dim()
            contribution = (t.detach() * t.grad).transpose(dim, -1).reshape(-1, t.shape[dim])
            if contribution.shape[1] == units:
                total += contribution.abs().sum(0).cpu() / max(len(x), 1)
        scores.append(total)
    model.zero_grad(set_to_none=True)
    return scores


def _candidates(model: nn.Module, layers: list[HATMasked], names: dict, t: int, budget: float | None,
                scores: list[torch.Tensor]) -> tuple[list[tuple[float, int, int]], dict[str, int]]:
    """The units task ``t`` added (used by no other trained task), least needed first; with a
    budget, only those beyond it. And per layer how many it added."""
    drops: list[tuple[float, int, int]] = []
    added: dict[str, int] = {}
    for li, m in enumerate(layers):
        others = m.hat_trained.clone()
        others[t] = False
        free = ~m.used_units(others)
        mine = ((m.task_embedding.detach()[t] > 0) & free).nonzero().flatten().tolist()
        added[names[id(m)]] = len(mine)
        ranked = sorted(mine, key=lambda u: float(scores[li][u]))
        if budget is not None:
            remaining = max(1, m.num_tasks - int(others.sum()))
            keep = max(1, round(budget * int(free.sum()) / remaining))
            ranked = ranked[:max(0, len(ranked) - keep)]
        drops += [(float(scores[li][u]), li, u) for u in ranked]
    drops.sort()
    return drops, added


def _set_row(layers: list[HATMasked], t: int, rows: list[torch.Tensor], drops: list[tuple[float, int, int]]) -> None:
    """Task ``t``'s embedding rows set to ``rows`` with the units ``drops`` switched off."""
    with torch.no_grad():
        for m, row in zip(layers, rows):
            m.task_embedding[t] = row
        for _, li, u in drops:
            layers[li].task_embedding[t, u] = _OFF
    for m in layers:
        invalidate(m)


def compress(model: nn.Module, task_id: int, data: Any, *, budget: float | None = None,
             tolerance: float | None = None, forward: Any = "payload", loss_fn: Any = F.cross_entropy,
             samples: int = 2048, rounds: int = 1) -> CompressResult:
    """Release the units trained task ``task_id`` added that it needs least (see the module's
    docstring): at most ``budget`` times its fair share of the free units kept per layer, and no
    more than ``tolerance`` of training accuracy lost (either or both). ``data``: ``(x, y)``
    tensors of the task (the first ``samples`` are used); ``forward`` and ``loss_fn`` as in
    ``hat.training.train_task``. ``rounds``: release in that many steps, scoring the units again
    after each (units stand in for one another). Other tasks are left bit-identical. Returns what
    was released."""
    from hat.forget import check_trained_task
    from hat.training import _check_forward, _check_pair, evaluate

    if not isinstance(model, nn.Module):
        raise HATTypeError(f"compress: model must be a torch.nn.Module; got {type(model).__name__}")
    _check(budget, tolerance, samples)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise HATValueError(f"compress: rounds must be a positive int; got {rounds!r}")
    _check_forward(forward)
    x, y = _check_pair(data)
    t = check_trained_task(model, task_id)
    x, y = x[:samples], y[:samples]
    names = {id(m): n for n, m in model.named_modules()}
    layers = [m for m in model.modules() if isinstance(m, HATMasked) and getattr(m, "_hat_has_weights", True)]
    original = [m.task_embedding.detach()[t].clone() for m in layers]
    before = evaluate(model, (x, y), t, forward=forward)
    _, added = _candidates(model, layers, names, t, budget, [torch.zeros(m.task_embedding.shape[1]) for m in layers])

    early: list[tuple[float, int, int]] = []  # released by the earlier rounds
    for r in range(rounds - 1):
        drops = _candidates(model, layers, names, t, budget, _importance(model, layers, forward, loss_fn, x, y, t))[0]
        early += drops[:len(drops) // (rounds - r)]
        _set_row(layers, t, original, early)
    drops = early + _candidates(model, layers, names, t, budget,
                                _importance(model, layers, forward, loss_fn, x, y, t))[0]

    count = len(drops)
    if tolerance is not None and drops:
        _set_row(layers, t, original, drops)
        if evaluate(model, (x, y), t, forward=forward) < before - tolerance:
            lo, hi = 0, count  # the most drops (least needed first) within the tolerance
            while lo < hi:
                mid = (lo + hi + 1) // 2
                _set_row(layers, t, original, drops[:mid])
                if evaluate(model, (x, y), t, forward=forward) >= before - tolerance:
                    lo = mid
                else:
                    hi = mid - 1
            count = lo
    _set_row(layers, t, original, drops[:count])
    after = evaluate(model, (x, y), t, forward=forward)
    released = {name: (0, n) for name, n in added.items()}
    for _, li, _ in drops[:count]:
        name = names[id(layers[li])]
        released[name] = (released[name][0] + 1, released[name][1])
    return CompressResult(released, before, after)
