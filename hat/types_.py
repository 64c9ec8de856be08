"""hat-cl's ``hat.types_``: ``ForgetResult`` (what forgetting a task changed), and ``HATConfig``
and ``Mask`` under the names hat-cl's users import them by."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import torch

from hat.config import HATConfig
from hat.errors import HATTypeError, HATValueError, NoParameterToForgetWarning

__all__ = ["ForgetResult", "HATConfig", "Mask", "NoParameterToForgetWarning"]

#: a unit mask: soft (float in [0, 1]) or hard (bool)
Mask = Union[torch.FloatTensor, torch.BoolTensor]


class ForgetResult(dict):
    """What forgetting changed: a dict from the name of a parameter or buffer (``"fc1.weight"``,
    ``"bn.running_mean"``, ``"fc1.task_embedding"``) to a bool tensor of its shape, True where an
    entry was (or, in a dry run, would be) reset or re-initialised.

    Results add up: ``a + b`` holds every name of both, entries True in either (hat-cl's
    accumulation over several forgotten tasks).

        result = hat.forget_task(model, 2)
        result.get_num_forgotten("weight")      # (entries reset, entries in all "weight" tensors)
    """

    def __init__(self, entries: Mapping[str, torch.Tensor] | None = None, /, **kwargs: torch.Tensor) -> None:
        super().__init__()
        for name, value in {**dict(entries or {}), **kwargs}.items():
            self[name] = value

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        if not isinstance(name, str):
            raise HATTypeError(f"ForgetResult keys must be parameter names (str); got {name!r}")
        if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
            got = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise HATTypeError(f"ForgetResult[{name!r}] must be a bool tensor (True: reset); got {got}")
        super().__setitem__(name, value)

    def get_num_forgotten(self, keyword: str) -> tuple[int, int]:
        """(entries reset, entries in all) of the tensor named ``keyword``, or, when no name is
        exactly ``keyword``, summed over every name one of whose dotted parts is ``keyword``
        (``"weight"`` counts ``fc1.weight`` and ``conv.weight``). KeyError when none matches."""
        if keyword in self:
            value = self[keyword]
            return int(value.sum()), value.numel()
        matches = [v for k, v in self.items() if keyword in k.split(".")]
        if not matches:
            raise KeyError(f"no entry of this ForgetResult is named {keyword!r} or has a part {keyword!r}; "
                           f"names: {sorted(self)[:8]}")
        return sum(int(v.sum()) for v in matches), sum(v.numel() for v in matches)

    def __add__(self, other: Any) -> ForgetResult:
        if not isinstance(other, ForgetResult):
            return NotImplemented
        out = ForgetResult(self)
        for name, value in other.items():
            mine = out.get(name)
            if mine is None:
                out[name] = value
            elif mine.shape != value.shape:
                raise HATValueError(f"cannot add ForgetResults: {name} has shape {tuple(mine.shape)} in one and "
                                    f"{tuple(value.shape)} in the other")
            else:
                out[name] = mine | value.to(mine.device)
        return out

    def __repr__(self) -> str:
        lines = [f"  {name}: {int(v.sum())}/{v.numel()}" for name, v in sorted(self.items())]
        return "ForgetResult(\n" + "\n".join(lines) + ("\n" if lines else "") + ")"
