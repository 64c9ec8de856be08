"""The soft masks of every HAT layer built with one HATConfig, computed together.

In an eager training forward, the first layer of a config that asks for its mask at (task,
scale) computes the masks of all the config's layers in one ``GroupMask`` node; the others take
theirs from that entry until an embedding changes. One node and a few ops per forward instead of
a dozen per layer, which on a CPU cost more in dispatch than in arithmetic.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from hat._runtime import RUNTIME
from hat.masks.gate import GroupMask, flush

__all__ = ["forward_deviation", "group_of"]


class _Entry:
    """The masks of one (task, scale) of a group, with what they were computed from."""

    __slots__ = ("deviation", "embeddings", "index", "masks", "rows", "served", "stamps", "step")

    def __init__(self, chosen: list[Any], rows: list[torch.Tensor], masks: tuple[torch.Tensor, ...]) -> None:
        self.index = {id(m): i for i, m in enumerate(chosen)}  # position by id(module)
        self.embeddings = [m.task_embedding for m in chosen]
        self.stamps = [(e._version, e.data_ptr()) for e in self.embeddings]
        self.step = RUNTIME.steps  # an optimizer step since makes these masks stale
        self.masks = masks
        self.rows = rows  # the embedding rows the masks came from (read again by excess_deviation)
        self.served: set[int] = set()  # positions whose layer took its mask in a forward
        self.deviation: float | None = None

    def excess_deviation(self, task: int, scale: float, s_max: float) -> float:
        """How much further these soft masks are from the hard ones than the masks at ``s_max``
        (the end of every documented scale schedule) would be: the mean over every unit of every
        layer of ``|mask - hard mask|`` (for the sigmoid ``min(m, 1 - m)``) at ``scale``, minus
        the same at ``max(scale, s_max)``. A unit whose embedding is near 0 is undecided at every
        scale; it does not count against a batch. Computed once per entry: one device read per
        training step."""
        if self.deviation is None:
            with torch.no_grad():
                m = torch.cat(self.masks) if len(self.masks) > 1 else self.masks[0]
                e = torch.cat(self.rows) if len(self.rows) > 1 else self.rows[0]
                ref = flush(torch.sigmoid(e * max(scale, s_max)))
                self.deviation = float(torch.minimum(m, 1 - m).mean() - torch.minimum(ref, 1 - ref).mean())
        return self.deviation

    def get(self, module: Any) -> int | None:
        """The position of ``module``'s mask, while its embedding is the one the mask came from:
        one changed in place (a load, a write), replaced, or possibly changed by an optimizer step
        since makes the entry stale."""
        i = self.index.get(id(module))
        emb = module.task_embedding
        if (i is None or self.step != RUNTIME.steps or self.embeddings[i] is not emb
                or self.stamps[i] != (emb._version, emb.data_ptr())):
            return None
        return i


class _MaskGroup:
    """The HAT layers built with one HATConfig object (those that asked for a mask), whose soft
    masks for a (task, scale) are computed together in one ``GroupMask`` node and reused until
    an embedding changes: one node and a few ops per forward instead of a dozen per layer, which
    on a CPU cost more in dispatch than in arithmetic."""

    __slots__ = ("entries", "members")

    def __init__(self) -> None:
        self.members: list[weakref.ref] = []
        self.entries: dict[tuple[Any, ...], _Entry] = {}  # by (task, scale, dtype, device)

    def mask(self, module: Any, task: int, scale: float) -> torch.Tensor:
        emb = module.task_embedding
        key = (task, scale, emb.dtype, emb.device)
        entry = self.entries.get(key)
        i = None if entry is None else entry.get(module)
        if entry is None or i is None:
            entry = self._compute(module, key)
            i = entry.index[id(module)]
        entry.served.add(i)
        return entry.masks[i]

    def served(self, layers: list[Any], task: int, scale: float) -> list[torch.Tensor] | None:
        """The masks that ``layers`` took in a forward from one current entry (so that their
        probes report the task already); None where any did not."""
        emb = layers[0].task_embedding
        entry = self.entries.get((task, scale, emb.dtype, emb.device))
        if entry is None:
            return None
        out = []
        for m in layers:
            i = entry.get(m)
            if i is None or i not in entry.served:
                return None
            out.append(entry.masks[i])
        return out

    def deviation(self, task: int, scale: float, s_max: float) -> float | None:
        """``excess_deviation`` of the latest masks computed for ``(task, scale)``, None if none were."""
        for key in reversed(self.entries):
            if key[0] == task and key[1] == scale:
                return self.entries[key].excess_deviation(task, scale, s_max)
        return None

    def _compute(self, module: Any, key: tuple[Any, ...]) -> _Entry:
        task, scale, dtype, device = key
        cfg = module.hat_config
        refs = [r for r in self.members if r() is not None]
        if not any(r() is module for r in refs):
            entries = self.entries  # a layer that dies takes the cached graph (and its embedding) along
            refs.append(weakref.ref(module, lambda _r: entries.clear()))
        self.members = refs
        live = [m for m in (r() for r in refs) if m is not None]
        chosen = [m for m in live if m.hat_config is cfg and task < m.num_tasks and m.task_embedding.requires_grad
                  and m.task_embedding.dtype == dtype and m.task_embedding.device == device]
        rows = [m.task_embedding[task] for m in chosen]
        masks = GroupMask.apply(task, scale, cfg.grad_comp_factor, cfg.grad_comp_clamp,
                                tuple(m._hat_step for m in chosen), *rows)
        if len(self.entries) >= 8:
            self.entries.clear()
        entry = self.entries[key] = _Entry(chosen, rows, masks)
        return entry


def group_of(cfg: Any) -> _MaskGroup:
    """The mask group of ``cfg`` (keyed by identity: configs are mutable, so not hashable)."""
    groups = RUNTIME.mask_groups
    key = id(cfg)
    got = groups.get(key)
    if got is None or got[0]() is not cfg:
        got = groups[key] = (weakref.ref(cfg, lambda _r, _k=key: groups.pop(_k, None)), _MaskGroup())
    return got[1]


def forward_deviation(cfg: Any, task: int, scale: float) -> float | None:
    """How much further from the hard masks than at ``cfg.max_trn_mask_scale`` are the soft masks
    that the HAT layers built with ``cfg`` took for ``(task, scale)`` in the forward under way (see
    ``_Entry.excess_deviation``); None where none of them has computed a mask for it (eager mode
    with the sigmoid gate computes them)."""
    got = RUNTIME.mask_groups.get(id(cfg))
    if got is None or got[0]() is not cfg:
        return None
    return got[1].deviation(task, scale, cfg.max_trn_mask_scale)
