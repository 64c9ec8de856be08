"""Where the masks of a tensor-mode model reach: one recording forward over the real graph.

A converted model takes plain tensors, so no payload tells a layer whose mask its input
carries. Instead, the first call of the model runs one extra forward (evaluation mode, no
grad) under a ``TorchFunctionMode`` that follows every tensor: which HAT layers' masks its
units carry, along which dimension, how often each unit repeats (after a channel-major
flatten). Ops that keep a switched-off unit at exactly 0 pass that on (activations of the
ReLU family, pooling, dropout, views, transposes, reductions over other dimensions, scaling);
a residual ``x + y`` carries the union of both sides' masks; anything else makes the units
unknown. From the record:

- each masked layer learns its input mask (HAT's ``1 - min(a_out, a_in)``; unknown inputs get
  whole rows of used units protected, and a warning names those layers);
- a task-indexed BatchNorm or LayerNorm fed by known units masks its output again with their
  union (BatchNorm turns a masked 0 into beta; LayerNorm's output of a 0 is not 0);
- a convolution or linear layer read only by one task-indexed BatchNorm leaves the masking to
  it (folded into the norm's scale and shift, one pass instead of two).

The record only changes where masks sit before any task trained; afterwards the placement is
part of what earlier tasks computed, and stays.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

ACTIVE: _Recorder | None = None

_UNKNOWN = "unknown"


@dataclass(frozen=True)
class _Units:
    """The units of a tensor: masked by ``sources`` (HAT layers; None = the raw input) along
    ``dim``, each source unit repeated ``repeat`` times in a row."""

    sources: tuple[Any, ...]
    dim: int | None  # None: the raw input, which has every unit on along every dimension
    repeat: int = 1

    @property
    def raw(self) -> bool:
        return self.dim is None


_RAW = _Units((None,), None)

# Ops that map 0 to 0 unit by unit (the first tensor argument carries the units).
_KEEP_ZERO = {
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "hardswish", "hardswish_", "leaky_relu", "leaky_relu_",
    "elu", "elu_", "selu", "celu", "mish", "hardtanh", "hardtanh_", "tanh", "tanh_", "softsign", "threshold",
    "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices",
    "adaptive_max_pool3d_with_indices", "contiguous", "clone", "to", "float", "half", "double", "bfloat16",
    "type_as", "detach", "neg", "__neg__", "__pos__",
}
_ADD = {"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__"}
_SCALE = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__itruediv__", "true_divide"}
_RESHAPE = {"flatten", "view", "reshape", "view_as", "reshape_as", "squeeze", "unsqueeze"}
_TRANSPOSE = {"transpose", "transpose_", "swapaxes", "swapdims", "permute", "movedim", "moveaxis"}
_REDUCE = {"mean", "sum", "amax", "max", "nanmean"}


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.units: dict[int, tuple[torch.Tensor, Any]] = {}  # id(tensor) -> (tensor, _Units | _UNKNOWN)
        self.uses: dict[int, int] = {}  # id(HAT output) -> ops outside HAT modules that read it
        self.readers: dict[int, list[nn.Module]] = {}  # id(HAT output) -> HAT modules that read it
        self.outputs: dict[nn.Module, list[torch.Tensor]] = {}  # masked layer -> its outputs
        self.inputs: dict[nn.Module, list[Any]] = {}  # HAT module -> what its inputs carried
        self.depth = 0

    # -- bookkeeping -----------------------------------------------------------------------
    def get(self, t: torch.Tensor) -> Any:
        entry = self.units.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def put(self, t: torch.Tensor, units: Any) -> None:
        self.units[id(t)] = (t, units)

    def call(self, module: nn.Module, x: Any, forward: Callable[[Any], Any]) -> Any:
        """Run a HAT module's tensor forward, noting what its input carried and what it gives."""
        from hat._core import HATMasked
        from hat.modules.linear import TaskIndexedLinear

        carried = self.get(x) if isinstance(x, torch.Tensor) else None
        ndim = x.dim() if isinstance(x, torch.Tensor) else -1
        self.inputs.setdefault(module, []).append((_UNKNOWN if carried is None else carried, ndim))
        if isinstance(x, torch.Tensor):
            self.readers.setdefault(id(x), []).append(module)
        self.depth += 1
        try:
            y = forward(x)
        finally:
            self.depth -= 1
        if not isinstance(y, torch.Tensor):
            return y
        if isinstance(module, HATMasked):
            self.put(y, _Units((module,), module.mask_dim % y.dim()))
            self.outputs.setdefault(module, []).append(y)
        elif isinstance(module, TaskIndexedLinear):
            self.put(y, _UNKNOWN)
        else:  # a norm: masks again with what it was fed, so its units are what came in
            self.put(y, carried if isinstance(carried, _Units) else _UNKNOWN)
        return y

    # -- following ops -----------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth:
            return out
        flat_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        carried = [(a, self.get(a)) for a in flat_in]
        carried = [(a, u) for a, u in carried if u is not None]
        if not carried:
            return out
        flat_out = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not flat_out:
            return out  # metadata (.shape, .dim(), ...): no data flows
        for a, _ in carried:
            self.uses[id(a)] = self.uses.get(id(a), 0) + 1
        name = getattr(func, "__name__", "")
        try:
            units = self._rule(name, args, kwargs, flat_in, carried, flat_out[0])
        except Exception:  # noqa: BLE001 - an op we misread must only make units unknown
            units = _UNKNOWN
        self.put(flat_out[0], units)
        for o in flat_out[1:]:
            if o is not flat_out[0]:
                self.put(o, _UNKNOWN)
        return out

    def _rule(self, name: str, args: Any, kwargs: Any, flat_in: list[torch.Tensor],
              carried: list[tuple[torch.Tensor, Any]], out: torch.Tensor) -> Any:
        if any(u is _UNKNOWN for _, u in carried):
            return _UNKNOWN
        if all(u.raw for _, u in carried):
            return _RAW  # nothing masked flows here: every unit counts as used
        first = args[0] if args else None
        if name in _ADD or name in _SCALE:
            # elementwise with broadcasting: each carried tensor must line up with the output
            # along its unit dimension (a broadcast that adds leading dimensions moves it)
            for a, u in carried:
                if not u.raw and (a.dim() != out.dim() or a.shape[u.dim] != out.shape[u.dim]):
                    return _UNKNOWN
        if name in _ADD:
            if len(carried) != len(flat_in) or any(not isinstance(a, torch.Tensor) for a in args[:2]):
                return _UNKNOWN  # a constant or a plain tensor added: switched-off units move
            return _union([u for _, u in carried], out)
        if name in _SCALE:
            divides = name not in ("mul", "mul_", "__mul__", "__rmul__", "__imul__")
            if divides and (not isinstance(first, torch.Tensor) or self.get(first) is None):
                return _UNKNOWN  # c / x does not keep 0
            if divides and len(args) > 1 and isinstance(args[1], torch.Tensor) and self.get(args[1]) is not None:
                return _UNKNOWN  # dividing by masked units
            return _union([u for _, u in carried if not u.raw], out)
        if not isinstance(first, torch.Tensor):
            return _UNKNOWN
        units = self.get(first)
        if units is None or units.raw:
            return _UNKNOWN
        if name in _KEEP_ZERO:
            if len(carried) != 1:
                return _UNKNOWN
            if out.dim() == first.dim() and out.shape[units.dim] == first.shape[units.dim]:
                return units
            return _UNKNOWN
        if name in _RESHAPE:
            return _reshaped(units, tuple(first.shape), tuple(out.shape))
        if name in _TRANSPOSE:
            return _transposed(name, units, first.dim(), args[1:], kwargs)
        if name in _REDUCE:
            return _reduced(units, first.dim(), args[1:], kwargs, out)
        if name == "cat" or name == "concat":
            return _UNKNOWN
        return _UNKNOWN


