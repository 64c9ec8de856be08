"""Task-indexed normalization: per-task affine parameters (and running statistics).

Every norm here keeps its per-task tensors stacked ``[num_tasks + 1, ...]`` (the last row serves
``task_id=None``); training task ``t`` changes row ``t`` only. Where the units of its input are
known (a payload's mask, or the trace of a converted model), the norm masks its output again:
BatchNorm turns a masked 0 into ``beta``, LayerNorm and GroupNorm give a 0 a value from the
statistics, so without it units a task does not use would leave the norm nonzero. The mask is
folded into the per-task affine (one pass, not two).

Norms converted from timm's norm-act layers (``BatchNormAct2d``, ``GroupNormAct``,
``LayerNormAct`` ...) keep their ``drop`` and ``act`` modules and apply them after the norm, as
timm does; the mask is applied once more after them where they move 0 (a sigmoid, say).
"""

from __future__ import annotations

import copy
import numbers
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hat._checks import check_task_id
from hat.config import HATConfig
from hat.errors import HATTypeError, HATValueError
from hat.masks.group import forward_deviation, group_of
from hat.modules._base import HATMasked, TaskModule
from hat.payload import HATPayload, _along
from hat.tracking.selection import grouped, is_per_sample
from hat.tracking.tracked import Selection, _row, plain_children, rows, shallow_clone

__all__ = [
    "TaskIndexedBatchNorm1d",
    "TaskIndexedBatchNorm2d",
    "TaskIndexedBatchNorm3d",
    "TaskIndexedGroupNorm",
    "TaskIndexedLayerNorm",
    "TaskIndexedLayerNorm2d",
    "TaskIndexedSyncBatchNorm",
]

# the children of timm's norm-act layers, applied in this order after the normalization
_POST = ("drop", "act")


def _num_tasks(num_tasks: Any) -> int:
    return HATConfig(num_tasks=num_tasks).num_tasks


