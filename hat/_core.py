"""The mask core and the per-module bookkeeping shared by every task-aware module.

Two mixins:

- ``TaskTracked``: which tasks a module has been trained on (``hat_trained``, a persistent
  buffer), which tasks were forwarded in training since the last backward, and which tasks a
  backward has seen since the last optimizer step. Gradient hooks are registered once per
  parameter; ``hat._protect`` reads the same state in its global optimizer step hooks.
- ``HATMasked``: a ``[num_tasks, units]`` task embedding, the mask ``gate(s * e[t])`` (hard:
  ``e[t] > 0``) and HAT's gradient conditioning ``1 - min(a_out, a_in)`` on binary cumulative
  masks of the protected tasks.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, ClassVar

import torch
from torch import nn

from hat import _units
from hat._checks import check_task_id
from hat._selection import PerSample, check_selection, is_per_sample
from hat.config import HATConfig
from hat.errors import HATTypeError, HATValueError
from hat.payload import UNKNOWN, HATPayload

__all__ = ["HATMasked", "TaskTracked", "live_modules", "plain_children", "shallow_clone", "task_modules"]

# Every task-aware module alive in the process; the optimizer hooks look here for the owners
# of an optimizer's parameters (a hand-built model is never registered anywhere else).
_LIVE: weakref.WeakSet[TaskTracked] = weakref.WeakSet()


_FLUSH = 1e-6
# Bumped whenever what a step protects may change other than by training a task: embeddings
# changed outside an optimizer step (load, re-init), parameters moved or cast, a layer's input
# link found. Caches of protected entries and of whole step plans are keyed by it.
_MASK_GENERATION = [0]


def _invalidate_masks() -> None:
    _MASK_GENERATION[0] += 1


# called whenever a task-aware module is made (hat._protect installs its step hooks here)
_ON_NEW_MODULE: list[Any] = []


def on_first_module(callback: Any) -> None:
    """Call ``callback()`` when a task-aware module is made (callbacks are idempotent)."""
    _ON_NEW_MODULE.append(callback)
    if _LIVE:
        callback()


def _live(module: TaskTracked) -> None:
    _LIVE.add(module)
    for callback in _ON_NEW_MODULE:
        callback()


def live_modules() -> list[TaskTracked]:
    return list(_LIVE)


def task_modules(model: nn.Module) -> list[TaskTracked]:
    """The task-aware modules of ``model`` (itself included), in ``model.modules()`` order."""
    return [m for m in model.modules() if isinstance(m, TaskTracked)]


_FED_FROM_MANY = "fed from different layers in different calls"


def _check_config(hat_config: Any) -> HATConfig:
    if not isinstance(hat_config, HATConfig):
        raise HATTypeError(f"hat_config must be a hat.HATConfig; got {type(hat_config).__name__}")
    return hat_config


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` (HAT's embedding compensation)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (factor,) = ctx.saved_tensors
        return grad * factor, None


def _row(param: torch.Tensor, slot: Any) -> torch.Tensor:
    """Row ``slot`` of a task-indexed tensor; ``slot`` an int or a 0-d tensor (torch.compile)."""
    if isinstance(slot, torch.Tensor):
        return param.index_select(0, slot.view(1)).squeeze(0)
    return param[slot]


def _flush(mask: torch.Tensor) -> torch.Tensor:
    """Switch units whose soft mask is below _FLUSH fully off. Masks around 1e-30 otherwise make
    subnormal activations downstream, and every op on those runs several times slower on CPUs."""
    return torch.threshold(mask, _FLUSH, 0.0)  # one op: values <= _FLUSH become 0


class _CompensatedSigmoid(torch.autograd.Function):
    """``sigmoid(s * e)`` (flushed) with HAT's compensated embedding gradient, in one node.

    Backward is ``s * sigmoid'(s e)`` times the paper's compensation
    ``s_max * (cosh(clamp(s e)) + 1) / (s * (cosh(e) + 1))``, with ``sigmoid'`` taken as
    ``m (1 - m)`` from the forward's ``m`` exactly as autograd would (so a unit saturated on gets
    no gradient, as in the reference implementation). Units flushed to 0 in the forward pass
    keep their gradient (straight-through).
    """

    @staticmethod
    def forward(ctx: Any, e: torch.Tensor, scale: torch.Tensor, factor: float, clamp: float) -> torch.Tensor:
        # used where the scale is a 0-d tensor (compiled forwards); eager ones use _GroupMask
        z = scale * e
        mask = torch.sigmoid(z)
        ctx.save_for_backward(e, z, mask)
        ctx.factor, ctx.clamp = factor, clamp
        return _flush(mask)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        e, z, mask = ctx.saved_tensors
        return _compensated(grad, e, z, mask, ctx.factor, ctx.clamp), None, None, None


def _compensated(grad: torch.Tensor, e: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, factor: float,
                 clamp: float) -> torch.Tensor:
    """The embedding gradient of ``mask = sigmoid(z)``, ``z = scale * e``, with HAT's compensation
    (see _CompensatedSigmoid), from the forward's ``z`` and ``mask``: few small ops, since on a CPU
    each costs more in dispatch than in arithmetic at mask sizes."""
    num = torch.cosh(z.clamp(-clamp, clamp)).add_(1)
    den = torch.cosh(e).add_(1)
    # sigmoid's own backward: grad * m * (1 - m), m from the forward as autograd would take it
    return torch.ops.aten.sigmoid_backward(grad, mask).mul_(num).div_(den).mul_(factor)


class _GroupMask(torch.autograd.Function):
    """The soft masks of one or several layers (one row ``e_i = E_i[t]`` each, one config) in one
    autograd node: ``flush(sigmoid(s * e_i))`` forward; backward HAT's compensated gradient for
    each row whose mask got a gradient, and the one-hot at ``t`` for that layer's probe (probes
    are optional: none, or one per row). The rows are selected outside, by torch's own select,
    whose backward writes them into each ``E``'s gradient without Python.

    Its tensors are kept as attributes, not saved tensors, so that the node may run backward
    more than once: the masks are reused by every forward until an embedding changes (gradient
    accumulation, checkpointed segments recomputed inside a backward)."""

    @staticmethod
    def forward(ctx: Any, task: int, scale: float, factor: float, clamp: float, n: int,
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows, probes = tensors[:n], tensors[n:]
        e = torch.cat(rows) if n > 1 else rows[0]
        z = e * scale
        mask = torch.sigmoid(z)
        ctx.e, ctx.z, ctx.mask = e, z, mask
        ctx.sizes = [r.shape[0] for r in rows]
        ctx.task, ctx.factor, ctx.clamp = task, factor, clamp
        ctx.probes = [(p.shape[0], p.dtype) for p in probes]
        ctx.set_materialize_grads(False)  # a layer not used by this forward gets no gradient at all
        flushed = _flush(mask)
        return tuple(flushed.split(ctx.sizes)) if n > 1 else (flushed,)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        used = [g is not None for g in grads]
        if not any(used):
            return (None,) * (5 + len(grads) + len(ctx.probes))
        e = ctx.e
        if len(grads) > 1:
            grad = torch.cat([g if g is not None else e.new_zeros(size) for g, size in zip(grads, ctx.sizes)])
        else:
            grad = grads[0]
        rows = _compensated(grad, e, ctx.z, ctx.mask, ctx.factor, ctx.clamp)
        split = rows.split(ctx.sizes) if len(grads) > 1 else (rows,)
        row_grads = [r if u else None for r, u in zip(split, used)]
        # [] without probes
        hots = [_one_hot(n, ctx.task, dtype, grad.device) if u else None for (n, dtype), u in zip(ctx.probes, used)]
        return (None,) * 5 + tuple(row_grads) + tuple(hots)


class _Entry:
    """The masks of one (task, scale) of a group, with what they were computed from."""

    __slots__ = ("deviation", "embeddings", "index", "masks", "served", "stamps")

    def __init__(self, chosen: list[HATMasked], masks: tuple[torch.Tensor, ...]) -> None:
        self.index = {id(m): i for i, m in enumerate(chosen)}  # position by id(module)
        self.embeddings = [m.task_embedding for m in chosen]
        self.stamps = [(e._version, e.data_ptr()) for e in self.embeddings]
        self.masks = masks
        self.served: set[int] = set()  # positions whose layer took its mask in a forward
        self.deviation: float | None = None

    def excess_deviation(self, task: int, scale: float, s_max: float) -> float:
        """How much further these soft masks are from the hard ones than the masks at ``s_max``
        (the end of every documented scale schedule) would be: the mean over every unit of every
        layer of ``|mask - hard mask|`` (for the sigmoid ``min(m, 1 - m)``) at ``scale``, minus
        the same at ``max(scale, s_max)``. A unit whose embedding is near 0 is undecided at every
        scale; it does not count against a batch. Computed once per entry: one device read per
        training step."""
        if self.deviation is None:
            with torch.no_grad():
                m = torch.cat(self.masks) if len(self.masks) > 1 else self.masks[0]
                e = (torch.cat([emb[task] for emb in self.embeddings]) if len(self.embeddings) > 1
                     else self.embeddings[0][task])
                ref = _flush(torch.sigmoid(e * max(scale, s_max)))
                self.deviation = float(torch.minimum(m, 1 - m).mean() - torch.minimum(ref, 1 - ref).mean())
        return self.deviation

    def get(self, module: HATMasked) -> int | None:
        """The position of ``module``'s mask, while its embedding is the one the mask came from:
        one changed in place (a step, a load) or replaced makes the entry stale."""
        i = self.index.get(id(module))
        emb = module.task_embedding
        if i is None or self.embeddings[i] is not emb or self.stamps[i] != (emb._version, emb.data_ptr()):
            return None
        return i


class _MaskGroup:
    """The HAT layers built with one HATConfig object (those that asked for a mask), whose soft
    masks for a (task, scale) are computed together in one ``_GroupMask`` node and reused until
    an embedding changes: one node and a few ops per forward instead of a dozen per layer, which
    on a CPU cost more in dispatch than in arithmetic."""

    __slots__ = ("entries", "members")

    def __init__(self) -> None:
        self.members: list[weakref.ref] = []
        self.entries: dict[tuple[Any, ...], _Entry] = {}  # by (task, scale, dtype, device)

    def mask(self, module: HATMasked, task: int, scale: float) -> torch.Tensor:
        emb = module.task_embedding
        key = (task, scale, emb.dtype, emb.device)
        entry = self.entries.get(key)
        i = None if entry is None else entry.get(module)
        if entry is None or i is None:
            entry = self._compute(module, key)
            i = entry.index[id(module)]
        entry.served.add(i)
        return entry.masks[i]

    def served(self, layers: list[HATMasked], task: int, scale: float) -> list[torch.Tensor] | None:
        """The masks that ``layers`` took in a forward from one current entry (so that their
        probes report the task already); None where any did not."""
        emb = layers[0].task_embedding
        entry = self.entries.get((task, scale, emb.dtype, emb.device))
        if entry is None:
            return None
        out = []
        for m in layers:
            i = entry.get(m)
            if i is None or i not in entry.served:
                return None
            out.append(entry.masks[i])
        return out

    def deviation(self, task: int, scale: float, s_max: float) -> float | None:
        """``excess_deviation`` of the latest masks computed for ``(task, scale)``, None if none were."""
        for key in reversed(self.entries):
            if key[0] == task and key[1] == scale:
                return self.entries[key].excess_deviation(task, scale, s_max)
        return None

    def _compute(self, module: HATMasked, key: tuple[Any, ...]) -> _Entry:
        task, scale, dtype, device = key
        cfg = module.hat_config
        refs = [r for r in self.members if r() is not None]
        if not any(r() is module for r in refs):
            entries = self.entries  # a layer that dies takes the cached graph (and its embedding) along
            refs.append(weakref.ref(module, lambda _r: entries.clear()))
        self.members = refs
        live = [m for m in (r() for r in refs) if m is not None]
        chosen = [m for m in live if m.hat_config is cfg and task < m.num_tasks and m.task_embedding.requires_grad
                  and m.task_embedding.dtype == dtype and m.task_embedding.device == device]
        masks = _GroupMask.apply(task, scale, cfg.grad_comp_factor, cfg.grad_comp_clamp, len(chosen),
                                 *[m.task_embedding[task] for m in chosen], *[m._hat_probe for m in chosen])
        if len(self.entries) >= 8:
            self.entries.clear()
        entry = self.entries[key] = _Entry(chosen, masks)
        return entry


# id(HATConfig) -> (weakref to it, its layers' mask group); configs are mutable, so not hashable
_GROUPS: dict[int, tuple[weakref.ref, _MaskGroup]] = {}


def _group_of(cfg: HATConfig) -> _MaskGroup:
    key = id(cfg)
    got = _GROUPS.get(key)
    if got is None or got[0]() is not cfg:
        got = _GROUPS[key] = (weakref.ref(cfg, lambda _r, _k=key: _GROUPS.pop(_k, None)), _MaskGroup())
    return got[1]


def forward_deviation(cfg: HATConfig, task: int, scale: float) -> float | None:
    """How much further from the hard masks than at ``cfg.max_trn_mask_scale`` are the soft masks
    that the HAT layers built with ``cfg`` took for ``(task, scale)`` in the forward under way (see
    ``_Entry.excess_deviation``); None where none of them has computed a mask for it (eager mode
    with the sigmoid gate computes them)."""
    got = _GROUPS.get(id(cfg))
    if got is None or got[0]() is not cfg:
        return None
    return got[1].deviation(task, scale, cfg.max_trn_mask_scale)


def _one_hot(n: int, slot: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached one-hot, never written to: autograd copies a gradient that something else still
    references instead of adopting it, and the probe's hook drops each gradient it reads."""
    key = (n, slot, dtype, device)
    hot = _ONE_HOTS.get(key)
    if hot is None:
        hot = torch.zeros(n, dtype=dtype, device=device)
        hot[slot] = 1
        _ONE_HOTS[key] = hot
    return hot


