"""HATPayload: a tensor travelling through hand-built HAT networks with its task and mask scale.

A HAT layer returns its output *and* its mask separately; the mask is multiplied in only when
somebody reads ``.data``. A task-indexed norm that follows can therefore fold the mask into its
own scale and shift (one pass over the activations instead of two), and masks end up after the
norm, where the guarantee needs them (a masked 0 that goes through BatchNorm becomes beta).

The payload also records which HAT layer last masked the units of ``data`` (and how often each
unit repeats after a flatten), so the next HAT layer knows its input mask and can protect
exactly the weights that earlier tasks use.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from hat._checks import check_mask_scale
from hat._runtime import RUNTIME
from hat.errors import HATTypeError
from hat.tracking.selection import check_selection, is_per_sample

__all__ = ["HATPayload"]

# Modules that act unit by unit and map 0 to 0: a unit that a mask switched off stays exactly 0.
_ZERO_KEEPING = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
# Unit-wise modules that do not keep 0 at 0: the mask is applied again after them.
_ZERO_MOVING = (nn.Sigmoid, nn.Softplus, nn.Hardsigmoid, nn.LogSigmoid)

class _Unknown:
    """Marks a payload whose units can no longer be traced to a HAT layer (one object, compared with ``is``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __reduce__(self) -> str:
        return "UNKNOWN"  # pickles as this module's name: the same object after loading


UNKNOWN = _Unknown()


class HATPayload:
    """Data plus the task it belongs to, passed between HAT layers.

    Args:
        data: the tensor.
        task_id: the task (an int in ``[0, num_tasks)``), or None for "no task": no masking
            at all (the plain network), and task-indexed norms use a slot of their own; or a 1-D
            integer tensor with one task id per sample (``hat.tracking.selection``).
        mask_scale: the scale ``s`` of the soft mask ``sigmoid(s * e)`` for training, or None
            for the hard (binary) mask used in evaluation.

    Example::

        out = layer(HATPayload(x, task_id=0, mask_scale=10.0))
        y = out.forward_by(nn.ReLU()).data
    """

    __slots__ = ("_data", "_mask", "_raw", "_repeat", "_selection", "_src", "_unit_dim", "_unit_mask", "mask_scale",
                 "task_id")

    def __init__(self, data: torch.Tensor, task_id: Any = None, mask_scale: Any = None) -> None:
        if not isinstance(data, torch.Tensor):
            raise HATTypeError(f"data must be a torch.Tensor; got {type(data).__name__}")
        self._selection = check_selection(task_id, None, batch=data.shape[0] if data.dim() else None)
        # the user's value: an int, None, or the per-sample ids
        self.task_id: Any = self._selection.ids if is_per_sample(self._selection) else self._selection
        self.mask_scale: float | None = check_mask_scale(mask_scale)
        self._raw = data
        self._data: torch.Tensor | None = data
        self._mask: torch.Tensor | None = None  # a unit mask still to be multiplied into _raw
        self._unit_mask: torch.Tensor | None = None  # the mask over the units of data, if known
        self._unit_dim = -1
        self._src: Any = None  # the HAT module that masked these units; None: raw input; UNKNOWN
        self._repeat = 1  # each unit of _src appears this many times in a row (after a flatten)

    # -- construction used by HAT layers ---------------------------------------------------
    def _derive(self, raw: torch.Tensor, *, mask: torch.Tensor | None, unit_mask: torch.Tensor | None,
                unit_dim: int, src: Any, repeat: int = 1) -> HATPayload:
        out = HATPayload.__new__(HATPayload)
        out.task_id = self.task_id
        out._selection = self._selection
        out.mask_scale = self.mask_scale
        out._raw = raw
        out._data = raw if mask is None else None
        out._mask = mask
        out._unit_mask = unit_mask
        out._unit_dim = unit_dim
        out._src = src
        out._repeat = repeat
        return out

    @property
    def data(self) -> torch.Tensor:
        """The tensor, with every pending mask applied."""
        if self._data is None:
            self._data = self._raw * _along(self._mask, self._unit_dim, self._raw.dim())
        return self._data

    def forward_by(self, module: Any, *args: Any, **kwargs: Any) -> HATPayload:
        """Apply ``module`` (HAT or not) and return the result as a payload.

        HAT modules receive the payload itself; any other module receives ``self.data``.
        """
        if getattr(module, "_hat_takes_payload", False):
            return module(self, *args, **kwargs)
        x = self.data
        y = module(x, *args, **kwargs)
        if not isinstance(y, torch.Tensor):
            raise HATTypeError("forward_by expects the module to return a tensor; "
                            f"{type(module).__name__} returned {type(y).__name__}")
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and self.task_id is not None:
            _warn_shared_norm(module)
        return self._after(module, x, y)

    def _after(self, module: Any, x: torch.Tensor, y: torch.Tensor) -> HATPayload:
        src, unit_mask, dim = self._src, self._unit_mask, self._unit_dim
        if src is None or src is UNKNOWN or unit_mask is None:
            return self._derive(y, mask=None, unit_mask=None, unit_dim=-1, src=src if src is None else UNKNOWN)
        d = dim % x.dim()
        if isinstance(module, _ZERO_KEEPING + _ZERO_MOVING) and y.dim() == x.dim() and y.shape[d] == x.shape[d]:
            pending = unit_mask if isinstance(module, _ZERO_MOVING) else None
            return self._derive(y, mask=pending, unit_mask=unit_mask, unit_dim=dim, src=src, repeat=self._repeat)
        if (isinstance(module, nn.Flatten) and d == module.start_dim % x.dim()
                and module.end_dim % x.dim() == x.dim() - 1):
            # channel-major flatten: every unit repeats over the flattened positions
            per_unit = math.prod(x.shape[d + 1:])
            return self._derive(y, mask=None, unit_mask=unit_mask.repeat_interleave(per_unit, dim=-1), unit_dim=d,
                                src=src, repeat=self._repeat * per_unit)
        return self._derive(y, mask=None, unit_mask=None, unit_dim=-1, src=UNKNOWN)

    def __repr__(self) -> str:
        return (f"HATPayload(data=<tensor {tuple(self._raw.shape)}>, task_id={self.task_id}, "
                f"mask_scale={self.mask_scale})")


def _along(mask: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """View a unit mask (``[units]``, or ``[batch, units]`` per sample) so that it broadcasts along
    ``dim`` of an ``ndim``-d tensor (whose dimension 0 is the batch)."""
    d = dim % ndim
    if mask.dim() == 2:
        return mask.view(mask.shape[0], *([1] * (d - 1)), mask.shape[1], *([1] * (ndim - d - 1)))
    if d == ndim - 1:
        return mask
    return mask.view(mask.shape[0], *([1] * (ndim - d - 1)))


def _warn_shared_norm(module: nn.Module) -> None:
    if id(module) in RUNTIME.warned_norms:
        return
    RUNTIME.warned_norms.add(id(module))
    warnings.warn(
        f"{type(module).__name__} is shared by every task: its running statistics change while later tasks "
        "train, so earlier tasks' outputs will change. Use hat.modules.TaskIndexedBatchNorm* instead.",
        stacklevel=3,
    )
