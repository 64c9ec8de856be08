"""Drop-in HAT: convert a plain model in one line, select the task as model state.

    model = hat.convert(model, HATConfig(num_tasks=5))   # same forward, tensors in and out
    hat.set_task(model, 0, mask_scale=s)                 # or: with hat.task(model, 0): ...

The task and mask scale live in 0-d tensor buffers of every HAT layer, written in place, so
torch.compile does not recompile when they change. The payload API keeps working on the same
layers: one mask mechanism, two ways in.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hat._checks import check_mask_scale, check_task_id
from hat._scores_state import PREFIX, install_load_hook, unwrapped
from hat.config import HATConfig
from hat.convert import coverage as _coverage
from hat.convert import statistics as _statistics
from hat.convert import trace as _trace
from hat.convert.mapping import DEFAULT_MAPPING, default_mapping
from hat.errors import HATTypeError, HATValueError
from hat.modules import TaskIndexedLinear
from hat.modules._generated import make_task_parameters
from hat.modules.task_params import candidates
from hat.tracking.selection import check_selection
from hat.tracking.tracked import TaskTracked, check_config, task_modules

__all__ = ["DEFAULT_MAPPING", "convert", "set_task", "task", "unconvert"]

# layer families whose instances (subclasses included) are converted or left plain, never split per task
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
           nn.MultiheadAttention, nn.Embedding)

Pattern = str | Sequence[str] | None


# -- task selection -----------------------------------------------------------------------------
def _check_module(model: Any, what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise HATTypeError(f"{what}: model must be a torch.nn.Module; got {type(model).__name__}")
    return model


def _modules_for(model: nn.Module, what: str) -> list[TaskTracked]:
    modules = task_modules(model)
    if not modules:
        raise HATValueError(
            f"{what}: {type(model).__name__} has no HAT or task-indexed layer; convert it first "
            "(hat.convert(model, HATConfig(num_tasks=...))) or build it from hat.modules"
        )
    return modules


def set_task(model: nn.Module, task_id: Any, mask_scale: Any = None) -> None:
    """Select ``task_id`` (None: no task, the plain network) and the mask scale (None: the hard
    mask, for evaluation) for every HAT layer of ``model``.

    ``task_id`` may also be a 1-D integer tensor with one task id per sample of the next batches
    (``hat.tracking.selection``): each sample is computed as its task alone would be, and training such
    a batch trains every task present (eager mode; compiled forwards take one task).

    Training needs a scale: anneal it per batch (``hat.utils.get_hat_mask_scale``) and call
    ``set_task`` again; the values go into 0-d tensors, so a compiled model does not recompile.
    """
    _check_module(model, "set_task")
    modules = _modules_for(model, "set_task")
    # check everything before writing anything
    selection = check_selection(task_id, None)
    checked = {m.num_tasks: check_selection(selection, m.num_tasks) for m in modules}
    scale = check_mask_scale(mask_scale)
    for m in modules:
        m._hat_select(checked[m.num_tasks], scale)
    _ensure_root_hook(model)


@contextlib.contextmanager
def task(model: nn.Module, task_id: Any, mask_scale: Any = None) -> Iterator[nn.Module]:
    """``with hat.task(model, t, mask_scale=s): ...`` selects a task for the block and restores
    the previous selection afterwards, also when the block raises."""
    _check_module(model, "task")
    modules = _modules_for(model, "task")
    saved = [(m, m._hat_state) for m in modules]
    set_task(model, task_id, mask_scale)
    try:
        yield model
    finally:
        for m, (t, s) in saved:
            m._hat_select(t, s)


def _root_pre_hook(root: nn.Module, args: tuple, kwargs: dict) -> None:
    _before_call(root, args, kwargs)


@torch.compiler.disable
def _before_call(root: nn.Module, args: tuple, kwargs: dict) -> None:
    # eager even inside torch.compile: reads Python state that must not become guards
    shared = root.__dict__.get("_hat_shared_norms")
    if shared and root.training and torch.is_grad_enabled():
        modules = task_modules(root)
        if modules and modules[0]._hat_state[0] is not None:
            raise HATTypeError(
                f"{len(shared)} normalization layer(s) are shared by every task and keep running statistics "
                f"({', '.join(shared[:6])}{' ...' if len(shared) > 6 else ''}); training a task would change "
                "them for every earlier task. Convert them: hat.convert(..., mapping={TheirType: "
                "hat.modules.TaskIndexedBatchNorm2d}) (their weights and statistics are kept)"
            )
    if _trace.maybe_trace(root, args, kwargs):
        _coverage.warn(root)
    _statistics.before_call(root, args, kwargs)
    if "_hat_example" not in root.__dict__:
        _remember_example(root, args, kwargs)


def _remember_example(root: nn.Module, args: tuple, kwargs: dict) -> None:
    """The first call's inputs (their first sample where every tensor has the same batch size):
    ``hat.prune`` follows the model and checks its result on them."""
    from hat.payload import HATPayload

    raw = lambda a: a._raw if isinstance(a, HATPayload) else a  # noqa: E731
    args, kwargs = tuple(raw(a) for a in args), {k: raw(v) for k, v in kwargs.items()}
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not tensors:
        return
    sizes = {t.shape[0] if t.dim() else None for t in tensors}
    batched = len(sizes) == 1 and None not in sizes

    def first(a: Any) -> Any:
        if not isinstance(a, torch.Tensor):
            return a
        return (a.detach()[:1] if batched else a.detach()).clone()

    root.__dict__["_hat_example"] = (tuple(first(a) for a in args), {k: first(v) for k, v in kwargs.items()})


def _refresh_before_saving(root: nn.Module, prefix: str, keep_vars: bool) -> None:
    # BatchNorm rows of a task whose training just ended are refreshed at the model's next call;
    # a state dict taken before that call must hold them too (a fresh model loading it evaluates
    # as this one will)
    _statistics.refresh_pending(root)


# running statistics of task-indexed BatchNorms: each process keeps its own
_LOCAL_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _keep_statistics_local(root: nn.Module) -> None:
    """Leave task-indexed BatchNorm statistics out of DistributedDataParallel's buffer broadcast
    (read when DDP wraps the model: convert first, then wrap). Each process refreshes a finished
    task's rows from its own batches; a broadcast of rank 0's rows at every later forward would
    change a finished task's statistics on the other ranks, so each rank keeps its own (as
    ``broadcast_buffers=False`` does), and every rank's earlier tasks stay bit-identical."""
    from hat.modules.norm import _TaskIndexedBatchNorm

    names = [f"{prefix}.{b}" if prefix else b for prefix, m in root.named_modules()
             if isinstance(m, _TaskIndexedBatchNorm) for b in _LOCAL_STATISTICS if m._buffers.get(b) is not None]
    known = list(getattr(root, "_ddp_params_and_buffers_to_ignore", ()))
    added = [n for n in names if n not in known]
    if added:
        root._ddp_params_and_buffers_to_ignore = known + added
    root.__dict__["_hat_ddp_local"] = added  # unconvert takes them out again


