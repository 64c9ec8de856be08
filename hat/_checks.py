"""Validation of user-supplied task ids and mask scales.

Every public entry point validates with these before it changes anything, so a bad call
leaves modules, buffers and bookkeeping untouched.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from hat.errors import HATTypeError, HATValueError, TaskIndexError


def check_task_id(task_id: Any, num_tasks: int | None, *, name: str = "task_id", allow_none: bool = True) -> int | None:
    """Return ``task_id`` as a Python int (or None), or raise a clear error.

    Accepted: None (when ``allow_none``), Python and numpy integers, 0-d integer tensors.
    Rejected: bool (a common slip: ``True`` is not task 1), floats, strings, other tensors.
    ``num_tasks=None`` checks the type and sign only (the payload does not know num_tasks).
    """
    allowed = "a non-negative int" if num_tasks is None else f"an int in [0, {num_tasks})"
    if task_id is None:
        if allow_none:
            return None
        raise HATTypeError(f"{name} must be {allowed}; got None")
    if isinstance(task_id, torch.Tensor):
        if (task_id.dim() != 0 or task_id.dtype.is_floating_point or task_id.dtype.is_complex
                or task_id.dtype == torch.bool):
            raise HATTypeError(
                f"{name} must be {allowed} or None; got a tensor of dtype {task_id.dtype} and shape "
                f"{tuple(task_id.shape)} (a 0-d integer tensor is accepted)"
            )
        value = int(task_id.item())
    elif isinstance(task_id, bool) or not isinstance(task_id, numbers.Integral):
        raise HATTypeError(f"{name} must be {allowed} or None; got {task_id!r} of type {type(task_id).__name__}")
    else:
        value = int(task_id)
    if value < 0 or (num_tasks is not None and value >= num_tasks):
        raise TaskIndexError(
            f"{name} must be {allowed}; got {value}"
            + (f" (num_tasks={num_tasks})" if num_tasks is not None else "")
            + (". Negative ids are not allowed: -1 would silently mean the last task." if value < 0 else "")
        )
    return value


def check_mask_scale(mask_scale: Any, *, name: str = "mask_scale") -> float | None:
    """Return the scale as a float (None = hard mask), or raise a clear error."""
    if mask_scale is None:
        return None
    if isinstance(mask_scale, torch.Tensor):
        if mask_scale.numel() != 1 or mask_scale.dtype == torch.bool or mask_scale.dtype.is_complex:
            raise HATTypeError(f"{name} must be a positive finite number or None; got a tensor of shape "
                               f"{tuple(mask_scale.shape)}")
        value = float(mask_scale.item())
    elif isinstance(mask_scale, bool) or not isinstance(mask_scale, numbers.Real):
        raise HATTypeError(
            f"{name} must be a positive finite number or None (None = hard mask); "
            f"got {mask_scale!r} of type {type(mask_scale).__name__}"
        )
    else:
        value = float(mask_scale)
    if not math.isfinite(value) or value <= 0:
        raise HATValueError(f"{name} must be a positive finite number or None (None = hard mask); got {value}")
    return value


def check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise HATTypeError(f"{name} must be a positive number; got {value!r} of type {type(value).__name__}")
    if not math.isfinite(float(value)) or value <= 0:
        raise HATValueError(f"{name} must be a positive finite number; got {value!r}")
    return float(value)
