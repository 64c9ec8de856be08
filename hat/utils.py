"""hat-cl's ``hat.utils``: the mask regularizer and the mask-scale schedules (implemented in
:mod:`hat.training`, re-exported here under hat-cl's names), hat-cl's module converters, and
loading of hat-cl 0.1.1 state dicts."""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import torch
from torch import nn

from hat.errors import HATValueError
from hat.training import (  # noqa: F401  (the private helpers stay importable from here, as before)
    _REG_STRATS,
    _SCALE_STRATS,
    RegStrategy,
    ScaleStrategy,
    _index,
    _quota,
    _reg_from_forward,
    _segments,
    get_hat_mask_scale,
    get_hat_reg_term,
)

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