def _ensure_root_hook(root: nn.Module) -> None:
    root = unwrapped(root)  # a wrapper (torch.compile, DDP) calls the model it wraps: the hook belongs there
    if "_hat_root_hook" not in root.__dict__:
        handle = root.register_forward_pre_hook(_root_pre_hook, with_kwargs=True)
        root.__dict__["_hat_root_hook"] = handle.id
    if "_hat_state_dict_hook" not in root.__dict__:  # a state dict carries the statistics evaluation would use
        root.__dict__["_hat_state_dict_hook"] = root.register_state_dict_pre_hook(_refresh_before_saving).id
    if "_hat_ddp_local" not in root.__dict__:
        _keep_statistics_local(root)
    if "_hat_scores_load_hook" not in root.__dict__:  # a state dict with task-prediction statistics loads as is
        install_load_hook(root)


# -- conversion -------------------------------------------------------------------------------
def _matcher(pattern: Pattern, name: str) -> Any:
    if pattern is None:
        return None
    if isinstance(pattern, str):
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise HATValueError(f"{name}={pattern!r} is not a valid regular expression: {err}") from None
        return lambda n: regex.fullmatch(n) is not None
    if isinstance(pattern, (list, tuple, set, frozenset)) and all(isinstance(p, str) for p in pattern):
        items = list(pattern)
        return lambda n: any(n == p or n.endswith("." + p) for p in items)
    raise HATTypeError(f"{name} must be a regex string or a list of module names; got {pattern!r}")


