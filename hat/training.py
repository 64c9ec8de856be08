"""Training with HAT: the mask regularizer, the mask-scale schedules, and one loop that trains a task.

:func:`train_task` is the loop the CLI, the examples and the test suite share: for each batch the
mask scale is annealed within the epoch (the paper: ``1/s_max`` to ``s_max``), the loss is the task
loss plus ``reg_strength`` times HAT's mask regularizer, and the optimizer steps (earlier tasks are
protected by ``hat``'s optimizer step hooks, whatever the optimizer). :func:`evaluate` and
:func:`predict` run a task with its hard (binary) masks in eval mode.

How the model is called for a batch is ``forward``:

- ``"payload"``: a model written on payloads (hat-cl style): ``model(HATPayload(x, task_id, mask_scale)).data``
- ``"set_task"``: a model converted with :func:`hat.convert` (or a ``hat_*`` timm model) that takes
  tensors: ``hat.set_task(model, task_id, mask_scale)`` and then ``model(x)``; evaluation inside
  ``hat.task(model, task_id)``
- a callable ``forward(model, x, task_id, mask_scale) -> logits``, for anything else
  (``mask_scale`` is None when evaluating)

::

    from hat.training import evaluate, train_task

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)   # one optimizer for all tasks
    for t, (x, y, x_test, y_test) in enumerate(tasks):
        train_task(model, optimizer, (x, y), t, epochs=5, forward="set_task")
        print(t, evaluate(model, (x_test, y_test), t, forward="set_task"))

``hat.utils`` exports the regularizer and the schedules under hat-cl's names as well.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from hat._checks import check_mask_scale, check_positive, check_task_id
from hat.convert.api import set_task, task
from hat.convert.trace import evaluating
from hat.errors import HATTypeError, HATValueError
from hat.masks.group import group_of
from hat.modules._base import HATMasked
from hat.payload import HATPayload
from hat.tracking.selection import check_selection, is_per_sample

__all__ = [
    "Forward",
    "RegStrategy",
    "ScaleStrategy",
    "TrainStep",
    "evaluate",
    "finetune_task",
    "get_hat_mask_scale",
    "get_hat_reg_term",
    "predict",
    "train_task",
]

RegStrategy = Literal["uniform", "paper"]
ScaleStrategy = Literal["linear", "cosine", "exponential", "constant"]
_REG_STRATS = ("uniform", "paper")
_SCALE_STRATS = ("linear", "cosine", "exponential", "constant")
_FORWARDS = ("payload", "set_task")
# how the model is called for a batch: one of _FORWARDS, or forward(model, x, task_id, mask_scale) -> logits
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # loss_fn(logits, y) -> a 0-d loss
Forward = Union[Literal["payload", "set_task"], Callable[[nn.Module, torch.Tensor, Any, Any], torch.Tensor]]


# -- the mask regularizer ------------------------------------------------------------------------
def get_hat_reg_term(module: nn.Module, strat: RegStrategy = "uniform", task_id: Any = None,
                     mask_scale: Any = None, forgive_quota: bool = True) -> torch.Tensor:
    """HAT's mask regularizer for ``task_id``: how much free capacity the task's masks take.

    For each masked layer ``l`` with soft mask ``a`` (of ``task_id`` at ``mask_scale``) and
    binary cumulative mask ``p`` of the other trained tasks:
    ``used_l = sum_i a_i (1 - p_i)`` and ``free_l = sum_i (1 - p_i)``.

    - ``"uniform"`` (hat-cl): the mean over layers of ``used_l / free_l``; with
      ``forgive_quota`` a task's fair share of each layer, ``units_l / num_tasks``, is free:
      ``max(used_l - units_l / num_tasks, 0) / free_l``.
    - ``"paper"`` (Serra et al.): ``sum_l used_l / sum_l free_l``, normalized over all layers at
      once; ``forgive_quota`` does not apply.

    Add ``c * reg`` to the loss (paper: c = 0.75). Returns a 0-d tensor (0 without masked layers).
    With per-sample ids (a 1-D tensor, or a batch's ``HATPayload.task_id``): the mean of the term
    over the tasks present.
    """
    if strat not in _REG_STRATS:
        raise HATValueError(f"strat must be one of {_REG_STRATS}; got {strat!r}")
    layers = [m for m in module.modules() if isinstance(m, HATMasked)]
    if not layers:
        return torch.zeros(())
    if task_id is None:
        check_task_id(task_id, layers[0].num_tasks, allow_none=False)  # the error a task must be given
    selection = check_selection(task_id, layers[0].num_tasks)
    scale = check_mask_scale(mask_scale)
    if is_per_sample(selection):
        terms = [get_hat_reg_term(module, strat, t, scale, forgive_quota) for t in selection.tasks]
        return torch.stack(terms).mean()
    task = selection
    per_layer = _reg_from_forward(layers, task, scale)
    if per_layer is None:  # each layer on its own
        used_terms, free_terms = [], []
        for layer in layers:
            mask = layer._hat_mask(task, scale)
            others = layer.hat_trained.clone()
            others[task] = False
            free = (~layer.used_units(others)).to(mask.dtype)
            used_terms.append((mask * free).sum())
            free_terms.append(free.sum())
        per_layer = torch.stack(used_terms), torch.stack(free_terms)
    used, free = per_layer
    if strat == "paper":
        return used.sum() / free.sum().clamp_min(1)
    if forgive_quota:
        used = (used - _quota(tuple((m.task_embedding.shape[1], m.num_tasks) for m in layers),
                              used.dtype, used.device)).clamp_min(0)
    return (used / free.clamp_min(1)).mean()


def _reg_from_forward(layers: list[HATMasked], task: int,
                      scale: float | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per layer, the mask summed over free units and the free units, from the masks the training
    forward just took (one node for all layers of a config): a few ops for the whole model
    instead of a dozen per layer. None where that forward did not take them all."""
    if scale is None or not torch.is_grad_enabled():
        return None
    cfg = layers[0].hat_config
    if cfg.gate is not torch.sigmoid or any(m.hat_config is not cfg for m in layers):
        return None
    masks = group_of(cfg).served(layers, task, scale)
    if masks is None:
        return None
    trained = layers[0]._hat_trained_set()
    if any(m._hat_trained_set() != trained for m in layers):
        return None
    mask = torch.cat(masks) if len(masks) > 1 else masks[0]
    zeros, segment = _segments(tuple(m.numel() for m in masks), mask.dtype, mask.device)
    with torch.no_grad():
        others = tuple(sorted(trained - {task}))
        if others:
            rows = torch.cat([m.task_embedding for m in layers], dim=1)
            if len(others) < rows.shape[0]:
                rows = rows.index_select(0, _index(others, rows.device))
            free = (rows.amax(0) <= 0).to(mask.dtype)  # used_units, for all layers at once
        else:
            free = torch.ones_like(mask)
        free_per_layer = zeros.index_add(0, segment, free)
    return zeros.index_add(0, segment, mask * free), free_per_layer


@functools.lru_cache(maxsize=64)
def _index(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, device=device)


@functools.lru_cache(maxsize=32)
def _segments(sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For layers of ``sizes`` units laid end to end: zeros per layer (never written: index_add
    out of place) and each unit's layer."""
    segment = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    return torch.zeros(len(sizes), dtype=dtype, device=device), segment


@functools.lru_cache(maxsize=32)
def _quota(layers: tuple[tuple[int, int], ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Each layer's fair share of units per task, ``units / num_tasks``, from (units, num_tasks)."""
    return torch.tensor([units / n for units, n in layers], dtype=dtype, device=device)


# -- the mask-scale schedules --------------------------------------------------------------------
def get_hat_mask_scale(strat: ScaleStrategy, max_trn_mask_scale: float, progress: float) -> float:
    """The mask scale ``s`` at ``progress`` in [0, 1] through an epoch (or a task).

    - ``"linear"`` (paper): ``1/s_max + (s_max - 1/s_max) * p``
    - ``"cosine"``: ``max(s_max/2 * cos(2 pi p) + s_max/2, 1)``
    - ``"exponential"`` (hat-cl): ``s_max ** ((p - 1 + r) / r)`` with ``r = 0.8``
    - ``"constant"``: ``s_max``

    With the paper's per-epoch schedule, ``progress = b / (B - 1)`` for batch ``b`` of ``B``.
    """
    if strat not in _SCALE_STRATS:
        raise HATValueError(f"strat must be one of {_SCALE_STRATS}; got {strat!r}")
    s_max = check_positive(max_trn_mask_scale, "max_trn_mask_scale")
    if isinstance(progress, bool) or not isinstance(progress, numbers.Real):
        raise HATTypeError(f"progress must be a number in [0, 1]; got {progress!r} of type {type(progress).__name__}")
    p = float(progress)
    if not 0.0 <= p <= 1.0:
        raise HATValueError(f"progress must be in [0, 1]; got {p}")
    if strat == "linear":
        return 1.0 / s_max + (s_max - 1.0 / s_max) * p
    if strat == "cosine":
        return max(s_max / 2 * math.cos(2 * math.pi * p) + s_max / 2, 1.0)
    if strat == "exponential":
        r = 0.8
        return s_max ** ((p - 1 + r) / r)
    return s_max


# -- the training loop ---------------------------------------------------------------------------
class TrainStep(NamedTuple):
    """What ``train_task``'s ``on_batch`` callback is given after each optimizer step."""

    epoch: int  # 0-based
    batch: int  # 0-based, within the epoch
    num_batches: int  # batches per epoch
    mask_scale: float  # the scale this batch trained at
    loss: torch.Tensor  # the loss stepped on (task loss + regularizer), 0-d, still attached
    logits: torch.Tensor  # the model's output for the batch
    y: torch.Tensor  # the batch's targets


def train_task(model: nn.Module, optimizer: torch.optim.Optimizer, data: Any, task_id: Any, *, epochs: int,
               batch_size: int | None = None, generator: torch.Generator | None = None,
               forward: Forward = "payload", loss_fn: LossFn = F.cross_entropy,
               scale_strat: ScaleStrategy = "linear", max_scale: float | None = None,
               reg_strength: float = 0.75, reg_strat: RegStrategy = "uniform", set_to_none: bool = True,
               on_batch: Callable[[TrainStep], Any] | None = None) -> list[float]:
    """Train ``task_id`` for ``epochs`` epochs with ``optimizer``; returns each epoch's mean loss.

    ``data``: ``(x, y)`` tensors, shuffled each epoch with ``torch.randperm(len(x), generator=generator)``
    (None: the global RNG) and cut into batches of ``batch_size`` (default 32); or a re-iterable of
    ``(x, y)`` batches with a length (a ``DataLoader``), which batches and shuffles itself.

    Each batch: the mask scale ``get_hat_mask_scale(scale_strat, max_scale, b / (B - 1))`` for batch
    ``b`` of ``B`` (annealed within every epoch, as in the paper; ``max_scale`` None: the model's
    ``HATConfig.max_trn_mask_scale``), the model called as ``forward`` says (see the module's
    docstring), ``loss = loss_fn(logits, y) + reg_strength * get_hat_reg_term(model, reg_strat,
    task_id, scale)``, then ``optimizer.zero_grad(set_to_none=set_to_none)``, ``backward`` and
    ``step``. The regularizer is left out when ``reg_strength`` is 0 or ``task_id`` is None (the plain
    network: no masks to regularize). ``on_batch(TrainStep(...))`` is called after every step.
    """
    batches = _batches(data, batch_size, generator)
    num_tasks = _num_tasks(model)
    task_id = check_task_id(task_id, num_tasks)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise HATTypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
    _check_positive_int(epochs, "epochs")
    _check_forward(forward)
    _check_callable(loss_fn, "loss_fn", allow_none=False)
    if scale_strat not in _SCALE_STRATS:
        raise HATValueError(f"scale_strat must be one of {_SCALE_STRATS}; got {scale_strat!r}")
    s_max = _max_scale(model, max_scale)
    if isinstance(reg_strength, bool) or not isinstance(reg_strength, numbers.Real):
        raise HATTypeError(f"reg_strength must be a finite number >= 0 (0: no regularizer); got {reg_strength!r} "
                           f"of type {type(reg_strength).__name__}")
    if not math.isfinite(reg_strength) or reg_strength < 0:
        raise HATValueError(f"reg_strength must be a finite number >= 0 (0: no regularizer); got {reg_strength!r}")
    if reg_strat not in _REG_STRATS:
        raise HATValueError(f"reg_strat must be one of {_REG_STRATS}; got {reg_strat!r}")
    if not isinstance(set_to_none, bool):
        raise HATTypeError(f"set_to_none must be True or False; got {set_to_none!r}")
    _check_callable(on_batch, "on_batch", allow_none=True)
    regularize = bool(reg_strength) and task_id is not None

    model.train()
    epoch_losses = []
    for epoch in range(epochs):
        num_batches = len(batches)
        losses = []
        for b, (x, y) in enumerate(batches):
            scale = get_hat_mask_scale(scale_strat, s_max, b / max(num_batches - 1, 1))
            logits = _call(model, forward, x, task_id, scale)
            loss = loss_fn(logits, y)
            if regularize:
                loss = loss + reg_strength * get_hat_reg_term(model, reg_strat, task_id=task_id, mask_scale=scale)
            optimizer.zero_grad(set_to_none=set_to_none)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            if on_batch is not None:
                on_batch(TrainStep(epoch, b, num_batches, scale, loss, logits, y))
        epoch_losses.append(torch.stack(losses).mean().item() if losses else math.nan)
    return epoch_losses


def finetune_task(model: nn.Module, optimizer: torch.optim.Optimizer, data: Any, task_id: Any, *, epochs: int = 1,
                  batch_size: int | None = None, generator: torch.Generator | None = None,
                  forward: Forward = "payload", loss_fn: LossFn = F.cross_entropy, max_scale: float | None = None,
                  set_to_none: bool = True, on_batch: Callable[[TrainStep], Any] | None = None) -> list[float]:
    """Train ``task_id`` further at the masks it has (after ``hat.compress``, as PackNet fine-tunes
    after pruning): :func:`train_task` with every task embedding held fixed (no gradient), the mask
    scale constant at ``max_scale`` (the masks as good as hard) and no regularizer. The weights of
    the units the task keeps train; earlier tasks stay protected as in any step."""
    embeddings = [m.task_embedding for m in _masked(model)]
    flags = [p.requires_grad for p in embeddings]
    for p in embeddings:
        p.requires_grad_(False)
    try:
        return train_task(model, optimizer, data, task_id, epochs=epochs, batch_size=batch_size,
                          generator=generator, forward=forward, loss_fn=loss_fn, scale_strat="constant",
                          max_scale=max_scale, reg_strength=0.0, set_to_none=set_to_none, on_batch=on_batch)
    finally:
        for p, flag in zip(embeddings, flags):
            p.requires_grad_(flag)


# -- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, task_id: Any, *, forward: Forward = "payload",
            batch_size: int | None = None) -> torch.Tensor:
    """The logits of ``task_id`` on ``x`` with its hard masks, in eval mode (the model's mode is
    restored after); in one forward, or in batches of ``batch_size`` concatenated. ``task_id`` goes
    to the model as it is (a payload model also takes per-sample ids), which checks it."""
    if not isinstance(x, torch.Tensor):
        raise HATTypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    _check_model(model)
    _check_forward(forward)
    if batch_size is not None:
        _check_positive_int(batch_size, "batch_size")
    with evaluating(model):
        if batch_size is None:
            return _call(model, forward, x, task_id, None)
        return torch.cat([_call(model, forward, part, task_id, None) for part in x.split(batch_size)])


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, task_id: Any, *, forward: Forward = "payload",
             batch_size: int | None = 1024) -> float:
    """Accuracy in [0, 1] of ``task_id`` with its hard masks, in eval mode (the model's mode is
    restored after). ``data``: ``(x, y)`` tensors, run in batches of ``batch_size`` (None: at once),
    or an iterable of ``(x, y)`` batches. Counted in integers, so equal predictions give bit-equal
    accuracies. ``task_id`` goes to the model as it is, as in :func:`predict`."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data):
        x, y = _check_pair(data)
        if batch_size is not None:
            _check_positive_int(batch_size, "batch_size")
        step = len(x) if batch_size is None else batch_size
        batches: Iterable[Any] = zip(x.split(step), y.split(step))
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, torch.Tensor)):
        batches = data
    else:
        raise HATTypeError(f"data must be (x, y) tensors or an iterable of (x, y) batches; got {type(data).__name__}")
    _check_model(model)
    _check_forward(forward)
    correct = total = 0
    with evaluating(model):
        for x, y in batches:
            correct += int((_call(model, forward, x, task_id, None).argmax(1) == y).sum())
            total += len(y)
    if total == 0:
        raise HATValueError("data has no samples to evaluate")
    return correct / total


# -- helpers ---------------------------------------------------------------------------------------
def _call(model: nn.Module, forward: Forward, x: torch.Tensor, task_id: int | None,
          scale: float | None) -> torch.Tensor:
    """The logits for ``x``: at mask ``scale`` in training, with the hard masks (scale None) in evaluation."""
    if forward == "payload":
        return model(HATPayload(x, task_id=task_id, mask_scale=scale)).data
    if forward == "set_task":
        if scale is None:
            with task(model, task_id):
                return model(x)
        set_task(model, task_id, mask_scale=scale)
        return model(x)
    return forward(model, x, task_id, scale)


class _TensorBatches:
    """``(x, y)`` cut into shuffled batches, shuffled afresh each time it is iterated."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None) -> None:
        self.x, self.y, self.batch_size, self.generator = x, y, batch_size, generator

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=self.generator)
        for idx in order.split(self.batch_size):
            yield self.x[idx], self.y[idx]


def _batches(data: Any, batch_size: Any, generator: Any) -> Any:
    """``data`` as a re-iterable of ``(x, y)`` batches with a length, or a clear error."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise HATTypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data):
        x, y = _check_pair(data)
        if batch_size is not None:
            _check_positive_int(batch_size, "batch_size")
        return _TensorBatches(x, y, 32 if batch_size is None else int(batch_size), generator)
    if isinstance(data, (str, bytes, torch.Tensor)) or not isinstance(data, Iterable) or not hasattr(data, "__len__"):
        raise HATTypeError("data must be (x, y) tensors or a re-iterable of (x, y) batches with a length "
                           f"(a DataLoader); got {type(data).__name__}")
    if batch_size is not None or generator is not None:
        raise HATValueError(f"batch_size and generator apply to (x, y) tensors; got batch_size={batch_size!r}, "
                            f"generator={generator!r} with a {type(data).__name__}, which batches and shuffles itself")
    if len(data) == 0:
        raise HATValueError(f"data must hold at least one batch; got an empty {type(data).__name__}")
    return data


def _check_pair(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data
    if len(x) != len(y) or len(x) == 0:
        raise HATValueError(f"data must be (x, y) with as many targets as inputs, at least one; got {len(x)} "
                            f"inputs and {len(y)} targets")
    return x, y


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise HATTypeError(f"{name} must be a positive int; got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise HATValueError(f"{name} must be a positive int; got {value!r}")


def _check_forward(forward: Any) -> None:
    if isinstance(forward, str):
        if forward not in _FORWARDS:
            raise HATValueError(f"forward must be one of {_FORWARDS} or a callable "
                                f"forward(model, x, task_id, mask_scale) -> logits; got {forward!r}")
    elif not callable(forward):
        raise HATTypeError(f"forward must be one of {_FORWARDS} or a callable forward(model, x, task_id, mask_scale) "
                           f"-> logits; got {forward!r} of type {type(forward).__name__}")


def _check_callable(fn: Any, name: str, *, allow_none: bool) -> None:
    if (fn is None and not allow_none) or (fn is not None and not callable(fn)):
        raise HATTypeError(f"{name} must be a callable{' or None' if allow_none else ''}; got {fn!r} "
                           f"of type {type(fn).__name__}")


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise HATTypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")


def _masked(model: Any) -> list[HATMasked]:
    _check_model(model)
    return [m for m in model.modules() if isinstance(m, HATMasked)]


def _num_tasks(model: nn.Module) -> int | None:
    """The model's number of tasks, from its first masked layer; None without one (ids then checked by type)."""
    layers = _masked(model)
    return layers[0].num_tasks if layers else None


def _max_scale(model: nn.Module, max_scale: Any) -> float:
    if max_scale is not None:
        return check_positive(max_scale, "max_scale")
    layers = _masked(model)
    if not layers:
        raise HATValueError("max_scale=None takes HATConfig.max_trn_mask_scale from the model's HAT layers, but "
                            f"{type(model).__name__} has none; pass max_scale (a positive number)")
    return float(layers[0].hat_config.max_trn_mask_scale)
