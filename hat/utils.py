"""hat-cl's ``hat.utils``, with its signatures: the mask regularizer and the mask-scale schedules
(implemented in :mod:`hat.training`, re-exported here under hat-cl's names), hat-cl's module
converters, forgetting and pruning tasks (:mod:`hat.forget`), per-layer mask use, loading plain
weights into a HAT model, payloads through plain modules, and loading of hat-cl 0.1.1 state dicts."""

from __future__ import annotations

import copy
import numbers
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hat.errors import HATTypeError, HATValueError
from hat.forget import check_trained_task, forget_tasks
from hat.payload import HATPayload
from hat.protect.hooks import trained_tasks
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
from hat.types_ import ForgetResult, NoParameterToForgetWarning

__all__ = [
    "RegStrategy",
    "ScaleStrategy",
    "convert_hat_cl_state_dict",
    "convert_to_base_module",
    "convert_to_task_dependent_module",
    "forget_task",
    "forward_hat_payload",
    "get_hat_mask_scale",
    "get_hat_reg_term",
    "get_hat_util",
    "load_from_base_module",
    "load_from_base_module_state_dict",
    "load_hat_cl_state_dict",
    "prune_hat_module",
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


# -- forgetting and pruning tasks (hat.forget) --------------------------------------------------------
def forget_task(module: nn.Module, task_id: int, dry_run: bool = False, module_name: str | None = None,
                locked_task_ids: list[int] | None = None) -> ForgetResult:
    """hat-cl's ``forget_task``: ``hat.forget_task`` (what is reset and released, and why) with
    hat-cl's arguments and result names.

    - ``dry_run``: change nothing; return what would change.
    - ``module_name``: the prefix of the result's names (default: ``module``'s class name, as
      hat-cl names them: ``"MyNet.fc1.weight"``).
    - ``locked_task_ids``: the trained tasks that must stay intact (default: every trained task
      but ``task_id``). A trained task left out keeps its rows and trained flag, but entries it
      shares only with ``task_id`` are released: its outputs may change.

    Warns ``hat.types_.NoParameterToForgetWarning`` when no weight or bias entry is released (every
    unit the task used is used by a locked task too), as hat-cl does.
    """
    if module_name is not None and not isinstance(module_name, str):
        raise HATTypeError(f"module_name must be a str or None; got {module_name!r}")
    prefix = f"{module_name or type(module).__name__}."
    result, released = forget_tasks(module, [task_id], locked_task_ids=locked_task_ids, dry_run=dry_run,
                                    prefix=prefix, caller="forget_task")
    if released == 0:
        warnings.warn(f"forget_task: task {task_id} of {prefix[:-1]} released no weight or bias entry: every unit it "
                      "uses is used by a task that stays (its own rows and trained flag were reset)",
                      NoParameterToForgetWarning, stacklevel=2)
    return result


def prune_hat_module(module: nn.Module, task_id: int) -> tuple[nn.Module, ForgetResult]:
    """hat-cl's pruning: a copy of ``module``, of the same shapes, that keeps task ``task_id`` only.
    Every other trained task is forgotten (see ``hat.forget_task``): its rows are reset and the
    weight entries the other tasks used and ``task_id`` does not are re-initialised, free for
    later tasks. ``task_id``'s outputs in the copy are bit-identical to ``module``'s, which is left
    as it is. Returns the copy and the ForgetResult of all the tasks forgotten (names prefixed with
    the class name, as hat-cl's). For a network physically cut to one task, see ``hat.prune``.
    """
    if not isinstance(module, nn.Module):
        raise HATTypeError(f"prune_hat_module: module must be a torch.nn.Module; got {type(module).__name__}")
    keep = check_trained_task(module, task_id)
    pruned = copy.deepcopy(module)
    others = [t for t in trained_tasks(pruned) if t != keep]
    result, _ = forget_tasks(pruned, others, locked_task_ids=[keep], prefix=f"{type(module).__name__}.",
                             caller="prune_hat_module")
    return pruned, result


# -- mask use per layer --------------------------------------------------------------------------------
HATUtil = dict[str, dict[int, tuple[int, int]]]


@torch.no_grad()
def get_hat_util(module: nn.Module, task_ids: int | Sequence[int] | None = None) -> Any:
    """Per HAT layer and task, ``(active_units, num_features)``: how many of the layer's units the
    task's hard mask keeps, out of how many. ``task_ids``: one id or several, each a trained task
    (None: every trained task).

    With pandas installed (it is not a dependency), a ``pandas.DataFrame`` as hat-cl returns it:
    one row per layer, labelled ``"<layer name>.masker"`` as hat-cl labels them, one column per
    task, each cell the tuple. Without pandas, the same as a plain dict:
    ``{"<layer name>.masker": {task_id: (active_units, num_features), ...}, ...}``
    (``pandas.DataFrame.from_dict(util, orient="index")`` makes the frame). Layers whose mask is
    over their input (``HATMasker``) are left out, as in ``hat.capacity``.
    """
    if not isinstance(module, nn.Module):
        raise HATTypeError(f"get_hat_util: module must be a torch.nn.Module; got {type(module).__name__}")
    from hat.modules._base import HATMasked

    layers = [(name, m) for name, m in module.named_modules()
              if isinstance(m, HATMasked) and getattr(m, "_hat_has_weights", True)]
    if task_ids is None:
        tasks = trained_tasks(module)
    elif isinstance(task_ids, (str, bytes)) or not isinstance(task_ids, (numbers.Integral, torch.Tensor, Iterable)):
        raise HATTypeError(f"task_ids must be a task id, a list of task ids or None; got {task_ids!r}")
    else:
        many = isinstance(task_ids, Iterable) and not (isinstance(task_ids, torch.Tensor) and task_ids.dim() == 0)
        tasks = [check_trained_task(module, t, "task_ids") for t in (task_ids if many else [task_ids])]
    util: HATUtil = {}
    for name, m in layers:
        on = m.task_embedding.detach() > 0
        util[f"{name}.masker" if name else "masker"] = {t: (int(on[t].sum()), int(on.shape[1])) for t in tasks}
    try:
        import pandas
    except ImportError:
        return util
    return pandas.DataFrame.from_dict(util, orient="index")


# -- plain weights into a HAT model --------------------------------------------------------------------
def load_from_base_module(hat_module: nn.Module, base_module: nn.Module, strict: bool = True) -> Any:
    """Load the weights of ``base_module``, a plain model of the same architecture (the model
    before ``hat.convert``, timm's ``resnet18`` for ``hat_resnet18`` ...), into ``hat_module``: see
    ``load_from_base_module_state_dict``."""
    if not isinstance(base_module, nn.Module):
        raise HATTypeError(f"base_module must be a torch.nn.Module; got {type(base_module).__name__}")
    return load_from_base_module_state_dict(hat_module, base_module.state_dict(), strict=strict)


def load_from_base_module_state_dict(hat_module: nn.Module, base_module_state_dict: Mapping[str, torch.Tensor],
                                     strict: bool = True) -> Any:
    """Load a plain model's ``state_dict`` into ``hat_module``, the same architecture with HAT
    layers. Weights of the same shape load as they are; a per-task tensor (task-indexed norms'
    affine and running statistics, heads, per-task parameters: ``[num_tasks + 1, *shape]``) takes
    the plain value in every task's row and in the no-task row. The task embeddings and trained
    flags, which a plain model has not, keep their values.

    With ``strict`` (the default, as ``load_state_dict``), a key of the checkpoint that the model
    has not, or a weight of the model the checkpoint has not, is an error naming the first ones
    (hat-cl skipped missing modules with a warning: pass ``strict=False`` for that). A shape that
    fits neither way is always an error; nothing is loaded before the checks pass. Returns what
    ``load_state_dict`` returns (``missing_keys`` without the HAT-only keys).
    """
    if not isinstance(hat_module, nn.Module):
        raise HATTypeError(f"hat_module must be a torch.nn.Module; got {type(hat_module).__name__}")
    if not isinstance(base_module_state_dict, Mapping):
        raise HATTypeError(f"base_module_state_dict must be a state_dict (a mapping of names to tensors); "
                           f"got {type(base_module_state_dict).__name__}")
    own = hat_module.state_dict()
    per_task = _per_task_keys(hat_module)
    mapped: dict[str, torch.Tensor] = {}
    unexpected, shapes = [], []
    for key, value in base_module_state_dict.items():
        target = own.get(key)
        if target is None or not isinstance(value, torch.Tensor):
            unexpected.append(key)
        elif value.shape == target.shape:
            mapped[key] = value
        elif key in per_task and value.shape == target.shape[1:]:
            mapped[key] = value.detach().to(target.dtype).unsqueeze(0).expand_as(target).clone()
        else:
            shapes.append(f"{key} {tuple(value.shape)} (the model's: {tuple(target.shape)})")
    missing = [k for k in own if k not in mapped and k.rpartition(".")[2] not in _HAT_ONLY]
    problems = [f"shape {', '.join(shapes[:5])}"] if shapes else []
    if strict:
        problems += [f"missing {', '.join(missing[:5])}"] if missing else []
        problems += [f"unexpected {', '.join(unexpected[:5])}"] if unexpected else []
    if problems:
        raise HATValueError(f"the state_dict does not fit {type(hat_module).__name__}: " + "; ".join(problems)
                            + (" (strict=False loads what fits)" if not shapes else ""))
    got = hat_module.load_state_dict(mapped, strict=False)
    return type(got)(missing_keys=missing, unexpected_keys=unexpected)


# state a plain model has not: kept as they are when plain weights are loaded
_HAT_ONLY = ("task_embedding", "hat_trained")


def _per_task_keys(model: nn.Module) -> set[str]:
    """State-dict keys of tensors with one row per task slot (``[num_tasks + 1, ...]``)."""
    from hat.tracking.tracked import TaskTracked

    out = set()
    for name, m in model.named_modules():
        if not isinstance(m, TaskTracked):
            continue
        prefix = f"{name}." if name else ""
        tensors = {**m._parameters, **m._buffers}
        out.update(prefix + n for n, t in tensors.items()
                   if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == m.num_tasks + 1)
    return out


# -- payloads through plain modules --------------------------------------------------------------------
def forward_hat_payload(module: nn.Module, hat_payload: HATPayload, use_masked_data: bool = True) -> HATPayload:
    """``module`` applied to ``hat_payload``, as a payload (hat-cl's helper for plain modules):

    - a HAT module, or a model taking payloads, is called with the payload;
    - an ``nn.Sequential`` passes it through each of its modules in turn (this rule again);
    - any other module gets the payload's data (``payload.forward_by(module)``): with
      ``use_masked_data`` (default) the data with the last HAT layer's mask applied; with
      ``use_masked_data=False`` the data before that mask, the mask then applied to the module's
      output (for modules that mix units, e.g. a plain LayerNorm: the units a task does not use
      leave them as 0). The output must keep the masked dimension's size.

    Unlike hat-cl, a module with weights is allowed: hat protects the plain parameters a task
    trained as a whole (see ``hat.protect``).
    """
    if not isinstance(hat_payload, HATPayload):
        raise HATTypeError(f"hat_payload must be a hat.HATPayload; got {type(hat_payload).__name__}")
    if not isinstance(use_masked_data, bool):
        raise HATTypeError(f"use_masked_data must be True or False; got {use_masked_data!r}")
    if not callable(module):
        raise HATTypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    if getattr(module, "_hat_takes_payload", False):
        return module(hat_payload)
    if isinstance(module, nn.Sequential):
        for child in module:
            hat_payload = forward_hat_payload(child, hat_payload, use_masked_data)
        return hat_payload
    if use_masked_data or hat_payload._mask is None:
        return hat_payload.forward_by(module)
    return _forward_before_mask(module, hat_payload)


def _forward_before_mask(module: Any, payload: HATPayload) -> HATPayload:
    """``module`` on the payload's data before its pending mask; the mask stays pending on the
    output, so the units a task does not use still leave as 0 (and are still known)."""
    x = payload._raw
    y = module(x)
    if not isinstance(y, torch.Tensor):
        raise HATTypeError(f"forward_hat_payload expects the module to return a tensor; {type(module).__name__} "
                           f"returned {type(y).__name__}")
    d = payload._unit_dim % x.dim()
    if y.dim() != x.dim() or y.shape[d] != x.shape[d]:
        raise HATValueError(f"use_masked_data=False applies the mask after {type(module).__name__}, but its output "
                            f"{tuple(y.shape)} no longer has the {x.shape[d]} units of dimension {d} of its input "
                            f"{tuple(x.shape)}; use use_masked_data=True")
    return payload._derive(y, mask=payload._mask, unit_mask=payload._unit_mask, unit_dim=payload._unit_dim,
                           src=payload._src, repeat=payload._repeat)