_ONE_HOTS: dict[tuple[Any, ...], torch.Tensor] = {}


class _Probe(torch.autograd.Function):
    """Identity on ``x``; its backward gives ``probe`` a one-hot gradient at ``slot``.

    One such node per module forward that builds a graph: when a backward reaches it, the
    probe's gradient says exactly which task slots that backward trained through the module,
    in eager mode and inside torch.compile graphs alike (the slot may be a 0-d tensor there).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, probe: torch.Tensor, slot: Any) -> torch.Tensor:
        ctx.n, ctx.dtype = probe.shape[0], probe.dtype
        if isinstance(slot, torch.Tensor):
            ctx.save_for_backward(slot)
            ctx.slot = None
        else:
            ctx.slot = slot
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        if ctx.slot is None:  # a 0-d slot (compiled code) or per-sample ids: every task present
            (slot,) = ctx.saved_tensors
            hot = torch.zeros(ctx.n, dtype=ctx.dtype, device=grad.device).index_fill_(0, slot.view(-1), 1)
        else:
            hot = _one_hot(ctx.n, ctx.slot, ctx.dtype, grad.device)
        return grad, hot, None


def rows(module: Any, slot: Any, *params: torch.Tensor | None, mark: bool = True) -> tuple[Any, ...]:
    """The rows ``slot`` of task-indexed ``params`` (None stays None), reporting ``slot`` to the
    module's probe when grad is on (through the first row: every task-indexed layer uses it).
    ``mark=False``: a mask used in the same forward reports the slot already. Which tasks a step
    trains is collected over all modules of the optimizer, so one report per forward suffices."""
    got = [_row(p, slot) for p in params if p is not None]  # torch's select: no Python in its backward
    if mark and got:
        got[0] = module._hat_mark(got[0], slot)
    it = iter(got)
    return tuple(None if p is None else next(it) for p in params)


def _on_probe(ref: weakref.ref, probe: torch.Tensor) -> None:
    module = ref()
    if module is not None:
        # the latest backward's slots; read (one sync for all modules) at the next step
        module._hat_step.latest = probe.grad
    probe.grad = None


def plain_children(module: nn.Module, task_id: int | None) -> None:
    """Replace ``module``'s task-aware children by their plain modules for ``task_id`` (a walk that
    replaced ``module`` does not reach them; under ``hat.unconvert`` they are plain already)."""
    for name, child in list(module._modules.items()):
        if isinstance(child, TaskTracked):
            module._modules[name] = child.to_base_module(task_id=task_id)


def shallow_clone(module: nn.Module, cls: type | None = None) -> nn.Module:
    """A new module object (of class ``cls``, default ``module``'s) sharing ``module``'s Parameters,
    buffers, children and attributes, with dictionaries and sets of its own: registering on one
    leaves the other as it is."""
    new = object.__new__(cls or type(module))
    new.__dict__ = {k: (v.copy() if isinstance(v, (dict, set)) else v) for k, v in module.__dict__.items()}
    return new


class TaskTracked:
    """Bookkeeping for a module whose parameters belong to tasks.

    Slots: tasks are ``0 .. num_tasks-1``; slot ``num_tasks`` is "no task" (``task_id=None``).
    """

    num_tasks: int
    # Parameters whose first dimension indexes task slots: only rows being trained may change.
    _hat_row_params: ClassVar[tuple[str, ...]] = ()
    # Parameters protected unit by unit (HAT's weight conditioning).
    _hat_unit_params: ClassVar[tuple[str, ...]] = ()
    _hat_takes_payload: ClassVar[bool] = True

    def _hat_init_tracking(self, num_tasks: int, device: Any = None) -> None:
        self.num_tasks = num_tasks
        # the only bookkeeping that must outlive a step: it travels with the state_dict
        self.register_buffer("hat_trained", torch.zeros(num_tasks, dtype=torch.bool, device=device))
        # the task selected by hat.set_task, as 0-d tensors that forwards read (torch.compile does
        # not recompile when they change); slot num_tasks is "no task", scale 0 the hard mask
        self.register_buffer("hat_task", torch.tensor(num_tasks, device=device), persistent=False)
        self.register_buffer("hat_scale", torch.tensor(0.0, device=device), persistent=False)
        self.__dict__["_hat_state"] = (None, None)  # the same selection as Python values, for eager forwards
        self.__dict__["_hat_step"] = _StepState()
        _live(self)
        self._hat_ensure_hooks()

    # -- the first-call trace (hat._trace asks; each class holds the rules about itself) ---------
    # may leave its output mask to the task-indexed BatchNorm that alone reads its output
    _hat_can_defer: ClassVar[bool] = False

    def _hat_output_units(self, rec: Any, carried: Any, x: Any, y: torch.Tensor) -> Any:
        """What this module's output carries, recorded by the trace ``rec`` (default: dense)."""
        return rec.dense(f"the outputs of {type(self).__name__}")

    def _hat_apply_trace(self, rec: Any, seen: list[tuple[Any, int]]) -> None:
        """Learn from the units each call's input carried (``seen``: (units, ndim) per call)."""

    def _hat_trace_unmasked(self, rec: Any, seen: list[tuple[Any, int]]) -> bool:
        """Whether the trace gave this module's output its input's units though it will not mask
        with them (the trace then records again with its output dense)."""
        return False

    def _hat_applies_mask_of(self, layer: Any) -> bool:
        """Whether this module applies ``layer``'s mask (so that ``layer`` may leave it to it)."""
        return False

    # -- the probe: one leaf tensor per module, its hook registered once ---------------------
    def _hat_ensure_hooks(self) -> None:
        probe = self.__dict__.get("_hat_probe")
        device = self.hat_trained.device
        if probe is None or probe.device != device or probe.shape[0] != self.num_tasks + 1:
            probe = torch.zeros(self.num_tasks + 1, device=device, requires_grad=True)
            probe.register_post_accumulate_grad_hook(functools.partial(_on_probe, weakref.ref(self)))
            self.__dict__["_hat_probe"] = probe

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        self._hat_ensure_hooks()  # a move to another device needs a probe there
        _invalidate_masks()  # parameters may have a new dtype or device: masks and step plans too
        return out

    def _hat_mark(self, x: torch.Tensor, slot: Any) -> torch.Tensor:
        """Pass ``x`` through this module's probe so that a backward reports ``slot``."""
        if torch.is_grad_enabled():
            return _Probe.apply(x, self._hat_probe, slot)
        return x

    def _hat_plain_copy(self, task_id: int | None) -> nn.Module:
        """A shallow copy of class ``self._hat_base`` (the class before conversion) without HAT's
        embedding, buffers and attributes (its parameters are still this module's), and its HAT
        children made plain for ``task_id``."""
        plain = shallow_clone(self, self._hat_base)
        plain_children(plain, task_id)
        plain._parameters.pop("task_embedding", None)
        for name in ("hat_trained", "hat_task", "hat_scale"):
            plain._buffers.pop(name, None)
            plain._non_persistent_buffers_set.discard(name)
        for key in [k for k in plain.__dict__ if k.startswith("_hat_") or k in ("hat_config", "num_tasks")]:
            del plain.__dict__[key]
        return plain

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # the probe's hook holds a weakref (does not pickle): probe and step state are made anew
        state.pop("_hat_probe", None)
        state.pop("_hat_step", None)
        state.pop("_hat_mask_cache", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self.__dict__["_hat_step"] = _StepState()
        _live(self)
        self._hat_ensure_hooks()

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "hat_trained")
        if isinstance(saved, torch.Tensor) and saved.dim() == 1 and saved.shape[0] != self.num_tasks:
            raise HATValueError(
                f"the checkpoint's {prefix}hat_trained is for num_tasks={saved.shape[0]}, but {type(self).__name__} "
                f"{prefix[:-1] or '(the model)'} has num_tasks={self.num_tasks}; build the model with the same "
                "HATConfig(num_tasks=...) as the one that was saved"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        _invalidate_masks()  # the embeddings the cached masks came from may have changed
        self._hat_step.trained = None

    # -- bookkeeping ----------------------------------------------------------------------
    def _hat_slot(self, task_id: int | None) -> int:
        return self.num_tasks if task_id is None else task_id

    def _hat_trained_set(self) -> frozenset[int]:
        step = self._hat_step
        if step.trained is None:  # read after loads and mark_trained only: reading a tensor is a sync
            step.trained = frozenset(self.hat_trained.nonzero().flatten().tolist())
        return step.trained

    def _hat_begin(self, payload: HATPayload) -> tuple[int | None, float | None]:
        """Validate a payload for this layer; nothing is written before this returns."""
        task = check_selection(payload._selection, self.num_tasks)
        self._hat_check_scale(task, payload.mask_scale, "pass HATPayload(..., mask_scale=...)")
        return task, payload.mask_scale

    def _hat_check_scale(self, task: int | None, scale: float | None, how: str) -> None:
        """A training forward with grad needs a soft mask: the hard one has no gradient."""
        if task is not None and scale is None and self.training and torch.is_grad_enabled():
            raise HATValueError(
                f"mask_scale is None (the hard mask of task {task}) in a training forward of {type(self).__name__} "
                f"with grad enabled; {how} (e.g. hat.utils.get_hat_mask_scale) or evaluate under model.eval() / "
                "torch.no_grad()"
            )

    def _hat_select(self, task: int | PerSample | None, scale: float | None) -> None:
        """Write a checked selection into the task buffers (in place) and their Python mirror
        (per-sample ids: the mirror only; compiled forwards take one task)."""
        self.hat_task.fill_(self.num_tasks if task is None or is_per_sample(task) else task)
        self.hat_scale.fill_(0.0 if scale is None else scale)
        self.__dict__["_hat_state"] = (task, scale)

    def _hat_selected(self) -> tuple[int | None, float | None]:
        """The task and scale selected by ``hat.set_task``, validated for a forward."""
        task, scale = self._hat_state
        self._hat_check_scale(task, scale, "select a mask scale with hat.set_task(model, task_id, mask_scale=...)")
        return task, scale

    def _hat_step_masks(self, training: set[int],
                        protected: frozenset[int]) -> list[tuple[nn.Parameter, Split | None, bool]]:
        """(parameter, its protected entries, condition its gradient) for one optimizer step; None
        means the whole parameter. ``training``: the slots being trained; ``protected``: trained
        tasks that must not change."""
        out: list[tuple[nn.Parameter, Split | None, bool]] = []
        for name in self._hat_row_params:
            p = self._parameters.get(name)
            if p is None:
                continue
            rows = frozenset(s for s in training if s < p.shape[0])
            if not rows:
                out.append((p, None, False))
            elif len(rows) < p.shape[0]:
                out.append((p, _row_split(tuple(p.shape), p.device, p.dtype, rows), False))
        if protected:
            whole = self.__dict__.get("_hat_read_directly") is not None
            for name in self._hat_unit_params:
                p = self._parameters.get(name)
                if p is not None and whole:  # every task read it in full: frozen
                    out.append((p, None, False))
                elif p is not None:
                    split = self._hat_unit_mask_cached(name, protected)
                    if split is not None:
                        out.append((p, split, True))
        return out

    def _hat_unit_mask_cached(self, name: str, protected: frozenset[int]) -> Split | None:
        """The protected entries of a unit-protected parameter, None when there are none.

        Cached: they depend only on the embedding rows of protected tasks, which no step can
        change, and on this layer's input link. Loading a state_dict, re-initialising embeddings,
        a cast or move and a change of input link invalidate every cache (``_invalidate_masks``)."""
        cache = self.__dict__.setdefault("_hat_mask_cache", {})
        param = self._parameters[name]
        key = (name, protected, _MASK_GENERATION[0], id(param))
        if key not in cache:
            if len(cache) > 32:
                cache.clear()
            tasks = torch.zeros(self.num_tasks, dtype=torch.bool, device=self.hat_trained.device)
            tasks[list(protected)] = True
            mask = self._hat_unit_mask(name, tasks)
            cache[key] = _split(mask.expand_as(param), param.dtype) if mask is not None and bool(mask.any()) else None
        return cache[key]

    def _hat_unit_mask(self, name: str, protected: torch.Tensor) -> torch.Tensor | None:
        return None


    def _hat_end_step(self, newly_trained: list[int]) -> None:
        """After an optimizer step: record newly trained tasks and start a new step."""
        step = self._hat_step
        if newly_trained:
            self.hat_trained[newly_trained] = True
            if step.trained is not None:  # kept in step with the buffer: no read (a device sync) per step
                step.trained = step.trained | frozenset(newly_trained)
        step.witnessed.update(t for t in step.bwd if t < self.num_tasks)
        step.bwd = set()
        step.latest = None


# (protect, keep): float 0/1 masks, protect = 1 on protected entries and keep = 1 - protect.
# Float masks, not bool: gradients are conditioned by multiplying with ``keep``, and the
# update is undone with lerp(p, old, protect), exact for 0/1 weights and faster on CPU than
# torch.where or masked_fill.
Split = tuple[torch.Tensor, torch.Tensor]


def _split(mask: torch.Tensor, dtype: torch.dtype) -> Split:
    protect = mask.to(dtype).contiguous()
    return protect, 1 - protect


@functools.lru_cache(maxsize=256)
def _row_split(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, training: frozenset[int]) -> Split:
    """Masks for a task-indexed parameter of ``shape``: the rows not being trained."""
    mask = torch.ones(shape[0], dtype=torch.bool, device=device)
    mask[sorted(training)] = False
    return _split(mask.view(-1, *([1] * (len(shape) - 1))).expand(shape), dtype)


class _StepState:
    """What one training step has seen so far; transient, never saved."""

    __slots__ = ("bwd", "latest", "trained", "witnessed")

    def __init__(self) -> None:
        self.latest: torch.Tensor | None = None  # the probe gradient of the latest backward, not yet read
        self.bwd: set[int] = set()  # slots of the latest backward that reached this module, until a step
        self.trained: frozenset[int] | None = None  # hat_trained as read this step
        # tasks whose optimizer steps this module object saw (not those of a copy or a checkpoint)
        self.witnessed: set[int] = set()


class HATMasked(TaskTracked):
    """A module with one learnable mask per task over its ``units`` output units.

    ``mask(t, s) = gate(s * e[t])`` with ``e = task_embedding`` of shape ``[num_tasks, units]``;
    the hard mask (``s = None``) is ``e[t] > 0``.
    """

    hat_config: HATConfig
    _hat_row_params = ("task_embedding",)
    _hat_default_mask_dim: ClassVar[int] = -1

    def _hat_init_mask(self, hat_config: HATConfig, units: int, device: Any = None, dtype: Any = None) -> None:
        self.hat_config = hat_config
        self.task_embedding = nn.Parameter(torch.empty(hat_config.num_tasks, units, device=device, dtype=dtype))
        self.reset_task_embedding()
        # where this layer's input units come from: set by the first payload forward
        self.__dict__["_hat_link"] = None
        self._hat_init_tracking(hat_config.num_tasks, device)

    @property
    def mask_dim(self) -> int:
        dim = self.hat_config.mask_dim
        return self._hat_default_mask_dim if dim is None else dim

    def reset_task_embedding(self) -> None:
        _invalidate_masks()
        with torch.no_grad():
            strat = self.hat_config.init_strat
            if strat == "normal":
                self.task_embedding.normal_(0.0, 1.0)
            elif strat == "dense":
                self.task_embedding.fill_(1.0)
            else:  # sparse: every unit starts off
                self.task_embedding.fill_(-1.0)

    # -- masks ---------------------------------------------------------------------------
    def get_mask(self, task_id: Any, mask_scale: float | None = None) -> torch.Tensor:
        """The mask of ``task_id`` over this layer's units: soft for a scale, hard for None."""
        task = check_task_id(task_id, self.num_tasks, allow_none=False)
        return self._hat_mask(task, mask_scale)

    def _hat_mask(self, task: int, scale: float | None) -> torch.Tensor:
        return self._hat_mask_marked(task, scale, False)[0]

    def _hat_mask_marked(self, task: int, scale: float | None, mark: bool) -> tuple[torch.Tensor, bool]:
        """The mask of ``task``; with ``mark``, the soft mask's autograd node also reports
        ``task`` to the probe where it can (second value: whether it did)."""
        emb = self.task_embedding
        if scale is None:
            return (emb[task] > 0).to(emb.dtype), False
        cfg = self.hat_config
        if not (emb.requires_grad and torch.is_grad_enabled()):
            return _flush(cfg.gate(scale * emb[task])), False
        if cfg.gate is torch.sigmoid:
            if mark and not torch.compiler.is_compiling():
                return _group_of(cfg).mask(self, task, scale), True
            # one layer on its own: get_mask, the regularizer, traced payload forwards
            probes = (self._hat_probe,) if mark else ()
            return _GroupMask.apply(task, scale, cfg.grad_comp_factor, cfg.grad_comp_clamp, 1, emb[task],
                                    *probes)[0], mark
        return self._hat_generic_gate(emb[task], scale), False

    def _hat_generic_gate(self, e: torch.Tensor, scale: Any) -> torch.Tensor:
        """A gate other than sigmoid: ``gate(s * e)`` with the compensation as a gradient factor;
        ``scale`` a float or a 0-d tensor (0 only where the result is not used)."""
        cfg = self.hat_config
        with torch.no_grad():
            safe = scale.clamp(min=1e-12) if isinstance(scale, torch.Tensor) else scale
            clamped = (safe * e).clamp(-cfg.grad_comp_clamp, cfg.grad_comp_clamp)
            factor = cfg.grad_comp_factor * (torch.cosh(clamped) + 1) / (safe * (torch.cosh(e) + 1))
        mask = cfg.gate(scale * _GradScale.apply(e, factor))
        return mask - (mask - _flush(mask)).detach()  # flushed forward, gradient kept

    def _hat_mask_tensor(self, task: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``_hat_mask`` for a task and scale held in 0-d tensors (``hat_task``, ``hat_scale``):
        no Python branch on their values, so torch.compile traces it once for every task and
        scale. Slot ``num_tasks`` ("no task") gives ones; scale 0 the hard mask."""
        last = self.num_tasks - 1
        e = self.task_embedding.index_select(0, task.clamp(max=last).view(1)).squeeze(0)
        hard = (e > 0).to(e.dtype)
        cfg = self.hat_config
        if e.requires_grad and torch.is_grad_enabled():
            if cfg.gate is torch.sigmoid:
                soft = _CompensatedSigmoid.apply(e, scale, cfg.grad_comp_factor, cfg.grad_comp_clamp)
            else:
                soft = self._hat_generic_gate(e, scale)
        else:
            soft = _flush(cfg.gate(scale * e))
        mask = torch.where(scale > 0, soft, hard)
        return torch.where(task < self.num_tasks, mask, torch.ones_like(mask))

    def _hat_current_mask(self, mark: bool = False) -> torch.Tensor | None:
        """The mask of the task selected by ``hat.set_task`` (None: no task, no mask). ``mark``
        (eager): the mask also reports the task to this layer's probe, for a layer whose mask the
        BatchNorm after it applies and which leaves its own output unmarked."""
        if torch.compiler.is_compiling():
            return self._hat_mask_tensor(self.hat_task, self.hat_scale)
        task, scale = self._hat_selected()
        if task is None:
            return None
        if is_per_sample(task):
            return self._hat_sample_masks(task, scale, mark)
        return self._hat_task_mask(task, scale, mark)

    def _hat_task_mask(self, task: int, scale: float | None, mark: bool = False) -> torch.Tensor:
        """The mask of ``task`` at ``scale`` (None: hard); ``mark``: it reports the task to the probe."""
        mask, marked = self._hat_mask_marked(task, scale, mark)
        return self._hat_mark(mask, task) if mark and not marked else mask

    def _hat_sample_masks(self, selection: PerSample, scale: float | None, mark: bool = False) -> torch.Tensor:
        """Each sample's mask, ``[batch, units]``: ``gate(s * E[ids])`` with HAT's compensated
        gradient (hard: ``E[ids] > 0``); ``mark``: every task present is reported to the probe."""
        e = self.task_embedding.index_select(0, selection.ids.to(self.task_embedding.device))
        cfg = self.hat_config
        if scale is None:
            mask = (e > 0).to(e.dtype)
        elif not (e.requires_grad and torch.is_grad_enabled()):
            mask = _flush(cfg.gate(scale * e))
        elif cfg.gate is torch.sigmoid:
            mask = _CompensatedSigmoid.apply(e, scale, cfg.grad_comp_factor, cfg.grad_comp_clamp)
        else:
            mask = self._hat_generic_gate(e, scale)
        return self._hat_mark(mask, selection.ids.to(e.device)) if mark else mask

    def used_units(self, tasks: torch.Tensor) -> torch.Tensor:
        """Units whose hard mask is on for any of ``tasks`` (bool ``[num_tasks]``): the binary
        cumulative mask."""
        return ((self.task_embedding.detach() > 0) & tasks.view(-1, 1)).any(0)

    # -- the first-call trace ----------------------------------------------------------------
    def _hat_output_units(self, rec: Any, carried: Any, x: Any, y: torch.Tensor) -> Any:
        return rec.layer_units(self, y.dim())  # its own units, along its mask dimension

    def _hat_apply_trace(self, rec: Any, seen: list[tuple[Any, int]]) -> None:
        size = self._hat_in_units()
        for units, ndim in seen:  # its input units run along the features (linear) or channels (conv)
            dim = (ndim - 1 if self._hat_default_mask_dim == -1 else 1) if ndim > 0 else None
            self._hat_set_link(rec.input_map(units, ndim, dim, size, self.num_tasks))

    # -- payload path --------------------------------------------------------------------
    def _hat_record_link(self, payload: HATPayload) -> None:
        """Note where a payload's units come from (compared cheaply every forward; the map is
        built only when it differs from the first one seen)."""
        key = (payload._src, payload._repeat)
        first = self.__dict__.get("_hat_link_key")
        if first is not None and first[0] is key[0] and first[1] == key[1]:
            return
        self.__dict__.setdefault("_hat_link_key", key)
        in_units = self._hat_in_units()
        src = payload._src
        if src is UNKNOWN:
            link = _units.dense(in_units, "a module the payload cannot follow (it moves zeros or reshapes units)")
        elif src is None:
            link = _units.dense(in_units, _units.MODEL_INPUT)
        elif not isinstance(src, HATMasked) or src.task_embedding.shape[1] * payload._repeat != in_units:
            link = _units.dense(in_units, f"units of {type(src).__name__} that do not line up with this input")
        else:
            link = _units.of_layer(src, payload._repeat)
        self._hat_set_link(link)

    def _hat_set_link(self, link: _units.UnitMap) -> None:
        """Where this layer's input units come from (found by the trace or by payloads). A layer
        fed from different places in different calls protects whole rows from then on."""
        old = self.__dict__.get("_hat_link")
        if old is None:
            self.__dict__["_hat_link"] = link
            _invalidate_masks()  # the protected inputs of this layer are now known
        elif old.dense_reason != _FED_FROM_MANY and not old.same_as(link):
            self.__dict__["_hat_link"] = _units.dense(link.size, _FED_FROM_MANY)
            _invalidate_masks()

    def _hat_masked_payload(self, payload: HATPayload, y: torch.Tensor, task: int | None,
                            scale: float | None) -> HATPayload:
        if task is None:
            y = self._hat_mark(y, self.num_tasks)
            return payload._derive(y, mask=None, unit_mask=None, unit_dim=-1, src=None)
        if is_per_sample(task):
            y = self._hat_mark(y, task.ids.to(y.device))
            mask = self._hat_sample_masks(task, scale)
            return payload._derive(y, mask=mask, unit_mask=mask, unit_dim=self.mask_dim, src=self)
        mask, marked = self._hat_mask_marked(task, scale, True)
        if not marked:
            y = self._hat_mark(y, task)
        return payload._derive(y, mask=mask, unit_mask=mask, unit_dim=self.mask_dim, src=self)

    # -- conditioning --------------------------------------------------------------------

    def _hat_input_used(self, protected: torch.Tensor, in_units: int) -> torch.Tensor | None:
        """The input units used by the protected tasks (bool ``[in_units]``; positions that no mask
        reaches count as used), or None where they cannot be known: whole rows of used units."""
        link = self.__dict__.get("_hat_link")
        if link is None or link.size != in_units:
            return None
        if any(s.num_tasks != self.num_tasks for s in link.sources):
            return None
        return link.used(protected)
