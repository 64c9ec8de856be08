"""``hat.coverage(model)``: how each layer of a HAT model protects earlier tasks, and why.

HAT protects weight ``w[i, j]`` when some earlier task uses both output unit ``i`` and input
unit ``j``. That needs the input's units: which HAT layer's mask each input position carries.
Where it is known, a layer is protected *per unit*; where some positions are dense (no mask
reaches them, or they could not be followed), those positions count as used by every task, so
the rows of used units are protected whole there (exact, but later tasks can change less).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from torch import nn

from hat._core import HATMasked, TaskTracked
from hat._units import MODEL_INPUT

__all__ = ["LayerCoverage", "coverage"]

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
    from hat.modules.masker import HATMasker

    out: list[LayerCoverage] = []
    heads = set(model.__dict__.get("_hat_plain_heads", ()))  # per-task heads left plain on purpose
    for name, m in model.named_modules():
        kind = type(m).__name__
        if name in heads or type(m).__name__ == "NonDynamicallyQuantizableLinear":
            continue  # per-task heads left plain on purpose; a plain attention's out_proj: its attention says
        if isinstance(m, HATMasker):
            continue  # masks its input: no weights to protect
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
