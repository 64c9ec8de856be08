"""The first-call trace under way, as a context variable: the layers ask it whether to record
(``hat.convert.trace`` sets it); nothing here imports the trace."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import torch

RECORDER: ContextVar[Any] = ContextVar("hat_trace", default=None)


def active() -> Any:
    """The recording under way, if any (a compiled forward never records: the trace runs eagerly
    before it, so compiled code does not read the variable)."""
    return None if torch.compiler.is_compiling() else RECORDER.get()