def _check_wrapped(model: Any, what: str) -> None:
    wrapped = getattr(torch._dynamo.eval_frame, "OptimizedModule", ())
    if wrapped and isinstance(model, wrapped):
        raise HATTypeError(f"{what}: the model is wrapped by torch.compile; call {what} on the model first and "
                           "compile the result (torch.compile(hat.convert(model, cfg)))")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise HATTypeError(f"{what}: the model is wrapped by {type(model).__name__}; call {what} on model.module "
                           "(or before wrapping) and wrap the result")


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _classifier_name(model: nn.Module, classifier: Any, modules: dict[str, nn.Module]) -> tuple[str | None, list[str]]:
    """(the classifier to make per task, modules to leave plain as per-task heads). An nn.Linear
    becomes a TaskIndexedLinear; a convolution (a fully convolutional classifier, SqueezeNet's)
    gets its weight and bias per task."""
    if classifier is None:  # the classifier found as for "auto" stays as it is
        head, plain = _classifier_name(model, "auto", modules)
        return None, plain + ([head] if head is not None else [])
    if classifier != "auto":
        if not isinstance(classifier, str):
            raise HATTypeError(f"classifier must be 'auto', a module name or None; got {classifier!r}")
        found = modules.get(classifier)
        if found is None:
            raise HATValueError(f"classifier={classifier!r} names no module of {type(model).__name__}")
        if type(found) is not nn.Linear and type(found) not in _CONVS:
            raise HATTypeError(f"classifier={classifier!r} is a {type(found).__name__}; only an nn.Linear or an "
                               "nn.Conv1d/2d/3d can become a per-task head")
        return classifier, []
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, Mapping) and isinstance(cfg.get("classifier"), str):
        name = cfg["classifier"]
        found = modules.get(name)
        return (name if type(found) is nn.Linear or type(found) in _CONVS else None), []
    linears = [n for n, m in modules.items() if type(m) is nn.Linear and n]
    if not linears:  # a fully convolutional classifier: the last convolution
        convs = [n for n, m in modules.items() if type(m) in _CONVS and n]
        return (convs[-1] if convs else None), []
    last = linears[-1]
    parent = modules.get(last.rpartition(".")[0]) if "." in last else model
    if isinstance(parent, (nn.ModuleList, nn.ModuleDict)):
        # the model already has one head per task: leave them plain (trained by their own task only)
        prefix = last.rpartition(".")[0] + "."
        return None, [n for n in linears if n.startswith(prefix) and "." not in n[len(prefix):]]
    return last, []


