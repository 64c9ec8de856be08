"""Where the units of a tensor come from, position by position along its unit dimension.

A HAT layer's mask zeroes the units a task does not use. Downstream, a position of some tensor
holds a unit of one or several HAT layers (a residual sum holds both sides'), or values that no
mask reaches (the model's input, a learned token added to every position). A ``UnitMap`` records
that, as parts: each part maps every position to a unit of one source layer, or marks positions
as dense. It is what the first-call trace of a converted model and the payloads of hand-built
models find, and what two things read:

- a HAT layer's protection: the input units that earlier tasks use (HAT's ``1 - min(a_out, a_in)``);
  a dense position counts as used by every task, which protects the whole row of a used unit;
- a task-indexed norm: the mask it applies after normalizing (its input's units, so that units a
  task does not use leave as exact zeros again), gathered from its sources' masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MODEL_INPUT", "Part", "UnitMap", "dense", "of_layer"]

# the dense positions a first layer reads (HAT counts every input unit as used)
MODEL_INPUT = "the model's input"


@dataclass(frozen=True, eq=False)
class Part:
    """``source``: a HAT layer (``HATMasked``) or None for dense positions (``reason`` says why);
    ``index``: a LongTensor ``[size]``, the source unit at each position, ``-1`` where this part has
    none; None: position ``i`` is unit ``i`` (the whole source, in order)."""

    source: Any
    index: torch.Tensor | None = None
    reason: str = ""

    def covers(self, size: int) -> torch.Tensor:
        return torch.ones(size, dtype=torch.bool) if self.index is None else self.index >= 0


@dataclass(frozen=True, eq=False)
class UnitMap:
    """The units of ``size`` positions: the union of ``parts`` (a position is zero for a task only
    when it is zero in every part)."""

    size: int
    parts: tuple[Part, ...]

    # -- what it says ----------------------------------------------------------------------
    @property
    def sources(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for p in self.parts:
            if p.source is not None and not any(p.source is s for s in out):
                out.append(p.source)
        return tuple(out)

    @property
    def dense_reason(self) -> str | None:
        """Why some positions are dense (the first reason), None where every position is masked."""
        return next((p.reason or "dense" for p in self.parts if p.source is None), None)

    def identity_of(self) -> Any:
        """The source layer when this map is exactly one layer's units in order, else None."""
        if len(self.parts) == 1 and self.parts[0].source is not None and self.parts[0].index is None:
            return self.parts[0].source
        return None

    def same_as(self, other: UnitMap) -> bool:
        if self.size != other.size or len(self.parts) != len(other.parts):
            return False
        for a, b in zip(self.parts, other.parts):
            if a.source is not b.source or (a.index is None) != (b.index is None):
                return False
            if a.index is not None and not torch.equal(a.index, b.index):
                return False
        return True

    # -- protection: the units earlier tasks use --------------------------------------------
    def used(self, protected: torch.Tensor) -> torch.Tensor:
        """Bool ``[size]``: positions some task in ``protected`` (bool ``[num_tasks]``) uses."""
        used = torch.zeros(self.size, dtype=torch.bool, device=protected.device)
        for p in self.parts:
            covers = p.covers(self.size).to(protected.device)
            if p.source is None:
                used |= covers
                continue
            units = p.source.used_units(protected)
            used |= units if p.index is None else covers & units[p.index.clamp(min=0).to(protected.device)]
        return used

    # -- norms: the mask over these positions ------------------------------------------------
    def gather_index(self) -> torch.Tensor:
        """Indexes that gather this map's mask from ``cat([*masks of self.sources, one, zero])``:
        ``[parts, size]`` (``[size]`` for one part; the mask is the maximum over parts), a one on
        dense positions and a zero where no part reaches."""
        sources = self.sources
        offsets, total = [], 0
        for s in sources:
            offsets.append(total)
            total += s.task_embedding.shape[1]
        one, zero = total, total + 1
        rows = []
        for p in self.parts:
            if p.source is None:
                rows.append(torch.where(p.covers(self.size), one, zero))
                continue
            base = offsets[next(i for i, s in enumerate(sources) if s is p.source)]
            if p.index is None:
                rows.append(torch.arange(self.size) + base)
            else:
                rows.append(torch.where(p.index >= 0, p.index + base, zero))
        return torch.stack(rows) if len(rows) > 1 else rows[0]


def dense(size: int, reason: str) -> UnitMap:
    """``size`` positions that every task uses (no mask reaches them)."""
    return UnitMap(size, (Part(None, None, reason),))


def of_layer(layer: Any, repeat: int = 1) -> UnitMap:
    """The units of ``layer``, each repeated ``repeat`` times in a row (a channel-major flatten)."""
    units = layer.task_embedding.shape[1]
    if repeat == 1:
        return UnitMap(units, (Part(layer),))
    return UnitMap(units * repeat, (Part(layer, torch.arange(units).repeat_interleave(repeat)),))
