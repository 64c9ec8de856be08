"""``hat.prune(model, task_id)``: a plain torch model for one task, smaller than the HAT model.

``hat.unconvert`` folds a task's hard mask into the weights and keeps every unit: the units the
task never switches on still cost memory and time. ``hat.prune`` removes them: output channels of
convolutions and rows of linear layers, the input channels and columns of the layers that read
them, and their BatchNorm entries. It finds what reads what with one recording forward of the
converted model (the first-call trace's recorder of ``hat.convert.trace``, which knows where each
tensor's units come from), and cuts only where that is exact:

- units are grouped: a unit and every position that holds it downstream are cut together. A
  residual sum holds several layers' units at one position, so the stream keeps the union of the
  units its branches use: a channel is kept when any task-used unit reaches it;
- a position some mask does not reach (the model's input, a learned token added to the stream) is
  kept, and so is everything it is grouped with;
- units read by something a cut would change are kept whole: a LayerNorm or GroupNorm (their
  statistics run over every unit), an attention (its heads are reshaped to fixed sizes), a plain
  layer or an op the recorder cannot size-check (a reshape to explicit sizes, a product with a
  per-channel tensor such as a squeeze-excite gate), the model's output.

The result is checked: its outputs on an example input must equal the HAT model's (eval mode, hard
masks) within ``1e-5`` of the outputs' scale (of 1 where they are smaller), or ``hat.prune``
raises. The example is the first sample of the model's first call (kept by ``hat.convert``), or
``example_input``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from hat.convert import trace as _trace
from hat.convert.api import _check_module, _check_wrapped, _modules_for, task, unconvert
from hat.errors import HATError, HATValueError
from hat.modules._base import HATMasked
from hat.modules._masked import MaskedLayer
from hat.modules.linear import TaskIndexedLinear
from hat.modules.norm import _TaskIndexedBatchNorm
from hat.payload import HATPayload
from hat.protect.hooks import trained_tasks
from hat.tracking.tracked import TaskTracked

__all__ = ["PruneReport", "prune", "prune_report"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = (nn.Linear, *_CONVS)
_CONV_FORWARDS = tuple(c.forward for c in _CONVS)  # a subclass with its own forward (weight standardization) reads
# its inputs otherwise: its input channels stay

# ops after which a cut unit is still cut in the same place, whatever the sizes (checked per call)
_KEEP = frozenset(n for n, rule in _trace._RULES.items() if rule is _trace._keep) - {"prelu"}  # prelu: per channel
_SUM = frozenset(("add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__"))
_PRODUCT = frozenset(("mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply", "div", "div_", "__truediv__",
                      "__itruediv__", "true_divide"))
_MOVE = frozenset(("permute", "transpose", "transpose_", "swapaxes", "swapdims", "t", "movedim", "moveaxis",
                   "squeeze", "unsqueeze", "squeeze_", "unsqueeze_", "flatten"))
# ops that must leave the unit dimension itself alone (checked: the units are the same after)
_ASIDE = frozenset(("__getitem__", "narrow", "select", "unbind", "split", "split_with_sizes", "chunk", "tensor_split",
                    "pad", "mean", "sum", "amax", "amin", "max", "min", "nanmean", "nansum", "std", "var", "norm"))
_CAT = frozenset(("cat", "concat", "concatenate"))
_RESHAPE = frozenset(("view", "reshape"))


class PruneReport(NamedTuple):
    """One task's pruned model against the unpruned plain one (``hat.unconvert``): parameters,
    FLOPs of one forward of the example (``torch.utils.flop_counter.FlopCounterMode``), the
    largest absolute difference of the pruned model's outputs from the HAT model's, and per
    pruned layer ``name -> (units kept, units)``."""

    task: int
    params: int
    params_pruned: int
    flops: int
    flops_pruned: int
    max_abs_diff: float
    kept: dict[str, tuple[int, int]]


# -- the recording --------------------------------------------------------------------------------
class _Record(_trace._Recorder):
    """The first-call trace's recorder, noting also which units a cut would break (``pins``) and
    what each task-aware module read (``calls``)."""

    def __init__(self) -> None:
        super().__init__()
        self.pins: list[Any] = []  # _Units that must stay whole
        self.calls: list[tuple[nn.Module, Any, int, Any]] = []  # (module, input units, input ndim, output units)

    def norm_output(self, norm: nn.Module, carried: Any, x: Any, y: torch.Tensor) -> Any:
        # the placement the model has now: a norm masks its output again only with its own unit map
        unit_map = getattr(norm, "_hat_unit_map", None)
        if carried is None or carried.dense or unit_map is None or not isinstance(x, torch.Tensor) \
                or y.shape != x.shape:
            return _trace._dense("a norm that does not mask its output again")
        seen = _trace._unit_map(carried, x.dim(), norm._hat_unit_dim(x.dim()), norm.num_units, norm.num_tasks)
        return carried if seen.same_as(unit_map) else _trace._dense("a norm masking with other units")

    def call(self, module: nn.Module, x: Any, forward: Any, dense_input: str | None = None) -> Any:
        carried = self.get(x) if isinstance(x, torch.Tensor) else None
        ndim = x.dim() if isinstance(x, torch.Tensor) else -1
        y = super().call(module, x, forward, dense_input)
        self.calls.append((module, carried, ndim, self.get(y) if isinstance(y, torch.Tensor) else None))
        return y

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.depth:
            return super().__torch_function__(func, types, args, kwargs)
        flat_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        carried = [(a, u) for a, u in ((a, self.get(a)) for a in flat_in) if u is not None and not u.dense]
        out = super().__torch_function__(func, types, args, kwargs)
        if carried:
            flat_out = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            if flat_out and not _cut_follows(self, getattr(func, "__name__", ""), args, kwargs, flat_in, carried,
                                             flat_out):
                self.pins.extend(u for _, u in carried)
        return out


def _same_units(a: Any, b: Any) -> bool:
    return len(a.parts) == len(b.parts) and all(
        sa is sb and ia.shape == ib.shape and torch.equal(ia, ib) for (sa, ia), (sb, ib) in zip(a.parts, b.parts))


def _cut_follows(rec: _Record, name: str, args: Any, kwargs: Any, flat_in: list, carried: list, flat_out: list) -> bool:
    """Whether op ``name`` computes the same thing when the units it reads are cut (as long as every
    position holding a unit is cut with it)."""
    outs = [rec.get(o) for o in flat_out]
    if any(u is None or u.dense for u in outs):
        return False  # the units do not reach the output as units: a cut would change its shape or values
    if name in _KEEP or name in _MOVE:
        return True
    if name in _SUM:  # every operand holds units at the same positions: all cut alike
        return len(carried) == len(flat_in)
    if name in _PRODUCT:  # other factors broadcast along the units (a scale, a spatial gate)
        dims = outs[0].dims
        out = flat_out[0]
        for a in flat_in:
            if any(a is c for c, _ in carried):
                continue
            shift = out.dim() - a.dim()
            if any(d - shift >= 0 and a.shape[d - shift] != 1 for d in dims):
                return False
        return True
    if name in _ASIDE:
        before = carried[0][1]
        return all(_same_units(before, u) for u in outs)
    if name in _CAT:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        dim = dim % flat_out[0].dim()
        return len(carried) == len(flat_in) and outs[0].dims == (dim,)
    if name in _RESHAPE:
        shape = args[1:] if len(args) > 1 else (kwargs.get("shape") or kwargs.get("size") or ())
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        return len(shape) == flat_out[0].dim() and all(shape[d] == -1 for d in outs[0].dims)
    return False


def _recorded(model: nn.Module, args: tuple, kwargs: dict) -> tuple[_Record, Any]:
    """One recording forward of ``model`` (the first-call trace's, by a ``_Record``)."""
    rec = _trace._record(model, args, kwargs, _modules_for(model, "prune"), set(), rec=_Record())
    return rec, rec.output


# -- what to keep -----------------------------------------------------------------------------
class _Groups:
    """Union-find over units of the layers (``out``) and positions of their inputs (``in``)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.live: list[bool] = []
        self.base: dict[tuple[int, str], int] = {}

    def add(self, module: nn.Module, side: str, size: int) -> None:
        key = (id(module), side)
        if key not in self.base:
            self.base[key] = len(self.parent)
            self.parent.extend(range(len(self.parent), len(self.parent) + size))
            self.live.extend([False] * size)

    def node(self, module: nn.Module, side: str, i: int) -> int:
        return self.base[(id(module), side)] + i

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb
            self.live[rb] = self.live[rb] or self.live[ra]

    def set_live(self, i: int) -> None:
        self.live[self.find(i)] = True

    def kept(self, module: nn.Module, side: str, size: int) -> list[int]:
        return [i for i in range(size) if self.live[self.find(self.node(module, side, i))]]


def _consumer_kind(m: nn.Module, plain: nn.Module | None) -> str | None:
    """How ``m`` (task-aware) may have its input cut in the plain model: 'linear', 'conv', 'bn' or
    None (it reads every unit: a LayerNorm, an attention, a layer with another forward)."""
    if plain is None:
        return None
    if isinstance(m, (MaskedLayer, TaskIndexedLinear)) and type(plain).forward is nn.Linear.forward \
            and isinstance(plain, nn.Linear):
        return "linear"
    if isinstance(m, MaskedLayer) and isinstance(plain, _CONVS) and type(plain).forward in _CONV_FORWARDS:
        return "conv" if plain.groups == 1 or _depthwise(plain) else None
    if isinstance(m, _TaskIndexedBatchNorm) and isinstance(plain, nn.modules.batchnorm._BatchNorm):
        return "bn"
    return None


def _depthwise(conv: nn.Module) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _is_producer(m: nn.Module, plain: nn.Module | None) -> bool:
    """A masked layer whose units are output rows / channels of a plain linear or convolution."""
    return (isinstance(m, MaskedLayer) and isinstance(plain, _LAYERS) and m.mask_dim == m._hat_default_mask_dim
            and "_hat_read_directly" not in m.__dict__
            and (not isinstance(plain, _CONVS) or plain.groups == 1 or _depthwise(plain)))


def _input_size(kind: str, plain: nn.Module) -> int:
    return plain.in_features if kind == "linear" else plain.in_channels if kind == "conv" else plain.num_features


def _input_dim(kind: str, plain: nn.Module, ndim: int) -> int | None:
    if ndim <= 0:
        return None
    if kind == "linear":
        return ndim - 1
    if kind == "conv":
        spatial = len(plain.kernel_size)
        return 1 if ndim == spatial + 2 else 0
    return 1 if ndim >= 2 else 0


def _plan(model: nn.Module, plain: nn.Module, rec: _Record, out: Any, task_id: int,
          multiple_of: int = 1) -> tuple[dict, dict]:
    """``({name: units kept}, {name: input positions kept})`` for the layers that lose some."""
    names = {id(m): n for n, m in model.named_modules()}
    plain_of = dict(plain.named_modules())
    groups = _Groups()
    producers: dict[int, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, HATMasked):
            units = m.task_embedding.shape[1]
            groups.add(m, "out", units)
            on = (m.task_embedding.detach()[task_id] > 0).tolist()
            whole = not _is_producer(m, plain_of.get(name))
            for i, flag in enumerate(on):
                if flag or whole:
                    groups.set_live(groups.node(m, "out", i))
            if not whole:
                producers[id(m)] = m

    def pin(units: Any) -> None:
        if units is None or units.dense:
            return
        for source, index in units.parts:
            if source is None or (id(source), "out") not in groups.base:
                continue
            for i in index.flatten().tolist():
                if i >= 0:
                    groups.set_live(groups.node(source, "out", i))

    for units in rec.pins:
        pin(units)
    for o in tree_flatten(out)[0]:
        if isinstance(o, HATPayload):
            o = o._raw
        if isinstance(o, torch.Tensor):
            pin(rec.get(o))

    # the inputs of the layers that can lose input positions
    consumers: dict[int, tuple[nn.Module, str, list]] = {}
    for m, carried, ndim, y_units in rec.calls:
        name = names.get(id(m))
        kind = _consumer_kind(m, plain_of.get(name)) if name is not None else None
        if kind is None:
            pin(carried)
            continue
        if kind == "bn" and (y_units is None or y_units.dense):
            pin(carried)  # its output does not hold the units again: a cut would change its shape downstream
        entry = consumers.setdefault(id(m), (m, kind, []))
        entry[2].append((carried, ndim))
    cut_in: dict[str, list[int]] = {}
    for m, kind, seen in consumers.values():
        p = plain_of[names[id(m)]]
        size = _input_size(kind, p)
        groups.add(m, "in", size)
        maps = [_trace._unit_map(c if c is not None else _trace._dense("not followed"), ndim,
                                 _input_dim(kind, p, ndim), size, m.num_tasks) for c, ndim in seen]
        if any(not other.same_as(maps[0]) for other in maps[1:]):
            for c, _ in seen:
                pin(c)
            for i in range(size):
                groups.set_live(groups.node(m, "in", i))
            continue
        covered = torch.zeros(size, dtype=torch.bool)
        for part in maps[0].parts:
            cover = part.covers(size)
            covered |= cover
            if part.source is None or id(part.source) not in producers:
                for i in cover.nonzero().flatten().tolist():
                    groups.set_live(groups.node(m, "in", i))
                if part.source is not None:
                    pin(_trace._Units((0,), ((part.source, part.index if part.index is not None else torch.arange(
                        size)),)))
                continue
            index = torch.arange(size) if part.index is None else part.index
            for i in cover.nonzero().flatten().tolist():
                groups.join(groups.node(m, "in", i), groups.node(part.source, "out", int(index[i])))
        for i in (~covered).nonzero().flatten().tolist():
            groups.set_live(groups.node(m, "in", i))
        for c, _ in seen:  # units read along another dimension than the layer's input
            if c is not None and not c.dense and not maps[0].sources:
                pin(c)
        if kind == "conv" and _depthwise(p) and id(m) in producers:
            for i in range(size):  # a depthwise channel reads its own input channel only
                groups.join(groups.node(m, "in", i), groups.node(m, "out", i))
        elif kind == "conv" and _depthwise(p):
            for i in range(size):
                groups.set_live(groups.node(m, "in", i))

    # no layer left without units (a convolution of zero channels is not a convolution), and widths
    # rounded up to ``multiple_of`` with units the task does not use (exact: they hold zeros)
    for m in producers.values():
        units = m.task_embedding.shape[1]
        kept = groups.kept(m, "out", units)
        target = min(units, max(multiple_of, -(-len(kept) // multiple_of) * multiple_of))
        need = target - len(kept)
        for i in range(units):
            if need <= 0:
                break
            node = groups.node(m, "out", i)
            if not groups.live[groups.find(node)]:
                groups.set_live(node)
                need -= 1
    cut_out = {}
    for m in producers.values():
        units = m.task_embedding.shape[1]
        kept = groups.kept(m, "out", units)
        if len(kept) < units:
            cut_out[names[id(m)]] = kept
    for m, kind, _ in consumers.values():
        size = _input_size(kind, plain_of[names[id(m)]])
        kept = groups.kept(m, "in", size)
        if len(kept) < size:
            cut_in[names[id(m)]] = kept
    return cut_out, cut_in


# -- attention heads ----------------------------------------------------------------------------
def _timm_attention(module: nn.Module) -> bool:
    """timm's ``Attention`` (ViT, DeiT ...) with nothing over its heads' dimensions: no q/k norm, no
    norm before the projection, no gate."""
    cls = type(module)
    return (cls.__name__ == "Attention" and cls.__module__ == "timm.layers.attention"
            and all(type(getattr(module, n, None)) is nn.Identity for n in ("q_norm", "k_norm", "norm"))
            and getattr(module, "gate", None) is None and isinstance(getattr(module, "qkv", None), nn.Linear)
            and isinstance(getattr(module, "proj", None), nn.Linear))


def _attention_cuts(model: nn.Module, plain: nn.Module, task_id: int, cut_out: dict, cut_in: dict) -> dict[str, int]:
    """Narrower heads for timm attentions whose qkv is a masked layer: per head, the query/key
    dimensions both used by the task (a product with an unused one is 0) and the value dimensions
    used, each padded with unused ones to the widest head's count (every head has one width).
    Adds the qkv rows and projection columns kept to ``cut_out``/``cut_in``; returns the new head
    width per attention."""
    hat_modules = dict(model.named_modules())
    widths = {}
    for name, attention in plain.named_modules():
        if not _timm_attention(attention):
            continue
        prefix = f"{name}." if name else ""
        qkv, proj = hat_modules.get(prefix + "qkv"), hat_modules.get(prefix + "proj")
        if not (isinstance(qkv, MaskedLayer) and qkv.mask_dim == qkv._hat_default_mask_dim and not qkv._hat_defer
                and isinstance(proj, MaskedLayer)) or "_hat_read_directly" in qkv.__dict__:
            continue
        heads, width = attention.num_heads, attention.head_dim
        if qkv.task_embedding.shape[1] != 3 * heads * width or proj.in_features != heads * width:
            continue
        on = (qkv.task_embedding.detach()[task_id] > 0).view(3, heads, width).cpu()
        pairs, values = on[0] & on[1], on[2]
        new = max(1, int(pairs.sum(1).max()), int(values.sum(1).max()))
        if new == width:
            continue

        qk = [_padded(pairs[h], new) for h in range(heads)]
        v = [_padded(values[h], new) for h in range(heads)]
        rows = [part * heads * width + h * width + d for part, per_head in ((0, qk), (1, qk), (2, v))
                for h in range(heads) for d in per_head[h]]
        cut_out[prefix + "qkv"] = rows
        cut_in[prefix + "proj"] = [h * width + d for h in range(heads) for d in v[h]]
        widths[name] = new
    return widths


def _padded(used: torch.Tensor, size: int) -> list[int]:
    """The positions ``used`` marks, and unused ones after them up to ``size`` positions, in order."""
    chosen = used.nonzero().flatten().tolist()
    spare = (~used).nonzero().flatten().tolist()
    return sorted(chosen + spare[:size - len(chosen)])


def _narrow_heads(attention: nn.Module, head_dim: int) -> None:
    """Give a timm attention whose qkv and projection were cut its new head width. The queries are
    scaled by sqrt(new / old), so that softmax(q k / sqrt(new)), what the fused kernel computes with
    its default scale, equals the original softmax(q k / sqrt(old))."""
    old = attention.head_dim
    factor = (head_dim / old) ** 0.5
    queries = attention.num_heads * head_dim
    with torch.no_grad():
        attention.qkv.weight[:queries].mul_(factor)
        if attention.qkv.bias is not None:
            attention.qkv.bias[:queries].mul_(factor)
    attention.head_dim = head_dim
    attention.attn_dim = attention.num_heads * head_dim
    attention.scale = head_dim**-0.5


# -- the cut ------------------------------------------------------------------------------------
def _rows(t: torch.Tensor, keep: list[int], dim: int = 0) -> torch.Tensor:
    return t.detach().index_select(dim, torch.tensor(keep, device=t.device)).clone()


def _cut_out(layer: nn.Module, keep: list[int]) -> None:
    units = layer.weight.shape[0]
    for name, p in list(layer._parameters.items()):
        if p is not None and p.dim() >= 1 and p.shape[0] == units:
            layer._parameters[name] = nn.Parameter(_rows(p, keep), requires_grad=p.requires_grad)
    if isinstance(layer, nn.Linear):
        layer.out_features = len(keep)
    else:
        layer.out_channels = len(keep)
        if layer.groups > 1:  # depthwise: one group per channel
            layer.groups = layer.in_channels = len(keep)


def _cut_in(layer: nn.Module, keep: list[int]) -> None:
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        for name in ("weight", "bias"):
            p = layer._parameters.get(name)
            if p is not None:
                layer._parameters[name] = nn.Parameter(_rows(p, keep), requires_grad=p.requires_grad)
        for name in ("running_mean", "running_var"):
            b = layer._buffers.get(name)
            if b is not None:
                layer._buffers[name] = _rows(b, keep)
        layer.num_features = len(keep)
        return
    if isinstance(layer, nn.Linear):
        layer.weight = nn.Parameter(_rows(layer.weight, keep, 1), requires_grad=layer.weight.requires_grad)
        layer.in_features = len(keep)
        return
    if layer.groups > 1:  # depthwise: its channels were cut with its output
        if layer.in_channels != len(keep):
            raise HATError(f"prune: a depthwise convolution would keep {len(keep)} inputs but "
                           f"{layer.in_channels} outputs")
        return
    layer.weight = nn.Parameter(_rows(layer.weight, keep, 1), requires_grad=layer.weight.requires_grad)
    layer.in_channels = len(keep)


# -- the API --------------------------------------------------------------------------------------
def _check_task(model: nn.Module, task_id: Any, what: str) -> int:
    from hat.forget import check_trained_task

    _modules_for(model, what)
    return check_trained_task(model, task_id)


def _example(model: nn.Module, example_input: Any, what: str) -> tuple[tuple, dict]:
    if example_input is None:
        stored = model.__dict__.get("_hat_example")
        if stored is None:
            raise HATValueError(f"{what}: example_input=None and the model has not been called yet; pass "
                                "example_input (a batch, or a tuple of the model's positional inputs)")
        device = next((p.device for p in model.parameters()), None)  # the model may have moved since
        move = lambda a: a.to(device) if isinstance(a, torch.Tensor) and device is not None else a  # noqa: E731
        return tuple(move(a) for a in stored[0]), {k: move(v) for k, v in stored[1].items()}
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if not any(isinstance(a, (torch.Tensor, HATPayload)) for a in args):
        raise HATValueError(f"{what}: example_input must be a tensor or a tuple of the model's inputs; "
                            f"got {type(example_input).__name__}")
    return args, {}


def _outputs(out: Any) -> list[torch.Tensor]:
    return [o._raw if isinstance(o, HATPayload) else o for o in tree_flatten(out)[0]
            if isinstance(o, (torch.Tensor, HATPayload))]


def _eval_outputs(module: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    with _trace.evaluating(module), torch.no_grad():
        return _outputs(module(*args, **kwargs))


def _difference(ref: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[float, float]:
    """(largest absolute difference, the outputs' scale: their largest absolute value)."""
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got)):
        return float("inf"), 1.0
    diff = max((float((a - b).abs().max()) for a, b in zip(ref, got) if a.numel()), default=0.0)
    scale = max((float(a.abs().max()) for a in ref if a.numel()), default=0.0)
    return diff, scale


