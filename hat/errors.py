"""Exceptions raised by hat.

Each one also subclasses the builtin it refines, so ``except ValueError`` keeps working
for users who do not know about hat's own types.
"""

from __future__ import annotations

__all__ = ["HATError", "HATTypeError", "HATValueError", "ModuleConversionWarning", "NoParameterToForgetWarning",
           "TaskIndexError"]


class HATError(Exception):
    """Base class of every error hat raises on purpose."""


class HATTypeError(HATError, TypeError):
    """An argument has the wrong type."""


class HATValueError(HATError, ValueError):
    """An argument has the right type but a value that is not allowed."""


class TaskIndexError(HATError, IndexError):
    """A task id outside ``[0, num_tasks)``."""


class ModuleConversionWarning(UserWarning):
    """A module had no counterpart to convert to and was kept as it is (hat-cl's warning)."""


class NoParameterToForgetWarning(UserWarning):
    """Forgetting a task released no weight or bias entry: every unit it used is also used by a
    task that stays (its own rows, embeddings and trained flag are reset all the same)."""
