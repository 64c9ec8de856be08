"""``hat.coverage(model)``: how each layer of a HAT model protects earlier tasks, and why.

HAT protects weight ``w[i, j]`` when some earlier task uses both output unit ``i`` and input
unit ``j``. That needs the input's units: which HAT layer's mask each input position carries.
Where it is known, a layer is protected *per unit*; where some positions are dense (no mask
reaches them, or they could not be followed), those positions count as used by every task, so
the rows of used units are protected whole there (exact, but later tasks can change less).
"""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple

from torch import nn

from hat.masks.units import MODEL_INPUT
from hat.modules._base import HATMasked
from hat.tracking.tracked import TaskTracked

__all__ = ["LayerCoverage", "coverage", "warn"]

Protection = Literal["unit", "mixed", "rows", "plain"]


class LayerCoverage(NamedTuple):
    """One layer of ``hat.coverage``.

    ``protection``: ``"unit"`` (HAT's ``1 - min(a_out, a_in)`` on every input position),
    ``"mixed"`` (per unit on a share ``traced`` of the input positions, whole rows of used units
    on the rest), ``"rows"`` (whole rows of used units), ``"plain"`` (a layer ``hat.convert`` left
    as it was: shared by every task, frozen whole once a task has trained it). ``reason`` says
    why, where it is not per unit.
    """

    name: str
    kind: str
    protection: Protection
    traced: float
    reason: str


def coverage(model: nn.Module) -> list[LayerCoverage]:
    """How each masked layer of ``model`` (and each linear, convolution or attention layer that
    conversion left plain) is protected, in ``model.named_modules()`` order.

    A converted model learns where its masks reach at its first call: before it, every layer
    reads "not traced yet".
    """
    out: list[LayerCoverage] = []
    heads = set(model.__dict__.get("_hat_plain_heads", ()))  # per-task heads left plain on purpose
    for name, m in model.named_modules():
        kind = type(m).__name__
        if name in heads or type(m).__name__ == "NonDynamicallyQuantizableLinear":
            continue  # per-task heads left plain on purpose; a plain attention's out_proj: its attention says
        if not getattr(m, "_hat_has_weights", True):
            continue  # a HATMasker masks its input: no weights to protect
        if isinstance(m, HATMasked):
            out.append(_layer(name or kind, kind, m))
        elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)) and not isinstance(
                m, TaskTracked):  # a convolution head with per-task weights is not plain
            out.append(LayerCoverage(name or kind, kind, "plain", 0.0,
                                     f"{kind} is not converted (a type hat.convert does not map; pass mapping=...)"))
    return out


def _layer(name: str, kind: str, m: HATMasked) -> LayerCoverage:
    reader = m.__dict__.get("_hat_read_directly")
    if reader is not None:
        return LayerCoverage(name, kind, "plain", 0.0, f"its weight is read outside its forward (by `{reader}`), "
                                                       "so its mask never applies: frozen whole once a task trained it")
    whole = getattr(m, "_hat_whole_rows", None)
    if whole:
        return LayerCoverage(name, kind, "rows", 0.0, whole)
    link = m.__dict__.get("_hat_link")
    if link is None:
        return LayerCoverage(name, kind, "rows", 0.0, "not traced yet: the model has not been called (or only through "
                                                       "another method than forward)")
    dense = [p for p in link.parts if p.source is None and p.reason != MODEL_INPUT]
    if not dense:
        return LayerCoverage(name, kind, "unit", 1.0, "")
    covered = sum(p.covers(link.size) for p in dense).bool()
    traced = 1.0 - float(covered.float().mean())
    reason = dense[0].reason or "dense"
    return LayerCoverage(name, kind, "rows" if traced == 0.0 else "mixed", traced, reason)


def warn(model: nn.Module) -> None:
    """One warning with the count of layers not protected per unit (after the first-call trace)."""
    if model.__dict__.get("_hat_trace_quiet"):
        return
    report = coverage(model)
    rows = [r.name for r in report if r.protection in ("rows", "mixed")]
    plain = [r.name for r in report if r.protection == "plain"]
    if not rows and not plain:
        return

    def names(found: list[str]) -> str:
        return ", ".join(found[:6]) + (" ..." if len(found) > 6 else "")

    said = []
    if rows:
        said.append(f"{len(rows)} protect whole rows of the units earlier tasks use, on some or all of their inputs "
                    f"({names(rows)}): exact, but later tasks can change less")
    if plain:
        said.append(f"{len(plain)} are left plain, shared by every task and frozen once one trained them "
                    f"({names(plain)})")
    warnings.warn(f"hat: of {len(report)} layers, {len(report) - len(rows) - len(plain)} are protected per unit; "
                  + "; ".join(said) + ". hat.coverage(model) says why for each", stacklevel=2)