def _pruned(model: nn.Module, task_id: Any, example_input: Any, what: str,
            multiple_of: Any = 1) -> tuple[nn.Module, float, tuple, dict, dict[str, tuple[int, int]]]:
    """(the pruned model, its largest output difference, the example's args and kwargs, units kept)."""
    _check_wrapped(model, what)
    _check_module(model, what)
    t = _check_task(model, task_id, what)
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise HATValueError(f"{what}: multiple_of must be a positive int (1: no rounding); got {multiple_of!r}")
    args, kwargs = _example(model, example_input, what)
    plain = unconvert(model, t)
    with task(model, t):
        rec, out = _recorded(model, args, kwargs)
        if not any(isinstance(m, TaskTracked) for m, *_ in rec.calls):
            raise HATValueError(f"{what}: {type(model).__name__} takes payloads (a hand-built hat.modules model); "
                                "hat.prune follows models that take tensors (hat.convert, hat.timm_models). "
                                "Use hat.unconvert for a plain copy of the same size")
        ref = _eval_outputs(model, args, kwargs)
    cut_out, cut_in = _plan(model, plain, rec, out, t, multiple_of)
    heads = _attention_cuts(model, plain, t, cut_out, cut_in)
    pruned_layers = dict(plain.named_modules())
    kept: dict[str, tuple[int, int]] = {}
    for name, keep in cut_out.items():
        layer = pruned_layers[name]
        kept[name] = (len(keep), layer.weight.shape[0])
        _cut_out(layer, keep)
    for name, keep in cut_in.items():
        _cut_in(pruned_layers[name], keep)
    for name, head_dim in heads.items():
        _narrow_heads(pruned_layers[name], head_dim)
    diff, scale = _difference(ref, _eval_outputs(plain, args, kwargs))
    # a misjudged cut moves the outputs by the size of an activation; rounding (sums in another order)
    # by far less: 1e-5 of the outputs' scale, or of 1 where they are small (an untrained head's)
    if not diff <= 1e-5 * max(scale, 1.0):
        raise HATError(f"{what}: the pruned model's outputs differ from the HAT model's by {diff:.3g} (scale "
                       f"{scale:.3g}); this architecture has a cut hat.prune misjudged. Please report it; "
                       "hat.unconvert(model, task_id) gives an exact plain copy of full size")
    return plain, diff, args, kwargs, kept


