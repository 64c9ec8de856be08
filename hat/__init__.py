"""HAT-CL: continual learning with Hard Attention to the Task (Serra et al., ICML 2018).

Every earlier task's outputs stay bit-identical while later tasks train, with any torch.optim
optimizer created once for the whole task sequence.
"""

from __future__ import annotations

from hat import modules, task_prediction, types_, utils
from hat.compress import CompressResult, compress
from hat.config import HATConfig
from hat.convert.api import convert, set_task, task, unconvert
from hat.convert.capacity import LayerCapacity, TaskCapacity, capacity
from hat.convert.coverage import LayerCoverage, coverage
from hat.convert.prune import PruneReport, prune, prune_report
from hat.errors import HATError, HATTypeError, HATValueError, TaskIndexError
from hat.forget import forget_task
from hat.modules.task_parameter import TaskIndexedParameter
from hat.payload import HATPayload
from hat.protect.hooks import condition_gradients, mark_trained, trained_tasks
from hat.task_prediction import Prediction, TaskPrediction, fit_task_scores, predict, predict_task, scored_tasks
from hat.types_ import ForgetResult

__version__ = "0.2.0"

__all__ = [
    "CompressResult",
    "ForgetResult",
    "HATConfig",
    "HATError",
    "HATPayload",
    "HATTypeError",
    "HATValueError",
    "LayerCapacity",
    "LayerCoverage",
    "Prediction",
    "PruneReport",
    "TaskCapacity",
    "TaskIndexError",
    "TaskIndexedParameter",
    "TaskPrediction",
    "__version__",
    "capacity",
    "compress",
    "condition_gradients",
    "convert",
    "coverage",
    "fit_task_scores",
    "forget_task",
    "mark_trained",
    "modules",
    "predict",
    "predict_task",
    "prune",
    "prune_report",
    "scored_tasks",
    "set_task",
    "task",
    "task_prediction",
    "trained_tasks",
    "types_",
    "unconvert",
    "utils",
]