def convert(model: nn.Module, hat_config: HATConfig, *, include: Pattern = None, exclude: Pattern = None,
            mapping: Mapping[type, type | None] | None = None, classifier: Any = "auto") -> nn.Module:
    """Turn a plain model into a HAT model in place; its forward still takes and returns tensors.

    Modules of exactly the mapped types (default: nn.Linear, nn.Conv1d/2d/3d, the torch norms, and
    timm's and torchvision's layer families, see ``hat.convert.mapping``) become HAT layers / task-indexed
    norms keeping every weight, buffer and Parameter object. The parameters other modules hold
    themselves (class tokens, position embeddings, layer scales) get one row per task.
    ``classifier="auto"`` turns the classifier (timm's
    ``pretrained_cfg['classifier']``, else the last nn.Linear) into a ``TaskIndexedLinear`` head,
    one per task, each starting from its weights; per-task heads the model already has (the last
    nn.Linear sits in a ModuleList/ModuleDict) stay plain. A module name picks the classifier;
    None leaves the classifier "auto" would pick as it is (plain, shared by every task).

    ``include``/``exclude``: a regex (full match on the module name) or a list of names or dotted
    suffixes. ``mapping``: extra or replacement ``{torch layer type: HAT type}`` (None drops a
    type). Everything is checked before anything is swapped. A model that already has HAT
    layers is an error (convert once). Select the task with ``hat.set_task`` / ``hat.task``.
    """
    # -- check the arguments ------------------------------------------------------------------
    _check_wrapped(model, "convert")
    _check_module(model, "convert")
    check_config(hat_config)
    if task_modules(model):
        raise HATValueError(f"convert: {type(model).__name__} already has HAT or task-indexed layers; convert a plain "
                            "model once (to change tasks use hat.set_task)")
    table: dict[type, type] = default_mapping()
    if mapping is not None:
        if not isinstance(mapping, Mapping):
            raise HATTypeError(f"mapping must be a dict {{torch layer type: HAT type}}; got {type(mapping).__name__}")
        for key, value in mapping.items():
            if not (isinstance(key, type) and issubclass(key, nn.Module)):
                raise HATTypeError(f"mapping key {key!r} is not an nn.Module subclass")
            if value is None:
                table.pop(key, None)
            elif not (isinstance(value, type) and hasattr(value, "from_base_module")):
                raise HATTypeError(f"mapping[{key.__name__}] = {value!r} has no from_base_module classmethod "
                                   "(use a hat.modules class)")
            else:
                table[key] = value
    inc, exc = _matcher(include, "include"), _matcher(exclude, "exclude")
    modules = dict(model.named_modules())
    if type(model) in table or type(model) is nn.Linear:
        raise HATTypeError(f"convert: the model itself is a {type(model).__name__}; wrap it (nn.Sequential(layer)) so "
                           "it can be converted in place")
    head, plain_heads = _classifier_name(model, classifier, modules)

    # -- collect the targets ----------------------------------------------------------------------
    targets: list[tuple[str, nn.Module, Any]] = []
    excluded_any = False
    for name, m in modules.items():
        if not name or name in plain_heads:
            continue
        kind = "head" if name == head else table.get(type(m))
        if kind is None:
            continue
        if kind != "head" and getattr(kind, "_hat_unsupported", None) is not None and kind._hat_unsupported(m):
            continue  # an instance of a mapped type in a configuration its HAT type does not cover: plain
        if inc is not None and not inc(name):
            continue
        if exc is not None and exc(name):
            excluded_any = True
            continue
        targets.append((name, m, kind))
    if not targets:
        types = Counter(type(m).__name__ for n, m in modules.items() if n)
        found = ", ".join(f"{t} x{c}" for t, c in types.most_common(12)) or "none"
        raise HATValueError(f"convert: no module matched (include={include!r}, "
                            f"exclude={exclude!r}); the model's module "
                            f"types: {found}; convertible: {', '.join(t.__name__ for t in table)}")
    if exc is not None and not excluded_any:
        warnings.warn(f"convert: exclude={exclude!r} excluded no module that would be converted", stacklevel=2)
    converted = {n for n, _, _ in targets}
    shared = [n for n, m in modules.items() if n and n not in converted
              and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    # the parameters other modules hold themselves (tokens, layer scales): one row per task
    owners = Counter(id(p) for m in modules.values() for p in m._parameters.values() if p is not None)
    per_task = []
    for name, m in modules.items():
        if name in converted or name in plain_heads or name == head or isinstance(m, (TaskTracked, *_LAYERS)):
            continue  # a layer left plain stays whole: its own weights are not small per-task extras
        if (inc is not None and not inc(name)) or (exc is not None and exc(name)):
            continue
        names = [n for n in candidates(m) if owners[id(m._parameters[n])] == 1]
        if names:
            per_task.append((m, names))

    # -- build the replacements (nothing swapped yet) ------------------------------------------
    built: list[tuple[str, nn.Module]] = []
    for name, m, kind in targets:
        if kind == "head" and type(m) in _CONVS:
            per_task.append((m, [n for n in ("weight", "bias") if m._parameters.get(n) is not None]))
            continue  # a convolution head: its own weight and bias per task, in place (below)
        if kind == "head":
            new = TaskIndexedLinear.from_base_module(m, hat_config=hat_config)
        else:
            new = kind.from_base_module(m, hat_config=hat_config)
        built.append((name, new))

    # -- swap ----------------------------------------------------------------------------------
    for name, new in built:
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, new)
    for m, names in per_task:
        make_task_parameters(m, names, hat_config.num_tasks)
    _without_fast_path(model)
    model.__dict__["_hat_shared_norms"] = shared
    model.__dict__["_hat_plain_heads"] = plain_heads
    _ensure_root_hook(model)
    return model