def _union(units: list[_Units], out: torch.Tensor) -> Any:
    if not units:
        return _UNKNOWN
    if any(u.raw for u in units):
        return _RAW
    dims = {u.dim for u in units}
    repeats = {u.repeat for u in units}
    if len(dims) != 1 or len(repeats) != 1:
        return _UNKNOWN
    sources: list[Any] = []
    for u in units:
        for s in u.sources:
            if not any(s is t for t in sources):
                sources.append(s)
    return _Units(tuple(sources), units[0].dim, units[0].repeat)


def _reshaped(units: _Units, shape: tuple[int, ...], new: tuple[int, ...]) -> Any:
    d = units.dim
    if new[:d + 1] == shape[:d + 1]:
        return units  # the unit dimension and everything before it unchanged
    if len(new) == d + 1 and new[:d] == shape[:d] and new[d] == math.prod(shape[d:]):
        # channel-major flatten: every unit repeats over the flattened positions
        return _Units(units.sources, d, units.repeat * math.prod(shape[d + 1:]))
    return _UNKNOWN


def _transposed(name: str, units: _Units, ndim: int, rest: Any, kwargs: Any) -> Any:
    d = units.dim
    if name in ("permute",):
        order = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        order = [int(i) % ndim for i in (order or kwargs.get("dims", ()))]
        return _Units(units.sources, order.index(d), units.repeat)
    if name in ("movedim", "moveaxis"):
        src, dst = (list(rest) + [kwargs.get("source"), kwargs.get("destination")])[:2]
        if isinstance(src, (list, tuple)) or isinstance(dst, (list, tuple)):
            return _UNKNOWN
        order = list(range(ndim))
        order.pop(int(src) % ndim)
        order.insert(int(dst) % ndim, int(src) % ndim)
        return _Units(units.sources, order.index(d), units.repeat)
    a, b = (list(rest) + [kwargs.get("dim0"), kwargs.get("dim1")])[:2]
    a, b = int(a) % ndim, int(b) % ndim
    return _Units(units.sources, b if d == a else a if d == b else d, units.repeat)


