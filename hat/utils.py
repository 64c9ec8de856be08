"""Training utilities under hat-cl's names: the mask regularizer and the mask-scale schedules."""

from __future__ import annotations

import copy
import functools
import math
import numbers
import re
import warnings
from typing import Any, Literal

import torch
from torch import nn

from hat._checks import check_mask_scale, check_positive, check_task_id
from hat.errors import HATTypeError, HATValueError
from hat.masks.group import group_of
from hat.modules._base import HATMasked
from hat.tracking.selection import check_selection, is_per_sample

__all__ = [
    "RegStrategy",
    "ScaleStrategy",
    "convert_hat_cl_state_dict",
    "convert_to_base_module",
    "convert_to_task_dependent_module",
    "get_hat_mask_scale",
    "get_hat_reg_term",
    "load_hat_cl_state_dict",
]

RegStrategy = Literal["uniform", "paper"]
ScaleStrategy = Literal["linear", "cosine", "exponential", "constant"]
_REG_STRATS = ("uniform", "paper")
_SCALE_STRATS = ("linear", "cosine", "exponential", "constant")


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


def convert_to_task_dependent_module(module: nn.Module, **kwargs: Any) -> nn.Module:
    """hat-cl's converter: a copy of ``module`` with every layer of a mapped type (hat.convert's
    default mapping) replaced by its HAT / task-indexed counterpart, ``from_base_module(layer,
    **kwargs)`` (pass ``hat_config=...``). HAT layers stay as they are; a leaf of another type is
    returned as is with a ``ModuleConversionWarning``. Forwards are not changed: a hat-cl style
    model then runs on payloads. For a model that keeps taking tensors use ``hat.convert``.
    """
    from hat.convert.api import DEFAULT_MAPPING
    from hat.tracking.tracked import TaskTracked

    def swap(m: nn.Module) -> nn.Module | None:
        target = DEFAULT_MAPPING.get(type(m))
        if target is None or (getattr(target, "_hat_unsupported", None) is not None and target._hat_unsupported(m)):
            return None
        return target.from_base_module(m, **kwargs)

    return _swapped_copy(module, swap, lambda m: isinstance(m, TaskTracked), "has no task-dependent counterpart")


def convert_to_base_module(module: nn.Module, **kwargs: Any) -> nn.Module:
    """hat-cl's inverse: a copy of ``module`` with every HAT / task-indexed layer replaced by
    ``layer.to_base_module(**kwargs)`` (pass ``task_id=...``: the plain layer for that task,
    hard mask folded in). Plain torch layers stay; another leaf is returned as is with a
    ``ModuleConversionWarning``. For a whole converted model use ``hat.unconvert``."""
    from hat.convert.api import DEFAULT_MAPPING
    from hat.tracking.tracked import TaskTracked

    def swap(m: nn.Module) -> nn.Module | None:
        return m.to_base_module(**kwargs) if isinstance(m, TaskTracked) else None

    return _swapped_copy(module, swap, lambda m: type(m) in DEFAULT_MAPPING, "is not a task-dependent layer")


def _swapped_copy(module: nn.Module, swap: Any, done: Any, why: str) -> nn.Module:
    """hat-cl's conversion walk: ``swap(m)`` gives a replacement (or None); modules that are
    ``done`` stay; other leaves stay with a warning; the rest is copied once and walked."""
    from hat.errors import ModuleConversionWarning

    def leaf_or_done(m: nn.Module) -> bool:
        if done(m):
            return True
        if next(m.children(), None) is None:
            warnings.warn(f"{type(m).__name__} {why}; returned as is", ModuleConversionWarning, stacklevel=4)
            return True
        return False

    new = swap(module)
    if new is not None:
        return new
    if leaf_or_done(module):
        return module
    out = copy.deepcopy(module)

    def walk(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            new = swap(child)
            if new is not None:
                setattr(parent, name, new)
            elif not leaf_or_done(child):
                walk(child)

    walk(out)
    return out


# -- hat-cl 0.1.1 checkpoints ----------------------------------------------------------------------
_HAT_CL_EMBEDDING = re.compile(r"(.*)masker\.attention\.(\d+)")
_HAT_CL_TRAINED = re.compile(r"(.*)masker\._task_trained")
_HAT_CL_NORM_ROW = re.compile(r"(.*)\.(\d+)\.(weight|bias|running_mean|running_var|num_batches_tracked)")


def convert_hat_cl_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A ``state_dict`` saved by hat-cl 0.1.1, with its per-task keys mapped onto ``model``'s.

    hat-cl keeps a HAT layer's task embeddings one vector per task (``<layer>.masker.attention.<t>``)
    and its trained flags in ``<layer>.masker._task_trained``; a task-indexed norm is a list of norms
    (``<norm>.<t>.weight`` ...). Here they are rows of ``<layer>.task_embedding``, ``<layer>.hat_trained``
    and ``<norm>.weight`` ... Keys ``model`` has as they are stay as they are.
    """
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    rows: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in own and own[key].shape == value.shape:
            out[key] = value
            continue
        emb, trained, norm = (pattern.fullmatch(key) for pattern in (_HAT_CL_EMBEDDING, _HAT_CL_TRAINED,
                                                                      _HAT_CL_NORM_ROW))
        if emb is not None and emb.group(1) + "task_embedding" in own:
            rows.setdefault(emb.group(1) + "task_embedding", {})[int(emb.group(2))] = value
        elif trained is not None and trained.group(1) + "hat_trained" in own:
            out[trained.group(1) + "hat_trained"] = value.bool()
        elif norm is not None and f"{norm.group(1)}.{norm.group(3)}" in own:
            rows.setdefault(f"{norm.group(1)}.{norm.group(3)}", {})[int(norm.group(2))] = value
        else:
            out[key] = value  # unknown here: load_state_dict names it
    # hat-cl's norms keep no trained flags: theirs are the tasks the checkpoint's layers trained
    flags = [v for k, v in out.items() if k.endswith("hat_trained") and k not in state_dict]
    for key in own:
        if key.endswith("hat_trained") and key not in out and flags and flags[0].shape == own[key].shape:
            out[key] = torch.stack(flags).any(0)
    for key, by_task in rows.items():
        target = own[key]
        if sorted(by_task) != list(range(target.shape[0])):
            raise HATValueError(f"the hat-cl checkpoint has rows {sorted(by_task)} for {key}, which holds "
                                f"{target.shape[0]} (num_tasks differs? build the model with the checkpoint's "
                                "HATConfig)")
        out[key] = torch.stack([by_task[t] for t in range(target.shape[0])]).to(target.dtype)
    return out


def load_hat_cl_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> Any:
    """Load a ``state_dict`` saved by hat-cl 0.1.1 into ``model``, the same architecture built with
    HAT-CL (its classes keep hat-cl's names and arguments). Returns what
    ``model.load_state_dict`` returns. Its eval outputs then equal hat-cl's, except where HAT-CL
    places a mask differently on purpose: after a convolution's BatchNorm, not before it.

        model = MyModel(HATConfig(num_tasks=5))   # the class written for hat-cl, unchanged
        hat.utils.load_hat_cl_state_dict(model, torch.load("hat_cl_checkpoint.pt"))
    """
    return model.load_state_dict(convert_hat_cl_state_dict(state_dict, model), strict=strict)
