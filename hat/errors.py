"""Exceptions raised by hat.

Each one also subclasses the builtin it refines, so ``except ValueError`` keeps working
for users who do not know about hat's own types.
"""

from __future__ import annotations

__all__ = ["HATError", "HATInitializationError", "HATTypeError", "HATValueError", "InsufficientMaskWarning",
           "LearningSuppressedWarning", "MaskDimensionInferenceWarning", "MaskDimensionMismatchError",
           "MaskerLockedError", "ModuleConversionWarning", "NoParameterToForgetWarning", "TaskIndexError"]


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


# hat-cl's other exception and warning names: importable, so that its users' ``except`` clauses and
# warning filters keep working. HAT-CL reports these situations with the errors above (their bases).
class HATInitializationError(HATValueError):
    """hat-cl's name for a model whose masks cannot be known yet (HAT-CL raises HATValueError)."""


class MaskerLockedError(HATError, RuntimeError):
    """hat-cl's name for changing a locked mask; HAT-CL has no locked masks (protection is exact)."""


class MaskDimensionMismatchError(HATValueError):
    """hat-cl's name for a mask that does not fit the data's shape (HAT-CL raises HATValueError)."""


class LearningSuppressedWarning(UserWarning):
    """hat-cl's name for a warning that a layer cannot learn; HAT-CL does not issue it."""


class MaskDimensionInferenceWarning(UserWarning):
    """hat-cl's name for a mask dimension guessed from the data; HAT-CL does not issue it."""


class InsufficientMaskWarning(UserWarning):
    """hat-cl's name for a mask too small for every task; HAT-CL does not issue it."""