def _reduced(units: _Units, ndim: int, rest: Any, kwargs: Any, out: torch.Tensor) -> Any:
    dims = rest[0] if rest else kwargs.get("dim")
    if dims is None:
        return _UNKNOWN
    dims = [int(i) % ndim for i in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if units.dim in dims:
        return _UNKNOWN
    keep = (len(rest) > 1 and rest[1] is True) or kwargs.get("keepdim", False)
    d = units.dim if keep else units.dim - sum(1 for i in dims if i < units.dim)
    return _Units(units.sources, d, units.repeat) if d < out.dim() else _UNKNOWN


# -- running the record ------------------------------------------------------------------------
def maybe_trace(root: nn.Module, args: tuple, kwargs: dict) -> None:
    """Trace ``root`` once, at its first call (a forward pre-hook installed by hat.convert and
    hat.set_task). Under torch.compile this runs eagerly: a graph break at the very start."""
    if root.__dict__.get("_hat_traced") or ACTIVE is not None:
        return
    root.__dict__["_hat_traced"] = True
    _trace(root, args, kwargs)


def _trace(root: nn.Module, args: tuple, kwargs: dict) -> None:
    global ACTIVE
    from hat._core import HATMasked, task_modules
    from hat.payload import HATPayload

    modules = task_modules(root)
    if not modules or any(m.__dict__.get("_hat_link") is not None for m in modules if isinstance(m, HATMasked)):
        return  # payload models record their links themselves
    if any(bool(m.hat_trained.any()) for m in modules):
        return  # placement is part of what trained tasks computed: keep it
    rec = _Recorder()
    flags = [(m, m.training) for m in root.modules()]
    root.eval()
    try:
        with torch.no_grad(), rec:
            ACTIVE = rec
            for a in tree_flatten((args, kwargs))[0]:
                if isinstance(a, HATPayload):  # a model taking payloads at its root (hat.timm_models)
                    a = a._raw
                if isinstance(a, torch.Tensor):
                    rec.put(a, _RAW)
            root(*args, **kwargs)
    finally:
        ACTIVE = None
        for m, flag in flags:
            m.training = flag
    _apply_record(rec, root)


def _apply_record(rec: _Recorder, root: nn.Module) -> None:
    from hat._core import HATMasked, TaskTracked
    from hat.modules.masker import HATMasker
    from hat.modules.norm import TaskIndexedLayerNorm, _TaskIndexedBatchNorm

    unknown: list[str] = []
    for name, m in root.named_modules():
        if not isinstance(m, TaskTracked):
            continue
        seen = rec.inputs.get(m)
        if not seen:
            continue
        merged, ndim = seen[0]
        if any(other != seen[0] for other in seen[1:]):
            merged = _UNKNOWN
        if isinstance(m, HATMasked) and not isinstance(m, HATMasker):
            if isinstance(merged, _Units):
                m._hat_set_link((merged.sources, 1 if merged.raw else merged.repeat))
            else:
                m._hat_set_link("unknown")
                unknown.append(name or type(m).__name__)
        elif isinstance(m, (_TaskIndexedBatchNorm, TaskIndexedLayerNorm)):
            if not isinstance(merged, _Units) or merged.raw or merged.repeat != 1:
                continue
            if isinstance(m, _TaskIndexedBatchNorm):
                fits = merged.dim == 1
            else:
                fits = len(m.normalized_shape) == 1 and merged.dim == ndim - 1
            sources = tuple(s for s in merged.sources if isinstance(s, HATMasked))
            if fits and len(sources) == len(merged.sources) and all(
                    s.task_embedding.shape[1] == _norm_units(m) and s.num_tasks == m.num_tasks for s in sources):
                m._hat_sources = sources
    # a layer read by nothing but one task-indexed BatchNorm leaves its mask to that norm
    for m, outs in rec.outputs.items():
        if isinstance(m, HATMasker) or len(outs) != 1:
            continue
        y = outs[0]
        readers = rec.readers.get(id(y), [])
        if rec.uses.get(id(y), 0) == 0 and len(readers) == 1 and isinstance(readers[0], _TaskIndexedBatchNorm) \
                and readers[0]._hat_sources == (m,):
            m._hat_defer = True
    if unknown and not root.__dict__.get("_hat_trace_quiet"):
        names = ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        warnings.warn(
            f"hat: the input units of {len(unknown)} layer(s) could not be traced to the masks that feed them "
            f"({names}); whole rows of the units earlier tasks use are protected there (exact, but it leaves "
            "less capacity to later tasks)",
            stacklevel=4,
        )


def _norm_units(m: Any) -> int:
    return m.num_features if hasattr(m, "num_features") else m.normalized_shape[-1]
