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
from hat.masks.gate import FoldAffine, GroupMask

__all__ = ["forward_deviation", "group_of"]


class _Entry:
    """The masks of one (task, scale) of a group, with what they were computed from."""

    __slots__ = ("deviation", "embeddings", "folded", "folds", "index", "masks", "served", "stamps", "step", "z")

    def __init__(self, chosen: list[Any], z: torch.Tensor, masks: tuple[torch.Tensor, ...]) -> None:
        self.index = {id(m): i for i, m in enumerate(chosen)}  # position by id(module)
        self.embeddings = [m.task_embedding for m in chosen]
        self.stamps = [(e._version, e.data_ptr()) for e in self.embeddings]
        self.step = RUNTIME.steps  # an optimizer step since makes these masks stale
        self.masks = masks
        self.z = z  # scale times the embedding rows the masks came from, concatenated (excess_deviation)
        self.served: set[int] = set()  # positions whose layer took its mask in a forward
        self.deviation: float | None = None
        # BatchNorm affines with a layer's mask folded in, by id(norm): (weight, bias, what they
        # were computed from); ``folded``: the norms known when the first was asked for were done
        self.folds: dict[int, tuple[torch.Tensor, torch.Tensor, tuple[Any, ...]]] = {}
        self.folded = False

    def excess_deviation(self, scale: float, s_max: float) -> float:
        """How much further these soft masks are from the hard ones than the masks at ``s_max``
        (the end of every documented scale schedule) would be: the mean over every unit of every
        layer of ``|mask - hard mask|`` (for the sigmoid ``min(m, 1 - m)``) at ``scale``, minus
        the same at ``max(scale, s_max)``. A unit whose embedding is near 0 is undecided at every
        scale; it does not count against a batch. Computed once per entry: one device read per
        training step below ``s_max``, none from it on (the masks are the ones at ``s_max``: 0).

        For a sigmoid mask ``m = sigmoid(z)``, ``min(m, 1 - m) = 1 - sigmoid(|z|)``, so the excess
        is ``mean(sigmoid(k |z|)) - mean(sigmoid(|z|))`` with ``k = s_max / scale``: one dot
        product of both halves with weights -1/n and 1/n (a few ops: this runs every step). Units
        that the forward flushed to 0 (``m <= 1e-6``) count with their ``m``: at most 1e-6 more."""
        if self.deviation is None:
            if scale >= s_max:
                self.deviation = 0.0
                return 0.0
            with torch.no_grad():
                u = self.z.abs()
                far = u * (s_max / scale)  # scale > 0: mask scales are positive (hat._checks)
                n = u.shape[0]
                cache = RUNTIME.deviation_weights
                key = (n, u.dtype, u.device)
                w = cache.get(key)
                if w is None:
                    if len(cache) >= 16:
                        cache.clear()
                    w = cache[key] = torch.cat([u.new_full((n,), -1.0 / n), u.new_full((n,), 1.0 / n)])
                self.deviation = float(torch.dot(torch.sigmoid(torch.cat([u, far])), w))
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

    __slots__ = ("entries", "followers", "members")

    def __init__(self) -> None:
        self.members: list[weakref.ref] = []
        self.entries: dict[tuple[Any, ...], _Entry] = {}  # by (task, scale, dtype, device)
        # task-indexed BatchNorms that fold a member's mask into their affine: id(norm) -> (norm, member)
        self.followers: dict[int, tuple[weakref.ref, weakref.ref]] = {}

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

    def fold(self, norm: Any, source: Any, mask: torch.Tensor, task: int, scale: float,
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``norm``'s rows of ``task`` times ``mask``, the mask ``source`` (a member) took from the
        current entry, or None where ``mask`` is not that. The first norm that asks in an entry
        gets the products of every norm known to fold a member's mask, in one ``FoldAffine`` node;
        one seen for the first time gets a node of its own, and is in the next entry's."""
        emb = source.task_embedding
        entry = self.entries.get((task, scale, emb.dtype, emb.device))
        i = None if entry is None else entry.get(source)
        if i is None or entry.masks[i] is not mask:
            return None
        key = id(norm)
        known = self.followers.get(key)
        if known is None or known[0]() is not norm or known[1]() is not source:
            followers = self.followers
            self.followers[key] = (weakref.ref(norm, lambda _r, _k=key: followers.pop(_k, None)), weakref.ref(source))
        got = entry.folds.get(key)
        if got is None or got[2] != _fold_stamp(norm):
            if entry.folded:
                chosen = [(norm, i)]
            else:
                entry.folded = True
                chosen = []
                for n_ref, s_ref in list(self.followers.values()):
                    n, s = n_ref(), s_ref()
                    j = None if n is None or s is None else entry.get(s)
                    if j is not None and _can_fold(n, entry.masks[j], task):
                        chosen.append((n, j))
            if not any(n is norm for n, _ in chosen):
                if not _can_fold(norm, mask, task):
                    return None
                chosen.append((norm, i))
            rows = ([n._hat_row_view("weight", task) for n, _ in chosen],
                    [n._hat_row_view("bias", task) for n, _ in chosen])
            out = FoldAffine.apply(task, rows,  # task < num_tasks (``_can_fold``): its own slot
                                   *(n.weight for n, _ in chosen), *(n.bias for n, _ in chosen),
                                   *(entry.masks[j] for _, j in chosen))
            for k, (n, _) in enumerate(chosen):
                entry.folds[id(n)] = (out[k], out[len(chosen) + k], _fold_stamp(n))
            got = entry.folds[key]
        return got[0], got[1]

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
                return self.entries[key].excess_deviation(scale, s_max)
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
        rows = [m._hat_row_view("task_embedding", task) for m in chosen]
        e = torch.cat(rows) if len(rows) > 1 else rows[0]
        z = e * scale
        masks = GroupMask.apply(task, scale, cfg.grad_comp_factor, cfg.grad_comp_clamp,
                                tuple(m._hat_step for m in chosen), e, z, [r.shape[0] for r in rows],
                                *(m.task_embedding for m in chosen))
        if len(self.entries) >= 8:
            self.entries.clear()
        entry = self.entries[key] = _Entry(chosen, z, masks)
        return entry


def _fold_stamp(norm: Any) -> tuple[Any, ...]:
    """What a norm's folded affine was computed from: its parameters and their versions (the
    task is the entry's)."""
    w, b = norm.weight, norm.bias
    return (id(w), w._version, id(b), b._version)


def _can_fold(norm: Any, mask: torch.Tensor, task: int) -> bool:
    w, b = norm.weight, norm.bias
    return (w is not None and b is not None and task < norm.num_tasks and w.dtype == b.dtype == mask.dtype
            and w.device == mask.device and w.shape[1:] == mask.shape == b.shape[1:])


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
