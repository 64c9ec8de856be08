"""Exceptions and warnings, under hat-cl's module name."""

from __future__ import annotations

from hat._errors import HATError, HATTypeError, HATValueError, TaskIndexError

__all__ = ["HATError", "HATTypeError", "HATValueError", "ModuleConversionWarning", "TaskIndexError"]


class ModuleConversionWarning(UserWarning):
    """A module had no counterpart to convert to and was kept as it is."""
