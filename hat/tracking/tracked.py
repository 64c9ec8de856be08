"""The task bookkeeping of every task-aware module (``TaskTracked``).

Slots: tasks are ``0 .. num_tasks-1``; slot ``num_tasks`` is "no task" (``task_id=None``).
A module knows which tasks it has been trained on (``hat_trained``, a persistent buffer), which
task ``hat.set_task`` selected (``hat_task``/``hat_scale`` 0-d buffers that compiled code reads,
and their Python mirror), and, through a probe, which task slots each backward trained through
it. ``hat.protect`` reads the same state in its optimizer step hooks.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from hat._runtime import RUNTIME
from hat.config import HATConfig
from hat.errors import HATTypeError, HATValueError
from hat.masks.gate import one_hot
from hat.payload import HATPayload
from hat.tracking.selection import PerSample, check_selection, is_per_sample

__all__ = ["Selection", "Split", "StepEntry", "TaskTracked", "check_config", "invalidate", "live_modules",
           "on_first_module", "plain_children", "rows", "shallow_clone", "task_modules"]


def invalidate(module: Any) -> None:
    """What ``module``'s step protects may have changed other than by training a task (its
    embeddings loaded or re-initialised, its parameters moved or cast, its input link found):
    its cached protected entries, and the step plans that hold it, are rebuilt when next needed.
    Other modules' caches stay."""
    module.__dict__["_hat_generation"] = module.__dict__.get("_hat_generation", 0) + 1
    RUNTIME.generation += 1


def on_first_module(callback: Any) -> None:
    """Call ``callback()`` when a task-aware module is made (callbacks are idempotent)."""
    RUNTIME.on_new_module.append(callback)
    if RUNTIME.live:
        callback()


def live_modules() -> list[TaskTracked]:
    return list(RUNTIME.live)


def task_modules(model: nn.Module) -> list[TaskTracked]:
    """The task-aware modules of ``model`` (itself included), in ``model.modules()`` order."""
    return [m for m in model.modules() if isinstance(m, TaskTracked)]


def check_config(hat_config: Any) -> HATConfig:
    if not isinstance(hat_config, HATConfig):
        raise HATTypeError(f"hat_config must be a hat.HATConfig; got {type(hat_config).__name__}")
    return hat_config


class Selection(NamedTuple):
    """The task and mask scale a forward runs with: ``task`` an int, per-sample ids (``PerSample``)
    or None (no task); ``scale`` a float or None (hard masks). In compiled code both are the 0-d
    tensors ``hat_task`` and ``hat_scale`` (slot ``num_tasks``: no task; scale 0: hard)."""

    task: Any
    scale: Any


_active_ddp = nn.parallel.DistributedDataParallel._get_active_ddp_module  # the DDP whose forward runs (None: none)


def _row(param: torch.Tensor, slot: Any) -> torch.Tensor:
    """Row ``slot`` of a task-indexed tensor; ``slot`` an int or a 0-d tensor (torch.compile); a
    1-d tensor of per-sample ids gives one row per sample."""
    if isinstance(slot, torch.Tensor):
        if slot.dim() == 1:
            return param.index_select(0, slot)
        return param.index_select(0, slot.view(1)).squeeze(0)
    return param[slot]


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
            hot = one_hot(ctx.n, ctx.slot, ctx.dtype, grad.device)
        return grad, hot, None


