"""Every piece of process-wide state ``hat`` keeps, in one object.

The task-aware modules alive in the process (the optimizer step hooks find the owners of an
optimizer's parameters here), and caches that can always be rebuilt: the per-config mask groups,
one-hot probe gradients, the step plans and snapshot buffers of each optimizer, which plain
parameters each task trained, and the warnings already given. ``RUNTIME.reset()`` empties the
caches and warnings (the next step rebuilds what it needs); it keeps the live modules and what
plain parameters each task used, which are facts about existing objects, not caches.
"""

from __future__ import annotations

import weakref
from typing import Any


class Runtime:
    def __init__(self) -> None:
        # every task-aware module alive (a hand-built model is registered nowhere else)
        self.live: weakref.WeakSet[Any] = weakref.WeakSet()
        # called whenever a task-aware module is made (hat.protect installs its step hooks there)
        self.on_new_module: list[Any] = []
        # id(plain parameter) -> (weakref to it, per task: did it train it); tensors are not keys
        self.plain_used: dict[int, tuple[weakref.ref, list[bool]]] = {}
        # Bumped whenever any module's cache generation moves: a step plan then compares the
        # generations of its own modules (one model's .to() does not rebuild another's plans).
        self.generation = 0
        # Bumped after every optimizer step: cached masks of an earlier step are stale even where
        # a step left an embedding's version counter as it was (fused AdamW writes without
        # bumping it; under a TorchDispatchMode the foreach clamps do not either)
        self.steps = 0
        self.reset()

    def reset(self) -> None:
        """Drop every cache and every warning already given (tests, long-lived processes)."""
        self.generation += 1
        self.mask_groups: dict[int, tuple[weakref.ref, Any]] = {}  # id(HATConfig) -> (ref, _MaskGroup)
        self.one_hots: dict[tuple[Any, ...], Any] = {}  # (n, slot, dtype, device) -> one-hot tensor
        # (shapes, slots, device) -> where the rows of task-indexed parameters sit in one flat buffer
        self.row_indices: dict[tuple[Any, ...], Any] = {}
        # (units, dtype, device) -> the weights of the excess-deviation dot product (hat.masks.group)
        self.deviation_weights: dict[tuple[Any, ...], Any] = {}
        self.plans: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()  # optimizer -> plan
        self.pending: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()  # optimizer -> step
        self.buffers: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()  # snapshots
        self.warned_blocked: set[int] = set()  # plain parameters warned about (trained but blocked)
        self.warned_norms: set[int] = set()  # plain norms warned about in payload models

    def new_module(self, module: Any) -> None:
        self.live.add(module)
        for callback in self.on_new_module:
            callback()


RUNTIME = Runtime()
