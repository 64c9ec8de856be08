"""What every task-aware layer shares: one dispatcher for its input (``TaskModule``) and, for the
layers with a learnable mask per task, the one mask path (``HATMasked``).

The dispatcher: a payload goes to ``_hat_forward_payload`` with the payload's task, checked; a
tensor to ``_hat_forward_tensor`` with the task ``hat.set_task`` selected (in compiled code the
0-d buffers ``hat_task``/``hat_scale``), recorded by the first-call trace when one is under way.
A layer writes those two methods and nothing else about routing.

The mask path: ``HATMasked._hat_masks`` gives the mask of a selection (one task, per-sample ids,
the compiled buffers, or none) at a scale (None: hard), and says whether it already reports the
task to the layer's probe. Its branches are small: the compiled one has no Python branch on the
task's value, the per-sample one gathers one row per sample, and the eager one takes the mask of
the config's group node (``hat.masks.group``) when grad is on.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from hat._checks import check_task_id
from hat.config import HATConfig
from hat.errors import HATTypeError
from hat.masks import units as _units
from hat.masks.gate import flush, soft_or_hard
from hat.masks.group import group_of
from hat.payload import UNKNOWN, HATPayload, _along
from hat.tracking import recording
from hat.tracking.selection import is_per_sample
from hat.tracking.tracked import Selection, TaskTracked, _active_ddp, invalidate

__all__ = ["HATMasked", "TaskModule"]

_FED_FROM_MANY = "fed from different layers in different calls"


class TaskModule(TaskTracked):
    """A task-aware layer whose forward is the shared dispatcher."""

    def forward(self, input: Any, *args: Any, **kwargs: Any) -> Any:
        return self._hat_dispatch(input, *args, **kwargs)

    def _hat_dispatch(self, input: Any, *args: Any, **kwargs: Any) -> Any:
        ddp = _active_ddp()
        if ddp is not None:
            self._hat_check_ddp(ddp)
        if isinstance(input, HATPayload):
            return self._hat_forward_payload(input, self._hat_begin(input), *args, **kwargs)
        rec = recording.active()
        if rec is not None:
            return self._hat_record(rec, input, *args, **kwargs)
        return self._hat_forward_tensor(input, self._hat_selected(), *args, **kwargs)

    def _hat_record(self, rec: Any, input: Any, *args: Any, **kwargs: Any) -> Any:
        """The tensor forward, under the first-call trace ``rec``."""
        return rec.call(self, input, lambda x: self._hat_forward_tensor(x, self._hat_selected(), *args, **kwargs))

    def _hat_forward_payload(self, payload: HATPayload, sel: Selection, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def _hat_forward_tensor(self, x: Any, sel: Selection, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


def probe_slot(sel: Selection, num_tasks: int, device: torch.device) -> Any:
    """What a forward with ``sel`` reports to a probe: the task, the no-task slot, per-sample ids
    (on ``device``) or, in compiled code, the 0-d task buffer."""
    task = sel.task
    if task is None:
        return num_tasks
    if is_per_sample(task):
        return task.ids.to(device)
    return task


class HATMasked(TaskModule):
    """A module with one learnable mask per task over its ``units`` output units.

    ``mask(t, s) = gate(s * e[t])`` with ``e = task_embedding`` of shape ``[num_tasks, units]``;
    the hard mask (``s = None``) is ``e[t] > 0``.
    """

    hat_config: HATConfig
    _hat_row_params = ("task_embedding",)
    _hat_default_mask_dim: ClassVar[int] = -1
    _hat_needs_soft_mask = True

    def _hat_init_mask(self, hat_config: HATConfig, units: int, device: Any = None, dtype: Any = None) -> None:
        self.hat_config = hat_config
        self.task_embedding = nn.Parameter(torch.empty(hat_config.num_tasks, units, device=device, dtype=dtype))
        # where this layer's input units come from: set by the first trace or payload forward
        self.__dict__["_hat_link"] = None
        self._hat_init_tracking(hat_config.num_tasks, device)
        self.reset_task_embedding()

    @property
    def mask_dim(self) -> int:
        dim = self.hat_config.mask_dim
        return self._hat_default_mask_dim if dim is None else dim

    def reset_task_embedding(self) -> None:
        invalidate(self)
        with torch.no_grad():
            strat = self.hat_config.init_strat
            if strat == "normal":
                self.task_embedding.normal_(0.0, 1.0)
            elif strat == "dense":
                self.task_embedding.fill_(1.0)
            else:  # sparse: every unit starts off
                self.task_embedding.fill_(-1.0)

    # -- the mask path ---------------------------------------------------------------------
    def get_mask(self, task_id: Any, mask_scale: float | None = None) -> torch.Tensor:
        """The mask of ``task_id`` over this layer's units: soft for a scale, hard for None."""
        task = check_task_id(task_id, self.num_tasks, allow_none=False)
        return self._hat_mask(task, mask_scale)

    def _hat_mask(self, task: int, scale: float | None) -> torch.Tensor:
        return self._hat_masks(Selection(task, scale))[0]

    def _hat_masks(self, sel: Selection, mark: bool = False) -> tuple[torch.Tensor | None, bool]:
        """The mask of selection ``sel`` (None for no task): ``[units]`` for one task, ``[batch,
        units]`` for per-sample ids. With ``mark`` the mask reports the task to this layer's probe
        where it can; the second value says whether it did (else the caller reports it)."""
        task, scale = sel
        emb = self.task_embedding
        cfg = self.hat_config
        if isinstance(task, torch.Tensor):  # compiled code: the 0-d task and scale buffers
            mask = self._hat_mask_compiled(task, scale)
            return (self._hat_mark(mask, task), True) if mark else (mask, False)
        if task is None:
            return None, False
        if is_per_sample(task):  # one row per sample
            ids = task.ids.to(emb.device)
            mask = soft_or_hard(cfg, emb.index_select(0, ids), scale)
            return (self._hat_mark(mask, ids), True) if mark else (mask, False)
        if (mark and scale is not None and cfg.gate is torch.sigmoid and emb.requires_grad and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            return group_of(cfg).mask(self, task, scale), True  # every layer of the config in one node
        return soft_or_hard(cfg, emb[task], scale), False

    def _hat_mask_of(self, sel: Selection, mark: bool = False) -> torch.Tensor | None:
        """``_hat_masks``' mask; with ``mark`` it always reports the task (for a layer whose mask
        the norm after it applies, and whose own output is not marked)."""
        mask, marked = self._hat_masks(sel, mark)
        if mark and not marked and mask is not None:
            mask = self._hat_mark(mask, probe_slot(sel, self.num_tasks, mask.device))
        return mask

    def _hat_mask_compiled(self, task: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The mask for a task and scale held in 0-d tensors (``hat_task``, ``hat_scale``): no Python
        branch on their values, so torch.compile traces it once for every task and scale. Slot
        ``num_tasks`` ("no task") gives ones; scale 0 the hard mask."""
        per_sample = task.dim() == 1  # per-sample ids (all tasks): ``[batch, units]``
        index = task if per_sample else task.clamp(max=self.num_tasks - 1).view(1)
        e = self.task_embedding.index_select(0, index)
        e = e if per_sample else e.squeeze(0)
        hard = (e > 0).to(e.dtype)
        if e.requires_grad and torch.is_grad_enabled():
            soft = soft_or_hard(self.hat_config, e, scale)
        else:
            soft = flush(self.hat_config.gate(scale * e))
        mask = torch.where(scale > 0, soft, hard)
        return mask if per_sample else torch.where(task < self.num_tasks, mask, torch.ones_like(mask))

    def _hat_apply_mask(self, y: torch.Tensor, sel: Selection) -> torch.Tensor:
        """``y`` times the mask of ``sel`` along ``mask_dim``, the task reported to the probe (no
        task: ``y`` itself, reported as the no-task slot)."""
        mask, marked = self._hat_masks(sel, mark=True)
        if mask is None:
            return self._hat_mark(y, self.num_tasks)
        if mask.dim() == 2 and mask.shape[0] != y.shape[0]:  # per-sample ids (a static shape check when compiled)
            raise HATTypeError(f"task_id holds {mask.shape[0]} per-sample ids for a batch of {y.shape[0]} samples; "
                               "select one id per sample (hat.set_task(model, ids) before each batch)")
        if not marked:
            y = self._hat_mark(y, sel.task)
        return y * _along(mask, self.mask_dim, y.dim())

    def _hat_masked_payload(self, payload: HATPayload, y: torch.Tensor, sel: Selection) -> HATPayload:
        """A payload carrying ``y`` and, pending, the mask of ``sel`` (applied when ``.data`` is read,
        or folded into a task-indexed BatchNorm's affine)."""
        mask, marked = self._hat_masks(sel, mark=True)
        if mask is None:
            return payload._derive(self._hat_mark(y, self.num_tasks), mask=None, unit_mask=None, unit_dim=-1, src=None)
        if not marked:
            y = self._hat_mark(y, sel.task)
        return payload._derive(y, mask=mask, unit_mask=mask, unit_dim=self.mask_dim, src=self)

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

    def _hat_in_units(self) -> int:
        raise NotImplementedError

    # -- where the input units come from (protection per input unit) ---------------------------
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
            invalidate(self)  # the protected inputs of this layer are now known
        elif old.dense_reason != _FED_FROM_MANY and not old.same_as(link):
            self.__dict__["_hat_link"] = _units.dense(link.size, _FED_FROM_MANY)
            invalidate(self)

    def _hat_cache_generation(self) -> tuple[int, ...]:
        """This layer's generation and those of the layers its input units come from: their
        embeddings decide which of its input columns are protected."""
        own = self.__dict__.get("_hat_generation", 0)
        link = self.__dict__.get("_hat_link")
        if link is None:
            return (own,)
        return (own, *(s.__dict__.get("_hat_generation", 0) for s in link.sources))

    def _hat_input_used(self, protected: torch.Tensor, in_units: int) -> torch.Tensor | None:
        """The input units used by the protected tasks (bool ``[in_units]``; positions that no mask
        reaches count as used), or None where they cannot be known: whole rows of used units."""
        link = self.__dict__.get("_hat_link")
        if link is None or link.size != in_units:
            return None
        if any(s.num_tasks != self.num_tasks for s in link.sources):
            return None
        return link.used(protected)
