"""Where the masks of a tensor-mode model reach: one recording forward over the real graph.

A converted model takes plain tensors, so no payload tells a layer whose mask its input
carries. Instead, the first call of the model runs one extra forward (evaluation mode, no
grad) under a ``TorchFunctionMode`` that follows every tensor: along which dimensions its units
run and, position by position, which HAT layer's unit each position holds (``_Units``), or that
it is dense (values no mask reaches: the model's input, a learned token, the output of an op
that moves zeros). The rules are a table from op names to functions (``_RULES``):

- elementwise ops that keep 0 at 0 (the ReLU family, pooling, dropout, casts) keep the units;
  ``x + y`` holds the union of both sides' units; ``x * g`` keeps ``x``'s whatever ``g`` is (a
  squeeze-excite gate); an op that moves 0 (a sigmoid, adding a tensor no mask reaches) makes
  every position dense;
- structural ops move the units with the values: views and reshapes (channel-major flattens,
  channel shuffles), transposes and permutes, slices, splits, chunks, selects, ``cat`` and
  ``stack`` (DenseNet's and SqueezeNet's concatenations), ``expand``;
- reductions over other dimensions keep the units; ``a @ b`` and scaled dot-product attention
  keep the units of ``b`` / ``v`` along their last dimension (an attention's output is zero
  wherever ``v`` is).

From the record:

- each masked layer learns its input units (HAT's ``1 - min(a_out, a_in)``); dense positions
  count as used by every task, so a layer whose input is dense protects whole rows of used
  units (exact, but it leaves less capacity to later tasks); ``hat.coverage`` reports why;
- a task-indexed norm fed by known units masks its output again with them (BatchNorm turns a
  masked 0 into beta; LayerNorm's output of a 0 is not 0);
- a convolution or linear layer read only by one task-indexed BatchNorm leaves the masking to
  it (folded into the norm's scale and shift, one pass instead of two).

The record only changes where masks sit before any task trained; afterwards the placement is
part of what earlier tasks computed, and stays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from hat.masks import units as _units
from hat.modules._base import HATMasked
from hat.payload import HATPayload
from hat.tracking.recording import RECORDER
from hat.tracking.tracked import TaskTracked, task_modules

_ACTIVE = RECORDER  # set while a recording forward runs; the layers read it through ``active()``


@dataclass(frozen=True, eq=False)
class _Units:
    """The units of a traced tensor. ``dims``: the dimensions they run along (in order; None:
    dense everywhere, ``reason`` says why). ``parts``: ``(source, index)`` pairs, ``index`` a
    LongTensor over the sizes of ``dims`` holding the source unit at each position (-1: none);
    source None marks dense positions."""

    dims: tuple[int, ...] | None
    parts: tuple[tuple[Any, torch.Tensor], ...] = ()
    reason: str = ""

    @property
    def dense(self) -> bool:
        return self.dims is None


def _dense(reason: str) -> _Units:
    return _Units(None, (), reason)


INPUT = _dense(_units.MODEL_INPUT)


def _layer_units(module: Any, ndim: int) -> _Units:
    n = module.task_embedding.shape[1]
    return _Units((module.mask_dim % ndim,), ((module, torch.arange(n)),))


# -- the recorder --------------------------------------------------------------------------------
class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.units: dict[int, tuple[torch.Tensor, _Units]] = {}  # id(tensor) -> (tensor, its units)
        self.uses: dict[int, int] = {}  # id(HAT output) -> ops outside HAT modules that read it
        self.readers: dict[int, list[nn.Module]] = {}  # id(HAT output) -> HAT modules that read it
        self.outputs: dict[nn.Module, list[torch.Tensor]] = {}  # masked layer -> its outputs
        self.inputs: dict[nn.Module, list[tuple[_Units, int]]] = {}  # HAT module -> (input units, input ndim)
        self.depth = 0
        self.weights: dict[int, nn.Module] = {}  # id(weight of a masked layer) -> the layer
        self.dense_norms: set[nn.Module] = set()  # norms found fed different units in different calls
        self.read_directly: dict[nn.Module, str] = {}  # masked layer -> the op that read its weight by hand
        self.output: Any = None  # what the recorded call returned

    def get(self, t: torch.Tensor) -> _Units | None:
        entry = self.units.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def put(self, t: torch.Tensor, units: _Units) -> None:
        self.units[id(t)] = (t, units)

    def call(self, module: nn.Module, x: Any, forward: Callable[[Any], Any], dense_input: str | None = None) -> Any:
        """Run a task-aware module's tensor forward, noting what its input carried and what its
        output carries (``module._hat_output_units``; ``dense_input``: why its input counts as
        dense whatever ``x`` carries)."""
        carried = self.get(x) if isinstance(x, torch.Tensor) else None
        if dense_input is not None:
            carried = _dense(dense_input)
        ndim = x.dim() if isinstance(x, torch.Tensor) else -1
        self.inputs.setdefault(module, []).append((carried or _dense("a tensor made outside the traced call"), ndim))
        if isinstance(x, torch.Tensor):
            self.readers.setdefault(id(x), []).append(module)
        self.depth += 1
        try:
            y = forward(x)
        finally:
            self.depth -= 1
        if isinstance(y, torch.Tensor):
            self.put(y, module._hat_output_units(self, carried, x, y))
            self.outputs.setdefault(module, []).append(y)
        return y

    # -- what task-aware modules ask of the recording (they hold the rules about themselves) ------
    def dense(self, reason: str) -> _Units:
        return _dense(reason)

    def layer_units(self, layer: nn.Module, ndim: int) -> _Units:
        """The units of a masked layer's output of ``ndim`` dimensions."""
        return _layer_units(layer, ndim)

    def norm_output(self, norm: nn.Module, carried: _Units | None, x: Any, y: torch.Tensor) -> _Units:
        """A norm's output carries its input's units where it masks it again with them."""
        if _masks_again(norm, carried, x, y, self.dense_norms):
            return carried
        return _dense("a norm that cannot mask its output again (fed units along another dimension, or different "
                      "units in different calls)")

    def input_map(self, units: _Units, ndim: int, dim: int | None, size: int, num_tasks: int) -> _units.UnitMap:
        return _unit_map(units, ndim, dim, size, num_tasks)

    def norm_map(self, norm: nn.Module, seen: list[tuple[_Units, int]]) -> _units.UnitMap | None:
        return None if norm in self.dense_norms else _norm_map(norm, seen)

    def put_layer_output(self, y: torch.Tensor, layer: nn.Module) -> None:
        """``y`` carries ``layer``'s units (a layer computed inside another one's forward)."""
        self.put(y, _layer_units(layer, y.dim()))

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth:
            return out
        flat_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        flat_out = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        name = getattr(func, "__name__", "")
        if flat_out and name != "__get__":  # data flows (not .dtype, .shape, .data of a weight)
            for a in flat_in:  # a masked layer's weight used outside its forward: its mask never applies
                owner = self.weights.get(id(a))
                if owner is not None and owner.weight is a:
                    self.read_directly.setdefault(owner, name or "an op")
        carried = [(a, self.get(a)) for a in flat_in]
        if not any(u is not None for _, u in carried):
            return out
        if not flat_out:
            return out  # metadata (.shape, .dim(), ...): no data flows
        for a, u in carried:
            if u is not None:
                self.uses[id(a)] = self.uses.get(id(a), 0) + 1
        rule = _RULES.get(name)
        try:
            got = rule(self, args, kwargs, out) if rule is not None else _dense(f"`{name}` is not followed")
        except Exception:  # noqa: BLE001 - an op we misread must only make its output dense
            got = _dense(f"`{name}` with these arguments is not followed")
        if isinstance(got, _Units):
            got = [got] + [_dense(f"`{name}`")] * (len(flat_out) - 1)
        for o, u in zip(flat_out, got):
            self.put(o, u)
        return out

    def of(self, a: Any) -> _Units:
        """The units of an argument: a traced tensor's, else dense (a parameter, a constant)."""
        if isinstance(a, torch.Tensor):
            got = self.get(a)
            if got is not None:
                return got
            return _dense("a tensor no mask reaches (a parameter, a buffer, a constant)")
        return _dense("a constant")


