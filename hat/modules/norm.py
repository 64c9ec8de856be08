"""Task-indexed normalization: per-task affine parameters and running statistics."""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hat import _trace
from hat._checks import check_task_id
from hat._core import HATMasked, TaskTracked, _row, forward_deviation, rows
from hat._errors import HATTypeError
from hat.config import HATConfig
from hat.payload import HATPayload, _along

__all__ = [
    "TaskIndexedBatchNorm1d", "TaskIndexedBatchNorm2d", "TaskIndexedBatchNorm3d", "TaskIndexedLayerNorm",
]


def _num_tasks(num_tasks: Any) -> int:
    return HATConfig(num_tasks=num_tasks).num_tasks


class _TaskIndexedBatchNorm(TaskTracked, nn.Module):
    """BatchNorm with one set of ``weight``/``bias``/running statistics per task.

    Every per-task tensor is stacked as ``[num_tasks + 1, num_features]``; the last row belongs
    to ``task_id=None``. Training on task ``t`` writes row ``t`` of the running statistics only.
    When the input is a payload whose units a HAT layer masks, the mask is folded into this
    layer's scale and shift, so it acts *after* the normalization: a unit that task ``t`` does
    not use leaves as an exact 0 (masking before BN would turn it into ``beta``).

    Running statistics describe the network that evaluation runs, with hard masks:

    - in training, a batch of task ``t`` sets row ``t`` when the soft masks of its forward are
      about as close to the hard ones as at the end of the scale schedule (the mean over every
      unit of ``|mask - hard mask|``, read once per step from the mask node, exceeds its value at
      ``max_trn_mask_scale`` by at most ``stats_tolerance``): the latest such batch replaces the
      row (a smaller one is averaged in by its share of samples). With the scale annealed from ``1/s_max``
      in every epoch, the early batches of each epoch run another network (units half on,
      activations at other scales), and the weights move from step to step, so an average over
      many batches describes neither. Batches with softer masks count (by torch's rule) only
      until the first near-hard one; ``momentum`` applies to them and to ``task_id=None``.
    - in a model converted with ``hat.convert`` (or a ``hat_*`` timm model), when a task's training
      ends (the model's next call evaluates, or trains another task), its rows are taken once
      more from the latest training batches, forwarded with the final weights and hard masks.

    Not a subclass of ``nn.BatchNorm*``: its parameters have an extra task dimension, and
    utilities written for BatchNorm (fusing into convolutions, freezing) would misread them.
    """

    #: how much further from the hard masks than at ``max_trn_mask_scale`` (mean over units) the
    #: soft masks of a training forward may be for its batch to enter the running statistics
    stats_tolerance: float = 0.01

    _hat_row_params = ("weight", "bias")
    _expected_dims: tuple[int, ...] = ()
    # set by the trace of a converted model: the masked layers whose units reach this norm
    _hat_sources: tuple[Any, ...] = ()

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
        if affine:
            self.weight = nn.Parameter(torch.ones(slots, num_features, **kw))
            self.bias = nn.Parameter(torch.zeros(slots, num_features, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(slots, num_features, **kw))
            self.register_buffer("running_var", torch.ones(slots, num_features, **kw))
            self.register_buffer("num_batches_tracked", torch.zeros(slots, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._hat_init_tracking(num_tasks, device)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()
        self._hat_near_hard.clear()

    @property
    def _hat_near_hard(self) -> dict[int, int]:
        """Per slot that has seen a training batch with near-hard masks: the largest such batch
        (process-local: after a load, the next such batch starts the row again)."""
        return self.__dict__.setdefault("_hat_near_hard_batches", {})

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._hat_near_hard.clear()

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
            self.num_batches_tracked[slot].add_(1)
            return batch / largest
        if deviation is not None and slot in seen:
            return None  # a softer forward runs another network than evaluation does
        counted = self.num_batches_tracked[slot]
        counted.add_(1)  # in place on the row's view: two ops, not three
        return self.momentum if self.momentum is not None else 1.0 / float(counted)

    def _forward_deviation(self, task: int | None, scale: float | None, source: Any) -> float | None:
        """``forward_deviation`` for this forward; ``source``: a HAT layer feeding this norm."""
        if task is None or not (self.training and self.track_running_stats):
            return None
        if scale is None:
            return 0.0  # hard masks: the network evaluation runs
        cfg = getattr(source, "hat_config", None) or self.__dict__.get("_hat_mask_config")
        return None if cfg is None else forward_deviation(cfg, task, scale)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in self._expected_dims:
            raise ValueError(f"{type(self).__name__} expects a {' or '.join(map(str, self._expected_dims))}-d input; got {x.dim()}-d")

    def forward(self, input: Any) -> Any:
        if isinstance(input, HATPayload):
            task, scale = self._hat_begin(input)
            slot = self._hat_slot(task)
            known = input._unit_mask is not None and input._unit_dim % input._raw.dim() == 1
            mask = input._unit_mask if known and task is not None else None
            # a pending mask need not be applied first: folded into the affine, it acts after BN;
            # the layer that made it has reported the task already, through the mask or its output
            folded = mask is not None and input._mask is not None
            x = input._raw if folded else input.data
            if isinstance(input._src, HATMasked) and "_hat_mask_config" not in self.__dict__:
                self.__dict__["_hat_mask_config"] = input._src.hat_config  # the masks this norm's input went through
            y = self._normalize(x, slot, mask, mark=not folded,
                                deviation=self._forward_deviation(task, scale, input._src))
            mask = input._unit_mask if known else None
            return input._derive(y, mask=None, unit_mask=mask, unit_dim=1, src=input._src, repeat=input._repeat)
        if _trace.ACTIVE is not None:
            return _trace.ACTIVE.call(self, input, self._hat_forward_tensor)
        return self._hat_forward_tensor(input)

    def _hat_forward_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            slot = self.hat_task
            mask = _sources_mask(self._hat_sources)
            return self._normalize_compiled(x, slot, mask)
        task, scale = self._hat_state
        slot = self._hat_slot(task)
        sources = self._hat_sources
        if task is None or not sources:
            return self._normalize(x, slot, None, deviation=self._forward_deviation(task, scale, None))
        # the layers feeding this norm leave their masks (and their probes) to it
        mask = _sources_mask(sources, mark=True)
        return self._normalize(x, slot, mask, mark=False, deviation=self._forward_deviation(task, scale, sources[0]))

    def _normalize_compiled(self, x: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``_normalize`` for a slot held in a 0-d tensor: the running statistics of the row are
        updated with index ops (a tensor index gives no view to update in place)."""
        self._check_input_dim(x)
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

    def _normalize(self, x: torch.Tensor, slot: int, mask: torch.Tensor | None, mark: bool = True,
                   deviation: float | None = None) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch_stats = self.training or not self.track_running_stats
        factor: float | None = 0.0
        running_mean = running_var = None
        if self.track_running_stats:
            if self.training:
                factor = self._stats_factor(slot, deviation, x.shape[0])
            if factor is not None:
                running_mean, running_var = self.running_mean[slot], self.running_var[slot]  # views: row `slot` only
        weight = bias = None
        if self.affine:
            weight, bias = rows(self, slot, self.weight, self.bias, mark=mark)
            if mask is not None:
                weight, bias = weight * mask, bias * mask
        y = F.batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, factor or 0.0, self.eps)
        if mask is not None and not self.affine:
            y = y * _along(mask, 1, y.dim())
        return y

    @classmethod
    def from_base_module(cls, base_module: nn.Module, hat_config: Any = None, num_tasks: Any = None,
                         **kwargs: Any) -> _TaskIndexedBatchNorm:
        """Every task slot (and the no-task slot) starts from ``base_module``'s affine parameters and
        running statistics. Any BatchNorm of the right dimensionality converts (SyncBatchNorm
        too); one with submodules (a fused activation) needs a mapping class that keeps them."""
        from hat.modules.linear import _num_tasks_from

        n = _num_tasks_from(cls, hat_config, num_tasks)
        if not isinstance(base_module, nn.modules.batchnorm._BatchNorm):
            raise HATTypeError(f"{cls.__name__}.from_base_module expects a BatchNorm; got {type(base_module).__name__}")
        children = [name for name, _ in base_module.named_children()]
        if children:
            raise HATTypeError(f"{cls.__name__}.from_base_module: {type(base_module).__name__} has submodules "
                               f"({', '.join(children)}) that a task-indexed BatchNorm would drop; map it to a class "
                               "that keeps them")
        ref = base_module.weight if base_module.weight is not None else base_module.running_mean
        new = cls(n, base_module.num_features, eps=base_module.eps, momentum=base_module.momentum,
                  affine=base_module.affine, track_running_stats=base_module.track_running_stats,
                  device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                src, dst = getattr(base_module, name, None), getattr(new, name, None)
                if src is not None and dst is not None:
                    dst.copy_(src.detach().expand_as(dst))
        if hat_config is not None:
            new.__dict__["_hat_mask_config"] = hat_config  # the masks of the model it is converted with
        new.train(base_module.training)
        return new

    def to_base_module(self, task_id: Any = None, **kwargs: Any) -> nn.Module:
        """The torch BatchNorm of ``task_id`` (its row of parameters and statistics), with the hard
        masks this norm applies folded into its affine (``task_id=None``: the no-task slot)."""
        task = check_task_id(task_id, self.num_tasks)
        slot = self._hat_slot(task)
        mask = _hard_sources_mask(self._hat_sources, task)
        ref = self.weight if self.weight is not None else self.running_mean
        plain = self._hat_base(self.num_features, eps=self.eps, momentum=self.momentum,
                               affine=self.affine or mask is not None, track_running_stats=self.track_running_stats,
                               device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        with torch.no_grad():
            if self.affine:
                plain.weight.copy_(self.weight[slot])
                plain.bias.copy_(self.bias[slot])
            if mask is not None:
                plain.weight.mul_(mask)
                plain.bias.mul_(mask)
            if self.track_running_stats:
                plain.running_mean.copy_(self.running_mean[slot])
                plain.running_var.copy_(self.running_var[slot])
                plain.num_batches_tracked.copy_(self.num_batches_tracked[slot])
        plain.train(self.training)
        return plain

    def extra_repr(self) -> str:
        return (f"num_tasks={self.num_tasks}, num_features={self.num_features}, eps={self.eps}, momentum={self.momentum}, "
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


class TaskIndexedLayerNorm(TaskTracked, nn.Module):
    """LayerNorm with one ``weight``/``bias`` per task, stacked ``[num_tasks + 1, *normalized_shape]``.

    LayerNorm's statistics mix all units, so a payload's mask is applied before it (units a
    task does not use cannot move that task's statistics) and again after it (they leave as 0).
    """

    _hat_row_params = ("weight", "bias")
    _hat_sources: tuple[Any, ...] = ()

    def __init__(self, num_tasks: int, normalized_shape: Any, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        num_tasks = _num_tasks(num_tasks)
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(s) for s in normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw = dict(device=device, dtype=dtype)
        slots = num_tasks + 1
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(slots, *self.normalized_shape, **kw))
            self.bias = nn.Parameter(torch.zeros(slots, *self.normalized_shape, **kw)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self._hat_init_tracking(num_tasks, device)

    def forward(self, input: Any) -> Any:
        if isinstance(input, HATPayload):
            task, _ = self._hat_begin(input)
            slot = self._hat_slot(task)
            x = input.data  # masked before the norm
            mask = input._unit_mask if task is not None and input._unit_dim % x.dim() == x.dim() - 1 else None
            y = self._normalize(x, slot, mask)  # reports the slot to the probe
            return input._derive(y, mask=None, unit_mask=mask, unit_dim=-1, src=input._src, repeat=input._repeat)
        if _trace.ACTIVE is not None:
            return _trace.ACTIVE.call(self, input, self._hat_forward_tensor)
        return self._hat_forward_tensor(input)

    def _hat_forward_tensor(self, x: torch.Tensor) -> torch.Tensor:
        # the input arrives masked by the layers that feed it; the union of their masks is
        # applied again after the norm
        if torch.compiler.is_compiling():
            slot: Any = self.hat_task
            mask = _sources_mask(self._hat_sources)
        else:
            task, _ = self._hat_state
            slot = self._hat_slot(task)
            mask = None if task is None else _sources_mask(self._hat_sources)
        return self._normalize(x, slot, mask)

    def _normalize(self, x: torch.Tensor, slot: Any, mask: torch.Tensor | None) -> torch.Tensor:
        weight, bias = rows(self, slot, self.weight, self.bias)
        if mask is not None and weight is not None and len(self.normalized_shape) == 1:
            weight = weight * mask  # ... and after the norm, folded into the affine
            bias = None if bias is None else bias * mask
            mask = None
        y = F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        return y if mask is None else y * mask

    @classmethod
    def from_base_module(cls, base_module: nn.Module, hat_config: Any = None, num_tasks: Any = None,
                         **kwargs: Any) -> TaskIndexedLayerNorm:
        """Every task slot (and the no-task slot) starts from ``base_module``'s weight and bias."""
        from hat.modules.linear import _num_tasks_from

        n = _num_tasks_from(cls, hat_config, num_tasks)
        if not isinstance(base_module, nn.LayerNorm):
            raise HATTypeError(f"{cls.__name__}.from_base_module expects an nn.LayerNorm; got {type(base_module).__name__}")
        w = base_module.weight
        new = cls(n, base_module.normalized_shape, eps=base_module.eps,
                  elementwise_affine=base_module.elementwise_affine, bias=base_module.bias is not None,
                  device=None if w is None else w.device, dtype=None if w is None else w.dtype)
        with torch.no_grad():
            if w is not None:
                new.weight.copy_(w.detach().expand_as(new.weight))
            if base_module.bias is not None and new.bias is not None:
                new.bias.copy_(base_module.bias.detach().expand_as(new.bias))
        new.train(base_module.training)
        return new

    def to_base_module(self, task_id: Any = None, **kwargs: Any) -> nn.Module:
        """The nn.LayerNorm of ``task_id`` with the hard masks this norm applies folded in."""
        task = check_task_id(task_id, self.num_tasks)
        slot = self._hat_slot(task)
        mask = _hard_sources_mask(self._hat_sources, task)
        has_bias = self.bias is not None or mask is not None
        ref = self.weight
        plain = nn.LayerNorm(self.normalized_shape, eps=self.eps,
                             elementwise_affine=self.elementwise_affine or mask is not None, bias=has_bias,
                             device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        with torch.no_grad():
            if self.weight is not None:
                plain.weight.copy_(self.weight[slot])
            if self.bias is not None:
                plain.bias.copy_(self.bias[slot])
            elif has_bias:
                plain.bias.zero_()
            if mask is not None:
                plain.weight.mul_(mask)
                plain.bias.mul_(mask)
        plain.train(self.training)
        return plain

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, {self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


def _sources_mask(sources: tuple[Any, ...], mark: bool = False) -> torch.Tensor | None:
    """The union (elementwise max) of the current masks of ``sources``; None without sources.
    ``mark`` (eager): each mask reports the task to its layer's probe."""
    mask = None
    for src in sources:
        m = src._hat_current_mask(mark)
        mask = m if mask is None else torch.maximum(mask, m)
    return mask


def _hard_sources_mask(sources: tuple[Any, ...], task: int | None) -> torch.Tensor | None:
    if task is None or not sources:
        return None
    with torch.no_grad():
        mask = None
        for src in sources:
            m = src._hat_mask(task, None)
            mask = m if mask is None else torch.maximum(mask, m)
    return mask
