"""hat-cl's module name for the exceptions and warnings: the same classes as ``hat.errors``."""

from __future__ import annotations

from hat.errors import (
    HATError,
    HATInitializationError,
    HATTypeError,
    HATValueError,
    InsufficientMaskWarning,
    LearningSuppressedWarning,
    MaskDimensionInferenceWarning,
    MaskDimensionMismatchError,
    MaskerLockedError,
    ModuleConversionWarning,
    NoParameterToForgetWarning,
    TaskIndexError,
)

__all__ = ["HATError", "HATInitializationError", "HATTypeError", "HATValueError", "InsufficientMaskWarning",
           "LearningSuppressedWarning", "MaskDimensionInferenceWarning", "MaskDimensionMismatchError",
           "MaskerLockedError", "ModuleConversionWarning", "NoParameterToForgetWarning", "TaskIndexError"]
