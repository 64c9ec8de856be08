"""hat-cl's module path of ``TaskIndexedParameter`` (``from hat.parameter import TaskIndexedParameter``)."""

from __future__ import annotations

from hat.modules.task_parameter import TaskIndexedParameter

__all__ = ["TaskIndexedParameter"]
