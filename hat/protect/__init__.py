"""Exact protection of earlier tasks: the optimizer step hooks (``hooks``; ``install`` and
``uninstall`` explicit and idempotent, installed when the first task-aware module is made), what
a step protects in each module (``hat.tracking.tracked.TaskTracked._hat_step_masks``), and the
plain parameters a task trained."""

from hat.protect.hooks import condition_gradients, install, installed, mark_trained, trained_tasks, uninstall

__all__ = ["condition_gradients", "install", "installed", "mark_trained", "trained_tasks", "uninstall"]