class _TaskIndexedNorm(TaskModule, nn.Module):
    """What every task-indexed norm shares: per-task rows, the masks of its input's units applied
    after it, norm-act children, conversion from and back to the module it replaced."""

    _hat_row_params = ("weight", "bias")
    # the units of the input along this norm's unit dimension, found by the trace of a converted
    # model (``hat.masks.units.UnitMap``); its mask is applied after the norm
    _hat_unit_map: Any = None
    _hat_base: ClassVar[type[nn.Module]]

    def _hat_init_rows(self, num_tasks: int, shape: tuple[int, ...], affine: bool, bias: bool, device: Any,
                       dtype: Any) -> None:
        """Per-task ``weight`` (ones) and ``bias`` (zeros) rows ``[num_tasks + 1, *shape]`` (or None),
        then the task bookkeeping; the buffers of running statistics are the subclass's."""
        kw = dict(device=device, dtype=dtype)
        slots = num_tasks + 1
        self.register_parameter("weight", nn.Parameter(torch.ones(slots, *shape, **kw)) if affine else None)
        self.register_parameter("bias", nn.Parameter(torch.zeros(slots, *shape, **kw)) if affine and bias else None)
        self.register_buffer("hat_unit_gather", None, persistent=False)
        self._hat_init_tracking(num_tasks, device)

    # -- what subclasses say about themselves ------------------------------------------------
    @property
    def num_units(self) -> int:
        raise NotImplementedError

    def _hat_unit_dim(self, ndim: int) -> int | None:
        """The dimension of an ``ndim``-d input that holds this norm's units (None: none does)."""
        return 1

    @classmethod
    def _hat_accepts(cls, base: nn.Module) -> bool:
        return isinstance(base, cls._hat_base)

    @classmethod
    def _hat_args_of(cls, base: nn.Module) -> dict[str, Any]:
        """The constructor arguments (after num_tasks) that rebuild ``base`` task-indexed."""
        raise NotImplementedError

    # -- masks -----------------------------------------------------------------------------
    def _hat_set_unit_map(self, unit_map: Any) -> None:
        """Mask the output with ``unit_map``'s union of its sources' masks (set by the trace)."""
        self._hat_unit_map = unit_map
        gather = None if unit_map.identity_of() is not None else unit_map.gather_index().to(self.hat_trained.device)
        self.register_buffer("hat_unit_gather", gather, persistent=False)

    def _hat_map_mask(self, sel: Selection, mark: bool = False) -> torch.Tensor | None:
        """The mask of the traced input units for selection ``sel`` (one task or the compiled
        buffers). ``mark``: the sources report the task to their probes."""
        unit_map = self._hat_unit_map
        if unit_map is None:
            return None
        masks = [s._hat_mask_of(sel, mark) for s in unit_map.sources]
        if self.hat_unit_gather is None:
            return masks[0]
        ref = masks[0]
        if ref.dim() == 2:  # per sample, ``[batch, units]``: gathered along the units
            lead = ref.shape[0]
            gathered = torch.cat([*masks, ref.new_ones(lead, 1), ref.new_zeros(lead, 1)], 1)[:, self.hat_unit_gather]
            return gathered.amax(1) if gathered.dim() > 2 else gathered
        gathered = torch.cat([*masks, ref.new_ones(1), ref.new_zeros(1)])[self.hat_unit_gather]
        return gathered.amax(0) if gathered.dim() > 1 else gathered

    # -- the first-call trace ----------------------------------------------------------------
    def _hat_output_units(self, rec: Any, carried: Any, x: Any, y: torch.Tensor) -> Any:
        return rec.norm_output(self, carried, x, y)  # its input's units, where it masks again with them

    def _hat_apply_trace(self, rec: Any, seen: list[tuple[Any, int]]) -> None:
        unit_map = rec.norm_map(self, seen)
        if unit_map is not None:
            self._hat_set_unit_map(unit_map)

    def _hat_trace_unmasked(self, rec: Any, seen: list[tuple[Any, int]]) -> bool:
        return self not in rec.dense_norms and any(not u.dense for u, _ in seen) and rec.norm_map(self, seen) is None

    def _hat_post_forward(self, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """timm's ``drop`` and ``act`` after the norm; the mask again after them if they move 0."""
        post = [self._modules[n] for n in _POST if n in self._modules]
        if not post:
            return y
        for m in post:
            y = m(y)
        if mask is not None and not self.__dict__.get("_hat_post_keeps_zero", True):
            y = y * _along(mask, self._hat_unit_dim(y.dim()), y.dim())
        return y

    # -- forward (LayerNorm, GroupNorm: masked before by the layers feeding them, and after) ------
    def _hat_forward_payload(self, payload: HATPayload, sel: Selection) -> HATPayload:
        """Statistics over several units (LayerNorm, GroupNorm): the input arrives with the units a
        task does not use at exact 0, so later tasks cannot move its statistics, and the mask is
        applied again after the norm. BatchNorm overrides this."""
        task, scale = sel
        x = payload.data  # masked before the norm
        dim = self._hat_unit_dim(x.dim())
        known = task is not None and dim is not None and payload._unit_dim % x.dim() == dim
        mask = payload._unit_mask if known else None
        if is_per_sample(task):  # each task's samples with its rows and its mask
            def one(xs: torch.Tensor, t: int) -> torch.Tensor:
                m = payload._src._hat_mask_of(Selection(t, scale)) if known else None
                return self._hat_post_forward(self._normalize(xs, t, m), m)
            y = grouped(x, task, one)
        else:
            y = self._hat_post_forward(self._normalize(x, self._hat_slot(task), mask), mask)  # reports the slot
        return payload._derive(y, mask=None, unit_mask=mask, unit_dim=-1 if dim is None else dim, src=payload._src,
                               repeat=payload._repeat)

    def _hat_forward_tensor(self, x: torch.Tensor, sel: Selection) -> torch.Tensor:
        # the input arrives masked by the layers that feed it; the union of their masks is
        # applied again after the norm
        task, scale = sel
        if is_per_sample(task):
            def one(xs: torch.Tensor, t: int) -> torch.Tensor:
                m = self._hat_map_mask(Selection(t, scale))
                return self._hat_post_forward(self._normalize(xs, t, m), m)
            return grouped(x, task, one)
        slot = task if isinstance(task, torch.Tensor) else self._hat_slot(task)  # compiled: the 0-d buffer
        mask = None if task is None else self._hat_map_mask(sel)
        return self._hat_post_forward(self._normalize(x, slot, mask), mask)

    def _normalize(self, x: torch.Tensor, slot: Any, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    # -- conversion --------------------------------------------------------------------------
    @classmethod
    def from_base_module(cls, base_module: nn.Module, hat_config: Any = None, num_tasks: Any = None,
                         **kwargs: Any) -> _TaskIndexedNorm:
        """A task-indexed copy of ``base_module``: every task slot (and the no-task slot) starts from
        its affine parameters (and running statistics); the ``drop`` and ``act`` of a timm norm-act
        layer are kept. ``to_base_module`` gives back a module of ``base_module``'s class."""
        from hat.modules.linear import _num_tasks_from

        n = _num_tasks_from(cls, hat_config, num_tasks)
        if not cls._hat_accepts(base_module):
            raise HATTypeError(f"{cls.__name__}.from_base_module expects a {cls._hat_base.__name__}; "
                               f"got {type(base_module).__name__}")
        children = [name for name, _ in base_module.named_children()]
        unknown = [c for c in children if c not in _POST]
        if unknown:
            raise HATTypeError(f"{cls.__name__}.from_base_module: {type(base_module).__name__} has submodules "
                               f"({', '.join(unknown)}) that a task-indexed norm would drop; only timm's norm-act "
                               f"children ({', '.join(_POST)}) are kept")
        ref = next(iter(base_module.parameters()), None)
        if ref is None:
            ref = next(iter(base_module.buffers()), None)
        kw = dict(device=None if ref is None else ref.device,
                  dtype=None if ref is None or not ref.is_floating_point() else ref.dtype)
        new = cls(n, **cls._hat_args_of(base_module), **kw)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                src, dst = getattr(base_module, name, None), getattr(new, name, None)
                if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
                    dst.copy_(src.detach().expand_as(dst))
        for name in children:
            new.add_module(name, base_module._modules[name])
        if children:
            new.__dict__["_hat_post_keeps_zero"] = _keeps_zero([base_module._modules[c] for c in children],
                                                               new.num_units)
        # the module it replaced, without its tensors: to_base_module rebuilds one of its class
        template = shallow_clone(base_module)
        template._parameters = dict.fromkeys(base_module._parameters)
        template._buffers = dict.fromkeys(base_module._buffers)
        new.__dict__["_hat_template"] = template
        if hat_config is not None:
            new.__dict__["_hat_mask_config"] = hat_config  # the masks of the model it is converted with
        new.train(base_module.training)
        return new

    def to_base_module(self, task_id: Any = None, **kwargs: Any) -> nn.Module:
        """The plain module of ``task_id`` (its rows; None: the no-task slot), of the class this
        norm was converted from, with the hard masks it applies folded into its affine."""
        task = check_task_id(task_id, self.num_tasks)
        slot = self._hat_slot(task)
        mask = None if task is None else self._hat_map_mask(Selection(task, None))
        template = self.__dict__.get("_hat_template")
        if template is not None:
            plain = copy.deepcopy(template)
            for name in _POST:
                if name in self._modules:
                    plain._modules[name] = copy.deepcopy(self._modules[name])
            plain_children(plain, task)  # a per-task PReLU act
        else:
            plain = self._hat_default_base()
        ref = next(iter(self.buffers()), None) if self.weight is None else self.weight
        with torch.no_grad():
            for name in (*self._hat_row_params, "running_mean", "running_var", "num_batches_tracked"):
                value = getattr(self, name, None)
                if not isinstance(value, torch.Tensor):
                    if name in plain._parameters:
                        plain._parameters[name] = None
                    elif name in plain._buffers:
                        plain._buffers[name] = None
                    continue
                row = value[slot].clone()
                if name in self._hat_row_params:
                    plain._parameters[name] = nn.Parameter(row, requires_grad=value.requires_grad)
                else:
                    plain._buffers[name] = row
            if mask is not None:
                shape = plain.weight.shape if plain._parameters.get("weight") is not None else (self.num_units,)
                if plain._parameters.get("weight") is None:
                    plain._parameters["weight"] = nn.Parameter(torch.ones(shape, device=ref.device, dtype=mask.dtype))
                if plain._parameters.get("bias") is None:
                    plain._parameters["bias"] = nn.Parameter(torch.zeros(shape, device=ref.device, dtype=mask.dtype))
                plain.weight.mul_(mask.view(shape))
                plain.bias.mul_(mask.view(shape))
                for flag in ("affine", "elementwise_affine"):
                    if hasattr(plain, flag):
                        setattr(plain, flag, True)
        plain.train(self.training)
        if mask is not None and not self.__dict__.get("_hat_post_keeps_zero", True):
            from hat.modules.masker import FixedMask

            # an act that moves 0 (a sigmoid) after the norm: the mask again after it, as the HAT norm does
            return nn.Sequential(plain, FixedMask(mask, dim=1 if self._hat_unit_dim(4) == 1 else -1))
        return plain

    def _hat_default_base(self) -> nn.Module:
        """The torch module a hand-built norm (one not converted from a module) unconverts to."""
        raise NotImplementedError


def _keeps_zero(modules: list[nn.Module], units: int) -> bool:
    """Whether ``modules`` (elementwise: an activation, dropout) map 0 to 0."""
    x = torch.zeros(2, units, 1, 1)
    states = [(m, m.training) for m in modules]
    try:
        with torch.no_grad():
            for m in modules:
                m.eval()
                x = m(x)
        return bool((x == 0).all())
    except Exception:  # noqa: BLE001 - a module that cannot take this probe: mask again to be safe
        return False
    finally:
        for m, flag in states:
            m.train(flag)


class _TaskIndexedBatchNorm(_TaskIndexedNorm):
    """BatchNorm with one set of ``weight``/``bias``/running statistics per task.

    Every per-task tensor is stacked as ``[num_tasks + 1, num_features]``; the last row belongs
    to ``task_id=None``. Training on task ``t`` writes row ``t`` of the running statistics only.
    When the input is a payload whose units a HAT layer masks, the mask is folded into this
    layer's scale and shift, so it acts *after* the normalization: a unit that task ``t`` does
    not use leaves as an exact 0 (masking before BN would turn it into ``beta``).

    Running statistics describe the network that evaluation runs, with hard masks:

    - in training, where no refresh (below) follows, a batch of task ``t`` sets row ``t`` when
      the soft masks of its forward are about as close to the hard ones as at the end of the
      scale schedule (the mean over every unit of ``|mask - hard mask|``, read once per step
      from the mask node, exceeds its value at ``max_trn_mask_scale`` by at most
      ``stats_tolerance``): the latest such batch replaces the row (a smaller one is averaged in
      by its share of samples). With the scale annealed from
      ``1/s_max`` in every epoch, the early batches of each epoch run another network (units half
      on, activations at other scales), and the weights move from step to step, so an average
      over many batches describes neither. Batches with softer masks count (by torch's rule) only
      until the first near-hard one; ``momentum`` applies to them and to ``task_id=None``.
    - in a model converted with ``hat.convert`` (or a ``hat_*`` timm model), when a task's training
      ends (the model's next call evaluates, or trains another task), its rows are taken once
      more from the latest training batches, forwarded with the final weights and hard masks.
      That replaces the rows, so until then its soft training batches count by torch's rule, and
      the step reads nothing from the device for the rule above (``refresh_at_task_end = False``
      brings the rule back).

    Not a subclass of ``nn.BatchNorm*``: its parameters have an extra task dimension, and
    utilities written for BatchNorm (fusing into convolutions, freezing) would misread them.
    """

    def _hat_applies_mask_of(self, layer: Any) -> bool:
        return self._hat_unit_map is not None and self._hat_unit_map.identity_of() is layer

    #: how much further from the hard masks than at ``max_trn_mask_scale`` (mean over units) the
    #: soft masks of a training forward may be for its batch to enter the running statistics
    #: (``float("-inf")``: every batch enters by torch's rule)
    stats_tolerance: float = 0.01
    #: take a finished task's statistics once more with its final weights (converted models;
    #: their training batches then skip the ``stats_tolerance`` rule)
    refresh_at_task_end: bool = True

    _expected_dims: tuple[int, ...] = ()

    def __init__(self, num_tasks: int, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        num_tasks = _num_tasks(num_tasks)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        slots = num_tasks + 1
        kw = dict(device=device, dtype=dtype)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(slots, num_features, **kw))
            self.register_buffer("running_var", torch.ones(slots, num_features, **kw))
            self.register_buffer("num_batches_tracked", torch.zeros(slots, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._hat_init_rows(num_tasks, (num_features,), affine, True, device, dtype)

    @property
    def num_units(self) -> int:
        return self.num_features

    @classmethod
    def _hat_accepts(cls, base: nn.Module) -> bool:
        return isinstance(base, nn.modules.batchnorm._BatchNorm)

    @classmethod
    def _hat_args_of(cls, base: nn.Module) -> dict[str, Any]:
        return dict(num_features=base.num_features, eps=base.eps, momentum=base.momentum, affine=base.affine,
                    track_running_stats=base.track_running_stats)

    def _hat_default_base(self) -> nn.Module:
        ref = self.weight if self.weight is not None else self.running_mean
        return self._hat_base(self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine,
                              track_running_stats=self.track_running_stats,
                              device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()
        self._hat_near_hard.clear()

    # -- running statistics ------------------------------------------------------------------
    @property
    def _hat_near_hard(self) -> dict[int, int]:
        """Per slot that has seen a training batch with near-hard masks: the largest such batch
        (process-local: after a load, the next such batch starts the row again)."""
        return self.__dict__.setdefault("_hat_near_hard_batches", {})

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._hat_near_hard.clear()

    def _hat_stat_rows(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row ``slot`` of running_mean, running_var and num_batches_tracked, as views kept
        between forwards in eager mode (``_hat_row_view``: three selects per layer and step saved;
        writes through them reach the buffers)."""
        names = ("running_mean", "running_var", "num_batches_tracked")
        if torch.compiler.is_compiling():
            return tuple(self._buffers[n][slot] for n in names)  # type: ignore[return-value]
        return tuple(self._hat_row_view(n, slot) for n in names)  # type: ignore[return-value]

    def _stats_factor(self, slot: int, deviation: float | None, batch: int) -> float | None:
        """The weight of this training batch (``batch`` samples) in the running statistics of
        ``slot``; None leaves them as they are. ``deviation``: how far the forward's soft masks are
        from the hard ones (None: unknown, torch's rule).

        A near-hard batch as large as the largest before it replaces the statistics: the weights
        move between steps, so only the latest batch describes the network evaluation will run
        (averaging over several lagged behind and left eval far from train accuracy in short
        schedules). A smaller one, an epoch's last, is averaged in by its share."""
        seen = self._hat_near_hard
        if deviation is not None and deviation <= self.stats_tolerance:
            largest = seen[slot] = max(seen.get(slot, 0), batch)
            self._hat_stat_rows(slot)[2].add_(1)
            return batch / largest
        if deviation is not None and slot in seen:
            return None  # a softer forward runs another network than evaluation does
        counted = self._hat_stat_rows(slot)[2]
        counted.add_(1)  # in place on the row's view
        return self.momentum if self.momentum is not None else 1.0 / float(counted)

    def _forward_deviation(self, task: int | None, scale: float | None, source: Any) -> float | None:
        """``forward_deviation`` for this forward; ``source``: a HAT layer feeding this norm."""
        if task is None or not (self.training and self.track_running_stats):
            return None
        if scale is None:
            return 0.0  # hard masks: the network evaluation runs
        if self.refresh_at_task_end and self.__dict__.get("_hat_refreshed", False):
            return None  # the refresh at the task's end replaces the row: torch's rule until then, no device read
        cfg = getattr(source, "hat_config", None)  # not ``or``: a HATConfig's truth value is its length
        if cfg is None:
            cfg = self.__dict__.get("_hat_mask_config")
        return None if cfg is None else forward_deviation(cfg, task, scale)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in self._expected_dims:
            dims = " or ".join(map(str, self._expected_dims))
            raise HATValueError(f"{type(self).__name__} expects a {dims}-d input; got {x.dim()}-d")

    # -- forward -------------------------------------------------------------------------------
    def _hat_forward_payload(self, payload: HATPayload, sel: Selection) -> HATPayload:
        task, scale = sel
        known = payload._unit_mask is not None and payload._unit_dim % payload._raw.dim() == 1
        if is_per_sample(task):
            return self._hat_payload_per_sample(payload, task, scale, known)
        slot = self._hat_slot(task)
        mask = payload._unit_mask if known and task is not None else None
        # a pending mask need not be applied first: folded into the affine, it acts after BN;
        # the layer that made it has reported the task already, through the mask or its output
        folded = mask is not None and payload._mask is not None
        x = payload._raw if folded else payload.data
        if isinstance(payload._src, HATMasked) and "_hat_mask_config" not in self.__dict__:
            self.__dict__["_hat_mask_config"] = payload._src.hat_config  # the masks this norm's input went through
        deviation = self._forward_deviation(task, scale, payload._src)
        y = self._normalize(x, slot, mask, mark=not folded, deviation=deviation,
                            fold=(payload._src, task, scale) if isinstance(payload._src, HATMasked) else None)
        y = self._hat_post_forward(y, mask)
        mask = payload._unit_mask if known else None
        return payload._derive(y, mask=None, unit_mask=mask, unit_dim=1, src=payload._src, repeat=payload._repeat)

    def _hat_forward_tensor(self, x: torch.Tensor, sel: Selection) -> torch.Tensor:
        # the layers feeding this norm may leave their masks (and their probes) to it
        task, scale = sel
        if isinstance(task, torch.Tensor):  # compiled code: the 0-d task buffer, or per-sample ids
            mask = self._hat_map_mask(sel, mark=True)
            return self._hat_post_forward(self._normalize_compiled(x, task, mask), mask)
        if is_per_sample(task):  # each task's samples: its rows, its statistics, its mask
            source = self._hat_unit_map.sources[0] if self._hat_unit_map is not None else None

            def one(xs: torch.Tensor, t: int) -> torch.Tensor:
                m = self._hat_map_mask(Selection(t, scale), mark=True)
                y = self._normalize(xs, t, m, mark=m is None, deviation=self._forward_deviation(t, scale, source))
                return self._hat_post_forward(y, m)
            return grouped(x, task, one)
        slot = self._hat_slot(task)
        unit_map = self._hat_unit_map
        if task is None or unit_map is None:
            y = self._normalize(x, slot, None, deviation=self._forward_deviation(task, scale, None))
            return self._hat_post_forward(y, None)
        mask = self._hat_map_mask(sel, mark=True)
        sources = unit_map.sources
        source = unit_map.identity_of()
        y = self._normalize(x, slot, mask, mark=False,
                            deviation=self._forward_deviation(task, scale, sources[0] if sources else None),
                            fold=(source, task, scale) if isinstance(source, HATMasked) else None)
        return self._hat_post_forward(y, mask)

    def _hat_payload_per_sample(self, input: HATPayload, task: Any, scale: float | None, known: bool) -> HATPayload:
        """A payload with per-sample ids: each task's samples normalized with its rows and
        statistics, the mask of the layer before folded as for that task alone."""
        folded = known and input._mask is not None
        x = input._raw if folded else input.data

        def one(xs: torch.Tensor, t: int) -> torch.Tensor:
            m = input._src._hat_mask_of(Selection(t, scale)) if known else None
            y = self._normalize(xs, t, m, mark=not folded, deviation=self._forward_deviation(t, scale, input._src))
            return self._hat_post_forward(y, m)

        y = grouped(x, task, one)
        return input._derive(y, mask=None, unit_mask=input._unit_mask if known else None, unit_dim=1,
                             src=input._src, repeat=input._repeat)

    def _normalize_compiled(self, x: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``_normalize`` for a slot held in a 0-d tensor: the running statistics of the row are
        updated with index ops (a tensor index gives no view to update in place). A 1-d slot holds
        per-sample ids: ``_normalize_per_sample``."""
        self._check_input_dim(x)
        if slot.dim() == 1:
            return self._normalize_per_sample(x, slot, mask)
        idx = slot.view(1)
        shape = [1, -1] + [1] * (x.dim() - 2)
        weight = bias = None
        if self.affine:
            weight, bias = rows(self, slot, self.weight, self.bias)
            if mask is not None:
                weight, bias = weight * mask, bias * mask
        if self.training or not self.track_running_stats:
            dims = [0, *range(2, x.dim())]
            var, mean = torch.var_mean(x, dim=dims, unbiased=False)
            if self.training and self.track_running_stats:
                with torch.no_grad():
                    n = x.numel() // x.shape[1]
                    self.num_batches_tracked.index_add_(0, idx, torch.ones_like(idx))
                    if self.momentum is None:
                        f = 1.0 / self.num_batches_tracked.index_select(0, idx).to(mean.dtype)
                    else:
                        f = self.momentum
                    old_mean = self.running_mean.index_select(0, idx)
                    old_var = self.running_var.index_select(0, idx)
                    self.running_mean.index_copy_(0, idx, old_mean * (1 - f) + mean.detach().view(1, -1) * f)
                    unbiased = var.detach().view(1, -1) * (n / max(n - 1, 1))
                    self.running_var.index_copy_(0, idx, old_var * (1 - f) + unbiased * f)
            y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
            if weight is not None:
                return y * weight.view(shape) + bias.view(shape)
        else:
            y = F.batch_norm(x, _row(self.running_mean, slot), _row(self.running_var, slot), weight, bias,
                             False, 0.0, self.eps)
            if weight is not None:
                return y
        return y if mask is None else y * mask.view(shape)

    def _normalize_per_sample(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Each sample normalized as in a batch of its task alone, with no Python branch on the ids
        (compiled code): per-task batch statistics by one-hot sums over the batch (training), or
        each sample's task's running statistics (evaluation); each sample's affine row and mask."""
        if ids.shape[0] != x.shape[0]:
            raise HATTypeError(f"task_id holds {ids.shape[0]} per-sample ids for a batch of {x.shape[0]} samples; "
                               "select one id per sample (hat.set_task(model, ids) before each batch)")
        shape = [x.shape[0], -1] + [1] * (x.dim() - 2)
        dims = list(range(2, x.dim()))
        if self.training or not self.track_running_stats:
            slots = self.running_mean.shape[0] if self.running_mean is not None else self.num_tasks + 1
            hot = F.one_hot(ids, slots).to(x.dtype)  # [batch, slots]
            per_unit = x[0, 0].numel()  # values per sample and unit
            count = hot.sum(0) * per_unit  # [slots]
            total = count.clamp_min(1).unsqueeze(1)
            mean = hot.t() @ (x.sum(dims) if dims else x) / total  # [slots, units]
            centered = x - mean.index_select(0, ids).view(shape)
            sq = centered * centered
            var = hot.t() @ (sq.sum(dims) if dims else sq) / total
            y = centered * torch.rsqrt(var.index_select(0, ids) + self.eps).view(shape)
            if self.training and self.track_running_stats:
                with torch.no_grad():
                    present = count > 0
                    self.num_batches_tracked.add_(present.to(self.num_batches_tracked.dtype))
                    if self.momentum is None:
                        f = (1.0 / self.num_batches_tracked.clamp_min(1).to(mean.dtype)).unsqueeze(1)
                    else:
                        f = self.momentum
                    unbiased = var * (count / (count - 1).clamp_min(1)).unsqueeze(1)
                    keep = present.unsqueeze(1)
                    self.running_mean.copy_(torch.where(keep, self.running_mean * (1 - f) + mean * f,
                                                        self.running_mean))
                    self.running_var.copy_(torch.where(keep, self.running_var * (1 - f) + unbiased * f,
                                                       self.running_var))
        else:
            mean = self.running_mean.index_select(0, ids).view(shape)
            y = (x - mean) * torch.rsqrt(self.running_var.index_select(0, ids).view(shape) + self.eps)
        if self.affine:
            weight, bias = rows(self, ids, self.weight, self.bias)  # [batch, units] each; reports the ids
            if mask is not None:
                weight, bias = weight * mask, bias * mask
            return y * weight.view(shape) + bias.view(shape)
        y = self._hat_mark(y, ids)
        return y if mask is None else y * _along(mask, 1, y.dim())

    def _normalize(self, x: torch.Tensor, slot: int, mask: torch.Tensor | None, mark: bool = True,
                   deviation: float | None = None, fold: tuple[Any, int, float | None] | None = None) -> torch.Tensor:
        """``fold``: (the layer whose mask ``mask`` is, task, scale), where the mask may be folded
        together with the other norms' of its config (``_MaskGroup.fold``)."""
        self._check_input_dim(x)
        use_batch_stats = self.training or not self.track_running_stats
        factor: float | None = 0.0
        running_mean = running_var = None
        if self.track_running_stats:
            if self.training:
                factor = self._stats_factor(slot, deviation, x.shape[0])
            if factor is not None:
                running_mean, running_var, _ = self._hat_stat_rows(slot)  # views: row `slot` only
        weight = bias = None
        folded = None
        if self.affine and mask is not None and not mark and fold is not None and fold[2] is not None:
            source, task, scale = fold
            folded = group_of(source.hat_config).fold(self, source, mask, task, scale)
        if folded is not None:
            weight, bias = folded
        elif self.affine:
            weight, bias = rows(self, slot, self.weight, self.bias, mark=mark)
            if mask is not None:
                weight, bias = weight * mask, bias * mask
        y = self._batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, factor or 0.0)
        if mask is not None and not self.affine:
            y = y * _along(mask, 1, y.dim())
        return y

    def _batch_norm(self, x: torch.Tensor, running_mean: Any, running_var: Any, weight: Any, bias: Any,
                    use_batch_stats: bool, factor: float) -> torch.Tensor:
        return F.batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, factor, self.eps)

    def extra_repr(self) -> str:
        return (f"num_tasks={self.num_tasks}, num_features={self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class TaskIndexedBatchNorm1d(_TaskIndexedBatchNorm):
    __doc__ = _TaskIndexedBatchNorm.__doc__
    _hat_base = nn.BatchNorm1d
    _expected_dims = (2, 3)


class TaskIndexedBatchNorm2d(_TaskIndexedBatchNorm):
    __doc__ = _TaskIndexedBatchNorm.__doc__
    _hat_base = nn.BatchNorm2d
    _expected_dims = (4,)


class TaskIndexedBatchNorm3d(_TaskIndexedBatchNorm):
    __doc__ = _TaskIndexedBatchNorm.__doc__
    _hat_base = nn.BatchNorm3d
    _expected_dims = (5,)


class TaskIndexedSyncBatchNorm(_TaskIndexedBatchNorm):
    """``nn.SyncBatchNorm``, task-indexed: in training under ``torch.distributed`` with more than
    one process, the batch statistics of the task's row are computed over every process, as
    torch's SyncBatchNorm does (on GPUs; like it, a CPU input then raises). Otherwise, and in
    evaluation, it is a task-indexed BatchNorm of any dimensionality."""

    _hat_base = nn.SyncBatchNorm
    _expected_dims = (2, 3, 4, 5)

    def __init__(self, num_tasks: int, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group: Any = None,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_tasks, num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    @classmethod
    def _hat_args_of(cls, base: nn.Module) -> dict[str, Any]:
        return dict(super()._hat_args_of(base), process_group=getattr(base, "process_group", None))

    def _hat_default_base(self) -> nn.Module:
        plain = super()._hat_default_base()
        plain.process_group = self.process_group
        return plain

    def _batch_norm(self, x: torch.Tensor, running_mean: Any, running_var: Any, weight: Any, bias: Any,
                    use_batch_stats: bool, factor: float) -> torch.Tensor:
        dist = torch.distributed
        if self.training and use_batch_stats and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            world = dist.get_world_size(group)
            if world > 1:
                if x.device.type == "cpu":
                    raise HATValueError(f"{type(self).__name__} synchronizes statistics on GPUs only, as "
                                        "torch.nn.SyncBatchNorm does; got a CPU input under torch.distributed")
                from torch.nn.modules._functions import SyncBatchNorm as _Sync

                return _Sync.apply(x, weight, bias, running_mean, running_var, self.eps, factor, group, world)
        return super()._batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, factor)


class TaskIndexedLayerNorm(_TaskIndexedNorm):
    """LayerNorm with one ``weight``/``bias`` per task, stacked ``[num_tasks + 1, *normalized_shape]``.

    LayerNorm's statistics mix all units, so a payload's mask is applied before it (units a
    task does not use cannot move that task's statistics) and again after it (they leave as 0).
    """

    _hat_base = nn.LayerNorm

    def __init__(self, num_tasks: int, normalized_shape: Any, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        num_tasks = _num_tasks(num_tasks)
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(s) for s in normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self._hat_init_rows(num_tasks, self.normalized_shape, elementwise_affine, bias, device, dtype)

    @property
    def num_units(self) -> int:
        return self.normalized_shape[-1]

    def _hat_unit_dim(self, ndim: int) -> int | None:
        return ndim - 1 if len(self.normalized_shape) == 1 else None

    @classmethod
    def _hat_args_of(cls, base: nn.Module) -> dict[str, Any]:
        return dict(normalized_shape=base.normalized_shape, eps=base.eps, elementwise_affine=base.elementwise_affine,
                    bias=getattr(base, "bias", None) is not None)

    def _hat_default_base(self) -> nn.Module:
        ref = self.weight
        return nn.LayerNorm(self.normalized_shape, eps=self.eps, elementwise_affine=self.elementwise_affine,
                            bias=self.bias is not None, device=None if ref is None else ref.device,
                            dtype=None if ref is None else ref.dtype)

    def _normalize(self, x: torch.Tensor, slot: Any, mask: torch.Tensor | None) -> torch.Tensor:
        weight, bias = rows(self, slot, self.weight, self.bias)
        if mask is not None and weight is not None and len(self.normalized_shape) == 1:
            weight = weight * mask  # ... and after the norm, folded into the affine
            bias = None if bias is None else bias * mask
            mask = None
        if weight is not None and weight.dim() > len(self.normalized_shape):  # per-sample rows (compiled code)
            return _per_sample_affine(F.layer_norm(x, self.normalized_shape, None, None, self.eps), weight, bias,
                                      mask, -len(self.normalized_shape))
        if isinstance(slot, torch.Tensor) and slot.dim() == 1 and weight is None:
            x = self._hat_mark(x, slot)
            if mask is not None and mask.dim() == 2:
                return _per_sample_affine(F.layer_norm(x, self.normalized_shape, None, None, self.eps), None, None,
                                          mask, -1)
        y = F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        return y if mask is None else y * mask

    def extra_repr(self) -> str:
        return (f"num_tasks={self.num_tasks}, {self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class TaskIndexedLayerNorm2d(TaskIndexedLayerNorm):
    """A LayerNorm over the channels of ``[N, C, H, W]`` inputs (timm's and torchvision's
    ``LayerNorm2d``, ConvNeXt's), task-indexed: the statistics of each position over its ``C``
    channels; per-task ``weight``/``bias`` ``[num_tasks + 1, C]``."""

    def __init__(self, num_tasks: int, num_channels: Any, eps: float = 1e-6, elementwise_affine: bool = True,
                 bias: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_tasks, num_channels, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)

    def _hat_unit_dim(self, ndim: int) -> int | None:
        return 1

    @classmethod
    def _hat_accepts(cls, base: nn.Module) -> bool:
        return isinstance(base, nn.LayerNorm) and len(base.normalized_shape) == 1

    @classmethod
    def _hat_args_of(cls, base: nn.Module) -> dict[str, Any]:
        return dict(num_channels=base.normalized_shape[0], eps=base.eps, elementwise_affine=base.elementwise_affine,
                    bias=getattr(base, "bias", None) is not None)

    def _hat_default_base(self) -> nn.Module:
        raise HATTypeError("TaskIndexedLayerNorm2d has no torch counterpart to unconvert to; convert it from a "
                           "LayerNorm2d module (timm's or torchvision's) to get that module back")

    def _normalize(self, x: torch.Tensor, slot: Any, mask: torch.Tensor | None) -> torch.Tensor:
        return super()._normalize(x.permute(0, 2, 3, 1), slot, mask).permute(0, 3, 1, 2)


class TaskIndexedGroupNorm(_TaskIndexedNorm):
    """GroupNorm with one ``weight``/``bias`` ``[num_tasks + 1, num_channels]`` per task.

    Its statistics mix the channels of a group: the input arrives with the units a task does
    not use at exact 0 (so later tasks cannot move the statistics of earlier ones), and the mask
    is applied again after it, folded into the affine."""

    _hat_base = nn.GroupNorm

    def __init__(self, num_tasks: int, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        num_tasks = _num_tasks(num_tasks)
        if num_channels % num_groups:
            raise HATValueError(f"num_channels={num_channels} must be divisible by num_groups={num_groups}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self._hat_init_rows(num_tasks, (num_channels,), affine, True, device, dtype)

    @property
    def num_units(self) -> int:
        return self.num_channels

    @classmethod
    def _hat_args_of(cls, base: nn.Module) -> dict[str, Any]:
        return dict(num_groups=base.num_groups, num_channels=base.num_channels, eps=base.eps, affine=base.affine)

    def _hat_default_base(self) -> nn.Module:
        ref = self.weight
        return nn.GroupNorm(self.num_groups, self.num_channels, eps=self.eps, affine=self.affine,
                            device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)

    def _normalize(self, x: torch.Tensor, slot: Any, mask: torch.Tensor | None) -> torch.Tensor:
        weight, bias = rows(self, slot, self.weight, self.bias)
        if weight is None and isinstance(slot, torch.Tensor) and slot.dim() == 1:
            x = self._hat_mark(x, slot)
        if mask is not None:  # after the norm, folded into the affine (the mask itself without one)
            weight, bias = (mask, torch.zeros_like(mask)) if weight is None else (weight * mask, bias * mask)
        if weight is not None and weight.dim() == 2:  # per-sample rows (compiled code)
            return _per_sample_affine(F.group_norm(x, self.num_groups, None, None, self.eps), weight, bias, None, 1)
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return (f"num_tasks={self.num_tasks}, num_groups={self.num_groups}, num_channels={self.num_channels}, "
                f"eps={self.eps}, affine={self.affine}")


def _per_sample_affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       mask: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``y * weight + bias`` (then ``* mask``) with one row per sample (``[batch, *units]``), the
    units along ``dim`` of ``y`` (and the dimensions after it, for a LayerNorm's trailing shape)."""
    ref = weight if weight is not None else mask
    lead = dim % y.dim()
    shape = [ref.shape[0], *([1] * (lead - 1)), *ref.shape[1:]]
    shape += [1] * (y.dim() - len(shape))
    if weight is not None:
        y = y * weight.view(shape) + (0 if bias is None else bias.view(shape))
    return y if mask is None else y * mask.view(shape)