def _masks_again(norm: nn.Module, carried: _Units | None, x: Any, y: torch.Tensor, dense_norms: set) -> bool:
    """Whether a task-indexed norm's output carries its input's units: it masks its output again
    only with units along its own unit dimension, the same in every call."""
    if carried is None or not isinstance(x, torch.Tensor) or y.shape != x.shape or norm in dense_norms:
        return False
    if carried.dense:
        return True  # dense in, dense out
    return carried.dims == (norm._hat_unit_dim(x.dim()),)


# -- unit bookkeeping ----------------------------------------------------------------------------
def _sizes(t: torch.Tensor, dims: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(t.shape[d] for d in dims)


def _aligned(u: _Units, a: torch.Tensor, out: torch.Tensor) -> _Units | None:
    """``u`` (the units of ``a``) as units of ``out`` under broadcasting (dimensions aligned from
    the right); None where a unit dimension is broadcast or its size changes."""
    if u.dense:
        return u
    shift = out.dim() - a.dim()
    dims = tuple(d + shift for d in u.dims)
    if any(a.shape[d] != out.shape[d + shift] for d in u.dims):
        return None
    return _Units(dims, u.parts)


def _union(units: list[_Units]) -> _Units:
    """Positions zero only where they are zero in every operand (a sum)."""
    dense = next((u for u in units if u.dense), None)
    if dense is not None:
        return dense
    dims = units[0].dims
    if any(u.dims != dims for u in units):
        return _dense("units along different dimensions meet")
    parts = tuple(p for u in units for p in u.parts)
    return _Units(dims, parts)


def _with_index(u: _Units, fn: Callable[[torch.Tensor], torch.Tensor], dims: tuple[int, ...]) -> _Units:
    parts = tuple((s, fn(i)) for s, i in u.parts)
    parts = tuple((s, i) for s, i in parts if bool((i >= 0).any()))
    if not parts:
        return _dense("no unit left")  # a slice of positions no part reaches: zero for every task
    return _Units(dims, parts)


# -- rules: elementwise --------------------------------------------------------------------------
def _keep(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    a = args[0]
    u = rec.of(a)
    if u.dense:
        return u
    got = _aligned(u, a, out) if out.dim() == a.dim() else None
    return got if got is not None else _dense("an elementwise op changed the unit dimension's size")


def _moves_zero(name: str) -> Callable[..., _Units]:
    return lambda rec, args, kwargs, out: _dense(f"`{name}` does not keep 0 at 0")


def _add(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    operands = [a for a in (*args[:2], kwargs.get("other")) if a is not None]
    units = []
    for a in operands:
        if not isinstance(a, torch.Tensor) or rec.get(a) is None:
            return _dense("a tensor or number that no mask reaches is added")
        got = _aligned(rec.get(a), a, out)
        if got is None:
            return _dense("a sum broadcasts along the unit dimension")
        units.append(got)
    return _union(units)


def _mul(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    """A product is zero wherever one factor is: the masked factors' units (union: a position is
    counted as used unless every masked factor zeroes it), whatever the other factors are."""
    operands = [a for a in (*args[:2], kwargs.get("other")) if isinstance(a, torch.Tensor)]
    known = []
    for a in operands:
        u = rec.get(a)
        if u is None or u.dense:
            continue
        got = _aligned(u, a, out)
        if got is not None:
            known.append(got)
    if not known:
        return _dense("a product of tensors no mask reaches")
    return _union(known) if len({u.dims for u in known}) == 1 else known[0]


def _div(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    num, den = args[0], args[1] if len(args) > 1 else kwargs.get("other")
    if isinstance(den, torch.Tensor) and rec.get(den) is not None and not rec.get(den).dense:
        return _dense("a division by masked units (0 / 0)")
    if not isinstance(num, torch.Tensor) or rec.get(num) is None:
        return _dense("a number divided by masked units")
    u = _aligned(rec.get(num), num, out)
    return u if u is not None else _dense("a division broadcasts along the unit dimension")


# -- rules: structure ----------------------------------------------------------------------------
def _dim_arg(args: Any, kwargs: Any, pos: int, name: str, default: Any = None) -> Any:
    return args[pos] if len(args) > pos else kwargs.get(name, default)


def _groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[range, range]] | None:
    """Split two shapes of equal size into aligned runs of dimensions with equal products."""
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        si, sj = i, j
        pa = a[i] if i < len(a) else 1
        pb = b[j] if j < len(b) else 1
        i, j = min(i + 1, len(a)), min(j + 1, len(b))
        while pa != pb:
            if pa < pb and i < len(a):
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                pb *= b[j]
                j += 1
            else:
                return None
        # trailing size-1 dimensions join the run they follow
        while i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            i += 1
        while j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            j += 1
        out.append((range(si, i), range(sj, j)))
    return out


def _reshaped(u: _Units, shape: tuple[int, ...], new: tuple[int, ...]) -> _Units:
    if u.dense:
        return u
    groups = _groups(shape, new)
    if groups is None:
        return _dense("a reshape that hat cannot follow")
    dims: list[int] = []
    index_dims: list[tuple[int, ...]] = []
    rebuilt: list[list[torch.Tensor]] = [[] for _ in u.parts]
    for src, dst in groups:
        inside = [d for d in u.dims if d in src]
        if not inside:
            continue
        # the units over this run of dimensions, as a tensor of the run's shape
        run = [shape[d] for d in src]
        for k, (_, index) in enumerate(u.parts):
            view = index.permute(*[u.dims.index(d) for d in inside]) if len(inside) > 1 else index
            full = view.reshape([shape[d] if d in inside else 1 for d in src]).expand(run)
            rebuilt[k].append(full.reshape([new[d] for d in dst]))
        varying = [d for d in dst if any(_varies(t[-1], d - dst.start) for t in rebuilt)]
        dims.extend(varying)
        index_dims.append(tuple(d - dst.start for d in varying))
    if not dims:
        return _dense("a reshape left no unit dimension")
    if len(index_dims) > 1:  # units over two runs: an outer product of positions (rare)
        return _dense("units spread over two reshaped runs of dimensions")
    parts = tuple((source, _compress(runs[0], index_dims[0])) for (source, _), runs in zip(u.parts, rebuilt))
    return _Units(tuple(dims), parts)


def _varies(t: torch.Tensor, d: int) -> bool:
    return t.shape[d] > 1 and not bool((t == t.narrow(d, 0, 1)).all())


def _compress(t: torch.Tensor, keep: tuple[int, ...]) -> torch.Tensor:
    """``t`` with the dimensions it does not vary along removed."""
    for d in sorted(set(range(t.dim())) - set(keep), reverse=True):
        t = t.select(d, 0)
    return t.contiguous()


def _reshape(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    a = args[0]
    return _reshaped(rec.of(a), tuple(a.shape), tuple(out.shape))


def _permuted(u: _Units, order: list[int]) -> _Units:
    """Units after ``out = a.permute(order)``."""
    if u.dense:
        return u
    new_dims = [order.index(d) for d in u.dims]
    ranked = sorted(range(len(new_dims)), key=lambda k: new_dims[k])
    parts = tuple((s, i.permute(*ranked) if len(ranked) > 1 else i) for s, i in u.parts)
    return _Units(tuple(sorted(new_dims)), parts)


def _permute(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    a = args[0]
    order = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    order = list(order or kwargs.get("dims", ()))
    return _permuted(rec.of(a), [int(i) % a.dim() for i in order])


def _transpose(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    a = args[0]
    if a.dim() < 2:
        return rec.of(a)
    x = int(_dim_arg(args, kwargs, 1, "dim0", 0)) % a.dim()  # Tensor.t(): 0 and 1
    y = int(_dim_arg(args, kwargs, 2, "dim1", 1)) % a.dim()
    order = list(range(a.dim()))
    order[x], order[y] = order[y], order[x]
    return _permuted(rec.of(a), order)


def _movedim(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    a = args[0]
    src, dst = _dim_arg(args, kwargs, 1, "source"), _dim_arg(args, kwargs, 2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [int(s) % a.dim() for s in src]
    dst = [int(d) % a.dim() for d in dst]
    order = [None] * a.dim()
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(d for d in range(a.dim()) if d not in src)
    order = [o if o is not None else next(rest) for o in order]
    return _permuted(rec.of(a), order)


def _sliced(u: _Units, dim: int, start: int, stop: int, step: int = 1) -> _Units:
    """Units after keeping positions ``start:stop:step`` of ``dim``."""
    if u.dense or dim not in u.dims:
        return u
    k = u.dims.index(dim)
    return _with_index(u, lambda i: i[(slice(None),) * k + (slice(start, stop, step),)], u.dims)


def _selected(u: _Units, dim: int, i: int) -> _Units:
    """Units after ``select(dim, i)`` (the dimension goes)."""
    if u.dense:
        return u
    dims = tuple(d - (d > dim) for d in u.dims if d != dim)
    if dim not in u.dims:
        return _Units(dims, u.parts)
    if not dims:
        return _dense("a single unit is selected")
    k = u.dims.index(dim)
    return _with_index(u, lambda t: t.select(k, i), dims)


def _getitem(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    """Basic indexing: ints select, slices slice, None adds a dimension, one Ellipsis."""
    a, key = args[0], args[1]
    u = rec.of(a)
    if u.dense:
        return u
    key = key if isinstance(key, tuple) else (key,)
    if any(isinstance(k, (torch.Tensor, list, bool)) for k in key) or sum(k is Ellipsis for k in key) > 1:
        return _dense("indexing with a tensor, a list or two ellipses")
    explicit = sum(1 for k in key if k is not None and k is not Ellipsis)
    items: list[Any] = []
    for k in key:
        items.extend([slice(None)] * (a.dim() - explicit) if k is Ellipsis else [k])
    src = cur = 0  # the dimension of ``a`` the next key applies to, and where it is in the result
    for k in items:
        if k is None:
            u = _Units(tuple(d + (d >= cur) for d in u.dims), u.parts)
            cur += 1
        elif isinstance(k, int):
            u = _selected(u, cur, k % a.shape[src])
            src += 1
        elif isinstance(k, slice):
            u = _sliced(u, cur, *k.indices(a.shape[src]))
            src += 1
            cur += 1
        else:
            return _dense("indexing that hat cannot follow")
        if u.dense:
            return u
    return u


def _narrow(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    a = args[0]
    dim, start, length = (int(_dim_arg(args, kwargs, i, n)) for i, n in ((1, "dim"), (2, "start"), (3, "length")))
    return _sliced(rec.of(a), dim % a.dim(), start, start + length)


def _select(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    a = args[0]
    dim = int(_dim_arg(args, kwargs, 1, "dim")) % a.dim()
    return _selected(rec.of(a), dim, int(_dim_arg(args, kwargs, 2, "index")) % a.shape[dim])


def _pieces(rec: _Recorder, args: Any, kwargs: Any, out: Any) -> list[_Units]:
    """split, chunk, tensor_split: the units of each piece along ``dim``."""
    a = args[0]
    dim = int(_dim_arg(args, kwargs, 2, "dim", 0)) % a.dim()
    u = rec.of(a)
    got, start = [], 0
    for piece in (o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)):
        got.append(_sliced(u, dim, start, start + piece.shape[dim]))
        start += piece.shape[dim]
    return got


def _unbind(rec: _Recorder, args: Any, kwargs: Any, out: Any) -> list[_Units]:
    a = args[0]
    dim = int(_dim_arg(args, kwargs, 1, "dim", 0)) % a.dim()
    return [_selected(rec.of(a), dim, i) for i in range(a.shape[dim])]


def _cat(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    tensors = [t for t in _dim_arg(args, kwargs, 0, "tensors") if isinstance(t, torch.Tensor) and t.numel() > 0]
    dim = int(_dim_arg(args, kwargs, 1, "dim", 0)) % out.dim()
    units = [rec.of(t) for t in tensors]
    masked = [u for u in units if not u.dense]
    if not masked:
        return units[0]
    dims = masked[0].dims
    if any(u.dims != dims for u in masked):
        return _dense("tensors with units along different dimensions are concatenated")
    if dim not in dims:  # along another dimension: every piece must carry the same units
        if any(u.dense for u in units):
            return next(u for u in units if u.dense)
        first = units[0]
        if all(len(u.parts) == len(first.parts) and all(a[0] is b[0] and torch.equal(a[1], b[1])
                                                        for a, b in zip(u.parts, first.parts)) for u in units):
            return first
        return _dense("tensors with different units are concatenated along another dimension")
    k = dims.index(dim)
    parts: list[tuple[Any, torch.Tensor]] = []
    offset, total = 0, out.shape[dim]
    shape = list(_sizes(out, dims))
    for t, u in zip(tensors, units):
        size = t.shape[dim]
        if u.dense:  # a piece no mask reaches: dense positions
            index = torch.full(shape, -1, dtype=torch.long)
            index.narrow(k, offset, size).fill_(0)
            parts.append((None, index))
        else:
            for source, i in u.parts:
                index = torch.full(shape, -1, dtype=torch.long)
                index.narrow(k, offset, size).copy_(i)
                parts.append((source, index))
        offset += size
    assert offset == total
    return _Units(dims, tuple(parts))


def _stack(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    tensors = list(_dim_arg(args, kwargs, 0, "tensors"))
    dim = int(_dim_arg(args, kwargs, 1, "dim", 0)) % out.dim()
    units = [rec.of(t) for t in tensors]
    first = units[0]
    if first.dense or any(u is not first and (u.dense or len(u.parts) != len(first.parts) or any(
            a[0] is not b[0] or not torch.equal(a[1], b[1]) for a, b in zip(u.parts, first.parts))) for u in units):
        return _dense("tensors with different units are stacked")
    return _Units(tuple(d + (d >= dim) for d in first.dims), first.parts)


def _expand(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    a = args[0]
    u = rec.of(a)
    got = _aligned(u, a, out)
    return got if got is not None else _dense("an expand along the unit dimension")


def _reduce(rec: _Recorder, args: Any, kwargs: Any, out: Any) -> _Units:
    a = args[0]
    u = rec.of(a)
    if u.dense:
        return u
    dims = _dim_arg(args, kwargs, 1, "dim")
    if dims is None or isinstance(dims, torch.Tensor):
        return _dense("a reduction over every dimension")
    dims = [int(i) % a.dim() for i in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if any(d in u.dims for d in dims):
        return _dense("a reduction over the unit dimension")
    keep = bool(_dim_arg(args, kwargs, 2, "keepdim", False))
    if keep:
        return u
    return _Units(tuple(d - sum(1 for i in dims if i < d) for d in u.dims), u.parts)


def _matmul(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    """``a @ b`` is zero in every column where ``b`` is: ``b``'s units along its last dimension
    (and batch dimensions) carry over; units along the contracted dimension do not."""
    b = args[1]
    ub = rec.of(b)
    if ub.dense or b.dim() < 2:
        return _dense("a product with a tensor no mask reaches")
    if (b.dim() - 2) in ub.dims:
        return _dense("a product over the unit dimension")
    got = _aligned(ub, b, out)
    return got if got is not None else _dense("a product that broadcasts the unit dimension")


def _attention(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    """Scaled dot-product attention: each output is a weighted sum of rows of ``v``."""
    v = _dim_arg(args, kwargs, 2, "value")
    uv = rec.of(v)
    if uv.dense or (v.dim() - 2) in uv.dims:
        return _dense("attention over values no mask reaches")
    got = _aligned(uv, v, out)
    return got if got is not None else _dense("attention that changes the value dimension")


def _pad(rec: _Recorder, args: Any, kwargs: Any, out: torch.Tensor) -> _Units:
    """Zero padding (or reflection, replication) keeps a zero unit zero; padding with another value,
    or along the unit dimension, does not."""
    value = _dim_arg(args, kwargs, 3, "value", None)
    if value not in (None, 0, 0.0):
        return _dense("padding with a value other than 0")
    return _keep(rec, args, kwargs, out)


def _rule_table() -> dict[str, Callable[..., Any]]:
    table: dict[str, Callable[..., Any]] = {}
    keep = (
        "relu", "relu_", "relu6", "gelu", "silu", "silu_", "hardswish", "hardswish_", "leaky_relu", "leaky_relu_",
        "elu", "elu_", "selu", "celu", "mish", "hardtanh", "hardtanh_", "tanh", "tanh_", "softsign", "dropout",
        "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
        "feature_alpha_dropout", "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
        "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d",
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
        "adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_max_pool1d_with_indices",
        "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices", "contiguous", "clone", "to",
        "float", "half", "double", "bfloat16", "type_as", "detach", "neg", "__neg__", "__pos__", "abs",
        "square", "sqrt", "sign", "hardshrink", "softshrink", "tanhshrink", "prelu",
    )
    table.update(dict.fromkeys(keep, _keep))
    for name in ("sigmoid", "sigmoid_", "softplus", "exp", "exp_", "hardsigmoid", "logsigmoid", "log_softmax",
                 "softmax", "cos", "cosh", "reciprocal", "rsqrt", "log"):
        table[name] = _moves_zero(name)
    table.update(dict.fromkeys(("add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__",
                                "__rsub__", "__isub__"), _add))
    table.update(dict.fromkeys(("mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply"), _mul))
    table.update(dict.fromkeys(("div", "div_", "__truediv__", "__itruediv__", "true_divide"), _div))
    table.update(dict.fromkeys(("view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "squeeze",
                                "unsqueeze", "squeeze_", "unsqueeze_"), _reshape))
    table.update(dict.fromkeys(("permute",), _permute))
    table.update(dict.fromkeys(("transpose", "transpose_", "swapaxes", "swapdims", "t"), _transpose))
    table.update(dict.fromkeys(("movedim", "moveaxis"), _movedim))
    table.update({"__getitem__": _getitem, "narrow": _narrow, "select": _select, "unbind": _unbind})
    table.update(dict.fromkeys(("split", "split_with_sizes", "chunk", "tensor_split"), _pieces))
    table.update(dict.fromkeys(("cat", "concat", "concatenate"), _cat))
    table["stack"] = _stack
    table.update(dict.fromkeys(("expand", "expand_as", "broadcast_to"), _expand))
    table.update(dict.fromkeys(("mean", "sum", "amax", "amin", "max", "min", "nanmean", "nansum", "std", "var",
                                "norm"), _reduce))
    table.update(dict.fromkeys(("matmul", "__matmul__", "bmm"), _matmul))
    table["scaled_dot_product_attention"] = _attention
    table["pad"] = _pad
    return table


_RULES = _rule_table()


# -- running the record ------------------------------------------------------------------------
def maybe_trace(root: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Trace ``root`` once, at its first call (a forward pre-hook installed by hat.convert and
    hat.set_task). Under torch.compile this runs eagerly: a graph break at the very start.
    Returns whether it traced now."""
    if root.__dict__.get("_hat_traced") or _ACTIVE.get() is not None:
        return False
    root.__dict__["_hat_traced"] = True
    return _trace(root, args, kwargs)


def _trace(root: nn.Module, args: tuple, kwargs: dict) -> bool:
    modules = task_modules(root)
    if not modules or any("_hat_link_key" in m.__dict__ for m in modules):
        return False  # payload models record their links themselves
    if any(m.__dict__.get("_hat_trained_here") for m in modules):
        return False  # trained untraced (through another method than forward): that placement is what trained
    # a fresh model that loaded trained tasks is traced as the model that trained them was
    dense_norms: set[nn.Module] = set()
    while True:  # a norm fed different units in different calls does not mask again: record once more
        rec = _record(root, args, kwargs, modules, dense_norms)
        if any("_hat_link_key" in m.__dict__ for m in modules):
            return False  # the layers took payloads and recorded their links themselves: a payload model
        # norms whose outputs were given their input's units but that will not mask with them
        unmasked = {m for m, seen in rec.inputs.items() if m._hat_trace_unmasked(rec, seen)}
        if not unmasked:
            break
        dense_norms |= unmasked
    _apply_record(rec, root)
    return True


def _norm_map(m: Any, seen: list[tuple[_Units, int]]) -> _units.UnitMap | None:
    """The units a task-indexed norm masks its output with: its input's along its unit dimension,
    the same in every call and reached by some mask; None where there are none such."""
    maps = [_unit_map(u, ndim, m._hat_unit_dim(ndim) if ndim > 0 else None, m.num_units, m.num_tasks)
            for u, ndim in seen]
    first = maps[0]
    if first.sources and all(other.same_as(first) for other in maps[1:]):
        return first
    return None


@contextlib.contextmanager
def evaluating(root: nn.Module) -> Iterator[None]:
    """``root`` and every module in it in evaluation mode inside; each module's own mode restored
    after (on error too), also where a model mixes modes."""
    flags = [(m, m.training) for m in root.modules()]
    root.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _record(root: nn.Module, args: tuple, kwargs: dict, modules: list, dense_norms: set,
            rec: _Recorder | None = None) -> _Recorder:
    """One recording forward (evaluation mode, no grad) by ``rec`` (default: a new ``_Recorder``);
    the model's output is left in ``rec.output``."""
    rec = _Recorder() if rec is None else rec
    rec.dense_norms = dense_norms
    rec.weights = {id(m.weight): m for m in modules if isinstance(m, HATMasked) and isinstance(
        getattr(m, "weight", None), torch.Tensor)}
    token = _ACTIVE.set(rec)
    try:
        with evaluating(root), torch.no_grad(), rec:
            for a in tree_flatten((args, kwargs))[0]:
                if isinstance(a, HATPayload):  # a model taking payloads at its root (hat.timm_models)
                    a = a._raw
                if isinstance(a, torch.Tensor):
                    rec.put(a, INPUT)
            rec.output = root(*args, **kwargs)
    finally:
        _ACTIVE.reset(token)
    return rec


def _unit_map(u: _Units, ndim: int, dim: int | None, size: int, num_tasks: int) -> _units.UnitMap:
    """The units of an input along ``dim`` as a ``UnitMap`` of ``size`` positions."""
    if dim is None:
        return _units.dense(size, "the units do not run along a single dimension here")
    if u.dense:
        return _units.dense(size, u.reason)
    if u.dims != (dim,):
        return _units.dense(size, "the units run along another dimension than this layer reads")
    parts = []
    for source, index in u.parts:
        if index.shape != (size,):
            return _units.dense(size, "the units do not line up with this layer's input")
        if source is not None and source.num_tasks != num_tasks:
            return _units.dense(size, "the units come from a layer with another number of tasks")
        whole = source is not None and source.task_embedding.shape[1] == size and torch.equal(index, torch.arange(size))
        parts.append(_units.Part(source, None if whole else index))
    return _units.UnitMap(size, tuple(parts))


def _apply_record(rec: _Recorder, root: nn.Module) -> None:
    for m, op in rec.read_directly.items():
        m.__dict__["_hat_read_directly"] = op
    for m in root.modules():
        seen = rec.inputs.get(m)
        if seen and isinstance(m, TaskTracked):
            m._hat_apply_trace(rec, seen)  # a layer learns its input units, a norm the mask it applies again
    # a layer read by nothing but one task-indexed BatchNorm leaves its mask to that norm
    for m, outs in rec.outputs.items():
        if not m._hat_can_defer or len(outs) != 1:
            continue
        readers = rec.readers.get(id(outs[0]), [])
        if rec.uses.get(id(outs[0]), 0) == 0 and len(readers) == 1 and readers[0]._hat_applies_mask_of(m):
            m._hat_defer = True