class _Report(torch.autograd.Function):
    """Identity on ``x``; its backward reports ``slot`` to a module's step state in Python, as the
    group mask node does: no probe gradient to make, accumulate (a copy: the one-hot is shared)
    and read at the step. Eager code with an int slot only; ``_Probe`` serves the rest."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, step: Any, slot: int) -> torch.Tensor:
        ctx.step, ctx.slot = step, slot
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.step.report(ctx.slot)
        return grad, None, None


def _report_hook(step: Any, slot: int, grad: torch.Tensor) -> None:
    step.report(slot)


def rows(module: Any, slot: Any, *params: torch.Tensor | None, mark: bool = True) -> tuple[Any, ...]:
    """The rows ``slot`` of task-indexed ``params`` (None stays None), reporting ``slot`` to the
    module's probe when grad is on (through the first row: every task-indexed layer uses it).
    ``mark=False``: a mask used in the same forward reports the slot already. Which tasks a step
    trains is collected over all modules of the optimizer, so one report per forward suffices."""
    got = [_row(p, slot) for p in params if p is not None]  # torch's select: no Python in its backward
    if mark and got:
        got[0] = module._hat_mark(got[0], slot, fresh=True)  # a select made here, for this forward only
    it = iter(got)
    return tuple(None if p is None else next(it) for p in params)


def _on_probe(ref: weakref.ref, probe: torch.Tensor) -> None:
    module = ref()
    if module is not None:
        # the latest backward's slots; read (one sync for all modules) at the next step
        step = module._hat_step
        step.latest = probe.grad
        step.latest_graph = _graph_task()
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
    # a training forward with grad needs a mask scale (a mask of its own: the hard one has no gradient)
    _hat_needs_soft_mask: ClassVar[bool] = False
    _hat_per_sample = False  # whether hat.set_task selected per-sample ids (compiled forwards read hat_ids)

    def _hat_init_tracking(self, num_tasks: int, device: Any = None) -> None:
        self.num_tasks = num_tasks
        # the only bookkeeping that must outlive a step: it travels with the state_dict
        self.register_buffer("hat_trained", torch.zeros(num_tasks, dtype=torch.bool, device=device))
        # the task selected by hat.set_task, as 0-d tensors that forwards read (torch.compile does
        # not recompile when they change); slot num_tasks is "no task", scale 0 the hard mask
        self.register_buffer("hat_task", torch.tensor(num_tasks, device=device), persistent=False)
        self.register_buffer("hat_scale", torch.tensor(0.0, device=device), persistent=False)
        # per-sample ids selected by hat.set_task, for compiled forwards (``_hat_per_sample`` says
        # which of hat_task and hat_ids they read: one graph for each, none per value)
        self.register_buffer("hat_ids", torch.zeros(0, dtype=torch.long, device=device), persistent=False)
        self.__dict__["_hat_state"] = Selection(None, None)  # the same selection as Python values, for eager forwards
        self.__dict__["_hat_step"] = _StepState()
        RUNTIME.new_module(self)
        self._hat_ensure_hooks()

    # -- the first-call trace (hat.convert.trace asks; each class holds the rules about itself) ---------
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
        invalidate(self)  # parameters may have a new dtype or device: masks and step plans too
        return out

    def _hat_mark(self, x: torch.Tensor, slot: Any, fresh: bool = False) -> torch.Tensor:
        """``x``, made so that a backward through it reports ``slot``. In eager code with an int
        slot and an ``x`` that requires grad, the report goes in Python to this module's step
        state: a hook on ``x`` where it is ``fresh`` (a non-leaf made for this forward alone, so
        the hook dies with it; no op at all), else an identity node (``_Report``). Otherwise
        (tensor slots, compiled code, a mask of frozen embeddings) ``x`` goes through this
        module's probe, whose own gradient puts the node in the graph."""
        if not torch.is_grad_enabled():
            return x
        if isinstance(slot, int) and x.requires_grad and not torch.compiler.is_compiling():
            if fresh and x.grad_fn is not None:
                x.register_hook(functools.partial(_report_hook, self._hat_step, slot))
                return x
            return _Report.apply(x, self._hat_step, slot)  # (an input without grad: no backward reaches it)
        return _Probe.apply(x, self._hat_probe, slot)

    def _hat_plain_copy(self, task_id: int | None) -> nn.Module:
        """A shallow copy of class ``self._hat_base`` (the class before conversion) without HAT's
        embedding, buffers and attributes (its parameters are still this module's), and its HAT
        children made plain for ``task_id``."""
        plain = shallow_clone(self, self._hat_base)
        plain_children(plain, task_id)
        plain._parameters.pop("task_embedding", None)
        for name in ("hat_trained", "hat_task", "hat_scale", "hat_ids"):
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
        state.pop("_hat_ddp_checked", None)
        state.pop("_hat_row_views", None)  # views of its tensors: made anew from the unpickled ones
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        if "hat_ids" not in self._buffers:  # pickled by an earlier release
            self.register_buffer("hat_ids", torch.zeros(0, dtype=torch.long, device=self.hat_task.device),
                                 persistent=False)
        self.__dict__["_hat_step"] = _StepState()
        RUNTIME.new_module(self)
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
        invalidate(self)  # the embeddings the cached masks came from may have changed
        self._hat_step.trained = None

    def _hat_check_ddp(self, ddp: Any) -> None:
        """Inside a DistributedDataParallel forward (eager): this module's trainable parameters
        must be among those DDP synchronizes. A model made task-aware after DDP wrapped it has
        task embeddings DDP does not know: their gradients would stay per rank and the ranks'
        masks drift apart silently. Checked once per DDP object (``ddp``: the active one)."""
        if torch.compiler.is_compiling():
            return
        checked = self.__dict__.get("_hat_ddp_checked")
        if checked is not None and checked() is ddp:
            return
        known = ddp.__dict__.get("_hat_param_ids")
        if known is None:
            # the parameters DDP registered when it wrapped the model (ddp.parameters() walks the model now)
            registered = getattr(ddp, "_module_parameters", None)
            if registered is None:  # a torch without that attribute: nothing to check against
                return
            known = ddp.__dict__["_hat_param_ids"] = frozenset(id(p) for p in registered)
        missing = [n for n, p in self._parameters.items() if p is not None and p.requires_grad and id(p) not in known]
        if missing:
            raise HATTypeError(
                f"{type(self).__name__} runs inside DistributedDataParallel, but its parameter(s) {', '.join(missing)} "
                "are not among those DDP synchronizes: the model was made task-aware (hat.convert, a HAT layer "
                "added) after DDP wrapped it. Convert or build the model first, then wrap it: "
                "DistributedDataParallel(hat.convert(model, cfg), ...)"
            )
        self.__dict__["_hat_ddp_checked"] = weakref.ref(ddp)

    # -- bookkeeping ----------------------------------------------------------------------
    def _hat_slot(self, task_id: int | None) -> int:
        return self.num_tasks if task_id is None else task_id

    def _hat_row_view(self, name: str, slot: int) -> torch.Tensor:
        """Row ``slot`` of parameter or buffer ``name`` as a view without autograd (writes through
        it reach the tensor), for code that would otherwise dispatch a select per forward. Kept
        between calls while the tensor object and its storage stay: a step and a load write in
        place; a move, a cast or a ``.data`` assignment replaces the storage, and the view is
        made anew."""
        p = self._parameters[name] if name in self._parameters else self._buffers[name]
        cache = self.__dict__.setdefault("_hat_row_views", {})
        got = cache.get((name, slot))
        if got is None or got[1] != id(p) or got[2] != p.data_ptr():
            got = cache[(name, slot)] = (p.detach()[slot], id(p), p.data_ptr())
        return got[0]

    def _hat_trained_set(self) -> frozenset[int]:
        step = self._hat_step
        if step.trained is None:  # read after loads and mark_trained only: reading a tensor is a sync
            step.trained = frozenset(self.hat_trained.nonzero().flatten().tolist())
        return step.trained

    def _hat_begin(self, payload: HATPayload) -> Selection:
        """Validate a payload for this layer; nothing is written before this returns."""
        task = check_selection(payload._selection, self.num_tasks)
        self._hat_check_scale(task, payload.mask_scale, "pass HATPayload(..., mask_scale=...)")
        return Selection(task, payload.mask_scale)

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
        per_sample = is_per_sample(task)
        value = self.num_tasks if task is None or per_sample else task
        scale_value = 0.0 if scale is None else scale
        if torch.compiler.is_compiling():
            self.hat_task.fill_(value)
            self.hat_scale.fill_(scale_value)
        else:  # eager: skip the write (an op per module and step) when the buffer holds the value already
            for name, v in (("hat_task", value), ("hat_scale", scale_value)):
                buf = self._buffers[name]
                written = self.__dict__.get(f"_hat_wrote_{name}")
                if written is None or written[0] is not buf or written[1] != buf._version or written[2] != v:
                    buf.fill_(v)
                    self.__dict__[f"_hat_wrote_{name}"] = (buf, buf._version, v)
        if per_sample:
            ids = task.ids.to(self.hat_ids.device)
            if self.hat_ids.shape == ids.shape:
                self.hat_ids.copy_(ids)  # in place: a compiled graph reads the new ids without recompiling
            else:
                self._buffers["hat_ids"] = ids.clone()
        self.__dict__["_hat_per_sample"] = per_sample
        self.__dict__["_hat_state"] = Selection(task, scale)

    def _hat_selected(self) -> Selection:
        """The task and scale selected by ``hat.set_task``, validated for a forward: in compiled
        code the 0-d buffers (no Python branch on their values, so one graph serves every task
        and scale), else their Python mirror."""
        if torch.compiler.is_compiling():
            return Selection(self.hat_ids if self._hat_per_sample else self.hat_task, self.hat_scale)
        state = self._hat_state
        if self._hat_needs_soft_mask:
            self._hat_check_scale(state.task, state.scale,
                                  "select a mask scale with hat.set_task(model, task_id, mask_scale=...)")
        return state

    def _hat_cache_generation(self) -> tuple[int, ...]:
        """Moves whenever this module's cached protected entries may be stale (see ``invalidate``)."""
        return (self.__dict__.get("_hat_generation", 0),)

    def _hat_step_masks(self, training: set[int], protected: frozenset[int]) -> list[StepEntry]:
        """(parameter, its protected entries, condition its gradient) for one optimizer step; None
        means the whole parameter. ``training``: the slots being trained; ``protected``: trained
        tasks that must not change."""
        out: list[StepEntry] = []
        for name in self._hat_row_params:
            p = self._parameters.get(name)
            if p is None:
                continue
            rows = frozenset(s for s in training if s < p.shape[0])
            if not rows:
                out.append(StepEntry(p, None, False))
            elif len(rows) < p.shape[0]:
                out.append(StepEntry(p, _row_split(tuple(p.shape), p.device, p.dtype, rows), False))
        if protected:
            whole = self.__dict__.get("_hat_read_directly") is not None
            for name in self._hat_unit_params:
                p = self._parameters.get(name)
                if p is not None and whole:  # every task read it in full: frozen
                    out.append(StepEntry(p, None, False))
                elif p is not None:
                    split = self._hat_unit_mask_cached(name, protected)
                    if split is not None:
                        out.append(StepEntry(p, split, True))
        return out

    def _hat_unit_mask_cached(self, name: str, protected: frozenset[int]) -> Split | None:
        """The protected entries of a unit-protected parameter, None when there are none.

        Cached: they depend only on the embedding rows of protected tasks, which no step can
        change, and on this layer's input link. Loading a state_dict, re-initialising embeddings,
        a cast or move and a change of input link invalidate it (``invalidate``), for this module
        and the layers that read it."""
        cache = self.__dict__.setdefault("_hat_mask_cache", {})
        param = self._parameters[name]
        key = (name, protected, self._hat_cache_generation(), id(param))
        if key not in cache:
            if len(cache) > 32:
                cache.clear()
            tasks = torch.zeros(self.num_tasks, dtype=torch.bool, device=self.hat_trained.device)
            tasks[list(protected)] = True
            factors = self._hat_unit_mask(name, tasks)
            cache[key] = None if factors is None or not all(bool(f.any()) for f in factors) else _split(factors, param)
        return cache[key]

    def _hat_unit_mask(self, name: str, protected: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Bool tensors broadcastable to parameter ``name``, one or two, whose logical and is 1
        on the entries that the trained tasks ``protected`` (bool ``[num_tasks]``) use; None: none."""
        return None

    def _hat_end_step(self, newly_trained: list[int]) -> None:
        """After an optimizer step: record newly trained tasks and start a new step."""
        step = self._hat_step
        if newly_trained:
            self.hat_trained[newly_trained] = True
            self.__dict__["_hat_trained_here"] = True  # by this object: its placement is what trained
            if step.trained is not None:  # kept in step with the buffer: no read (a device sync) per step
                step.trained = step.trained | frozenset(newly_trained)
        step.witnessed.update(t for t in step.bwd if t < self.num_tasks)
        step.bwd = set()
        step.latest = None
        step.reported, step.reported_graph = set(), None


class Split(NamedTuple):
    """The protected entries of a parameter as float 0/1 factors broadcastable to it: ``rows``
    (the output units protected tasks use) times ``cols`` (the input units they read; None: all).
    A mask of the parameter's size is never kept: ``rows`` is ``[out, 1, ...]``, ``cols`` the
    input units over the kernel ``[1, in, *kernel]`` (a grouped conv, whose rows read different
    inputs: one factor ``[out, in_per_group, 1, ...]``). Where every input unit is protected,
    ``cols`` is None; where every output unit is, ``rows`` holds the input units' factor alone
    (one factor is one pass over the parameter fewer). Float, not bool: the hooks undo an
    update with lerp, exact for 0/1 weights, and condition gradients as ``g - g * protect``
    (exactly g or 0)."""

    rows: torch.Tensor
    cols: torch.Tensor | None = None


class StepEntry(NamedTuple):
    """What one optimizer step protects in one parameter: ``split`` None means all of it;
    ``condition``: its gradient is conditioned too (HAT's ``1 - min(a_out, a_in)``)."""

    param: nn.Parameter
    split: Split | None
    condition: bool


def _split(factors: tuple[torch.Tensor, ...], param: torch.Tensor) -> Split:
    rows, *cols = factors
    if cols and cols[0].shape[0] == 1:
        # the input units over the kernel too (a few thousand entries): both factors then broadcast
        # over leading dimensions only, which CPU kernels vectorize (over the kernel they do not)
        cols = [cols[0].expand(1, *param.shape[1:])]
    elif cols:  # a grouped conv: each row reads its own group's inputs; one (out, in) factor
        rows, cols = rows & cols[0], []
    if cols and bool(cols[0].all()):  # every input used (a first layer): protected by whole rows
        cols = []
    elif cols and bool(rows.all()):  # every output used: by the columns alone, one factor
        rows, cols = cols[0], []
    return Split(rows.to(param.dtype).contiguous(), cols[0].to(param.dtype).contiguous() if cols else None)


@functools.lru_cache(maxsize=256)
def _row_split(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, training: frozenset[int]) -> Split:
    """The protected entries of a task-indexed parameter of ``shape``: the rows not being trained."""
    mask = torch.ones(shape[0], dtype=dtype, device=device)
    mask[sorted(training)] = 0
    return Split(mask.view(-1, *([1] * (len(shape) - 1))))


class _StepState:
    """What one training step has seen so far; transient, never saved.

    Which slots the latest backward that reached the module trained comes two ways: a probe
    gradient (``latest``, read with one device sync for all modules at the step) or, from the
    group mask node of eager forwards, Python reports (``reported``), no tensor at all. Each is
    tagged with the backward (autograd graph task) it came from; the step takes the later one."""

    __slots__ = ("bwd", "latest", "latest_graph", "reported", "reported_graph", "trained", "witnessed")

    def __init__(self) -> None:
        self.latest: torch.Tensor | None = None  # the probe gradient of the latest backward, not yet read
        self.latest_graph = -1  # the backward it came from
        self.reported: set[int] = set()  # slots reported in Python by the latest backward, not yet read
        self.reported_graph: int | None = None  # that backward (None: no report pending)
        self.bwd: set[int] = set()  # slots of the latest backward that reached this module, until a step
        self.trained: frozenset[int] | None = None  # hat_trained as read this step
        # tasks whose optimizer steps this module object saw (not those of a copy or a checkpoint)
        self.witnessed: set[int] = set()

    def report(self, slot: int) -> None:
        """A backward trained ``slot`` through this module (called from inside that backward)."""
        graph = _graph_task()
        if graph != self.reported_graph:  # a new backward: the slots of earlier ones are replaced
            self.reported_graph = graph
            self.reported = set()
        self.reported.add(slot)

    def take(self, from_probe: set[int] | None) -> None:
        """Set ``bwd`` from the latest backward's reports (``from_probe``: the slots the probe
        gradient ``latest`` gave, None where there was none) and clear them."""
        if self.reported_graph is not None:
            if from_probe is not None and self.latest_graph == self.reported_graph:
                self.bwd = self.reported | from_probe
            elif from_probe is None or self.reported_graph > self.latest_graph:
                self.bwd = self.reported
            else:
                self.bwd = from_probe
            self.reported, self.reported_graph = set(), None
        elif from_probe is not None:
            self.bwd = from_probe
        self.latest = None


# the running backward's graph task id (increasing; -1 outside a backward)
_graph_task = getattr(torch._C, "_current_graph_task_id", lambda: -1)