def prune(model: nn.Module, task_id: int, example_input: Any = None, *, multiple_of: int = 1) -> nn.Module:
    """A plain torch model computing ``model``'s outputs for trained task ``task_id`` (evaluation
    mode, hard masks) with every unit the task does not use removed (see the module docstring for
    what is cut and what is kept whole). It holds only torch (and timm) modules: ``torch.save``,
    ``torch.export`` and loading need no ``hat``. ``example_input``: an input to follow the model
    with and to check the result on (default: the first sample of the model's first call).

    ``multiple_of``: round each cut layer's width up to a multiple of this (with units the task
    does not use, which hold zeros), as CPU and GPU kernels run widths of 8 or 16 faster.

    ``model`` is left as it is. Raises if the pruned outputs differ from the HAT model's by more
    than ``1e-5`` of their scale."""
    return _pruned(model, task_id, example_input, "prune", multiple_of)[0]


def _flops(module: nn.Module, args: tuple, kwargs: dict) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with _trace.evaluating(module), torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return int(counter.get_total_flops())


def prune_report(model: nn.Module, task_ids: Any = None, example_input: Any = None, *,
                 multiple_of: int = 1) -> list[PruneReport]:
    """Per trained task (``task_ids``: one id or several; default: every trained task), the pruned
    model against the unpruned plain one: parameters, FLOPs of one forward of the example, the
    largest output difference from the HAT model, and the units each pruned layer keeps."""
    _check_module(model, "prune_report")
    if task_ids is None:
        ids = trained_tasks(model)
    elif isinstance(task_ids, int) and not isinstance(task_ids, bool):
        ids = [task_ids]
    else:
        ids = list(task_ids)
    for t in ids:
        _check_task(model, t, "prune_report")
    reports = []
    for t in ids:
        small, diff, args, kwargs, kept = _pruned(model, t, example_input, "prune_report", multiple_of)
        full = unconvert(model, t)
        reports.append(PruneReport(
            t, sum(p.numel() for p in full.parameters()), sum(p.numel() for p in small.parameters()),
            _flops(full, args, kwargs), _flops(small, args, kwargs), diff, kept))
    return reports