def _without_fast_path(model: nn.Module) -> None:
    """torch's fused inference kernel for ``nn.TransformerEncoderLayer`` (eval, no grad) reads the
    layer's norms and projections as plain tensors, so it cannot take task-indexed rows or masks.
    The layer's flag that gates it is turned off (its own forward, exactly the same math, runs
    instead); ``unconvert`` turns it back on."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and getattr(m, "activation_relu_or_gelu", False) and any(
                isinstance(c, TaskTracked) for c in m.modules()):
            m.__dict__["_hat_fast_path"] = m.activation_relu_or_gelu
            m.activation_relu_or_gelu = False


def unconvert(model: nn.Module, task_id: Any) -> nn.Module:
    """A plain copy of ``model`` for one task: every HAT layer becomes the torch layer it
    replaced, with the task's hard mask folded into its weights (task-indexed norms and heads:
    the task's row). Evaluation outputs equal the HAT model's for that task; ``model`` itself
    is left as it is."""
    _check_wrapped(model, "unconvert")
    _check_module(model, "unconvert")
    modules = _modules_for(model, "unconvert")
    checked = {m.num_tasks: check_task_id(task_id, m.num_tasks) for m in modules}
    _statistics.refresh_pending(model)  # the export carries the statistics evaluation would use
    clone = copy.deepcopy(model)
    for key in ("_hat_stats_pending", "_hat_stat_norms"):
        clone.__dict__.pop(key, None)
    hook = clone.__dict__.pop("_hat_root_hook", None)
    if hook is not None:
        clone._forward_pre_hooks.pop(hook, None)
        clone._forward_pre_hooks_with_kwargs.pop(hook, None)
    for key in ("_hat_shared_norms", "_hat_plain_heads"):
        clone.__dict__.pop(key, None)
    added = clone.__dict__.pop("_hat_ddp_local", None)
    if added:
        kept = [n for n in clone.__dict__.get("_ddp_params_and_buffers_to_ignore", ()) if n not in added]
        if kept:
            clone._ddp_params_and_buffers_to_ignore = kept
        else:
            clone.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)
    saving_hook = clone.__dict__.pop("_hat_state_dict_hook", None)
    if saving_hook is not None:
        clone._state_dict_pre_hooks.pop(saving_hook, None)
    scores_hook = clone.__dict__.pop("_hat_scores_load_hook", None)
    if scores_hook is not None:  # a one-task plain model has no task to predict
        clone._load_state_dict_pre_hooks.pop(scores_hook, None)
    for name in [n for n in clone._buffers if n.startswith(PREFIX)]:
        del clone._buffers[name]
    replace = [(n, m) for n, m in clone.named_modules() if isinstance(m, TaskTracked)]
    # deepest first: a module's plain copy then holds the plain copies of its children
    for name, m in sorted(replace, key=lambda item: -(item[0].count(".") + bool(item[0]))):
        new = m.to_base_module(task_id=checked[m.num_tasks])
        if not name:
            return _scrubbed(new)
        parent_name, _, attr = name.rpartition(".")
        setattr(clone.get_submodule(parent_name) if parent_name else clone, attr, new)
    return _scrubbed(clone)


def _scrubbed(model: nn.Module) -> nn.Module:
    """``model`` without what hat added to its modules (the HAT methods of a hat.timm_models class,
    the config and the trace's notes): pickling it, and loading it, needs no ``hat``."""
    for m in model.modules():
        if "_hat_fast_path" in m.__dict__:  # torch's fused kernel reads plain layers again
            m.activation_relu_or_gelu = m.__dict__["_hat_fast_path"]
        for key in [k for k in m.__dict__ if k.startswith("_hat_") or k == "hat_config"]:
            del m.__dict__[key]
        built_with = m.__dict__.get("_model_args")  # timm keeps create_model's keyword arguments
        if isinstance(built_with, dict) and "hat_config" in built_with:
            m.__dict__["_model_args"] = {k: v for k, v in built_with.items() if k != "hat_config"}
        cls = type(m)
        if cls.__module__.startswith("hat."):
            plain = next((c for c in cls.__mro__ if not c.__module__.startswith("hat.")), None)
            if plain is not None and plain is not nn.Module and issubclass(plain, nn.Module):
                m.__class__ = plain
    return model
