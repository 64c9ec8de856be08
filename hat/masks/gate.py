"""HAT's gate ``mask = gate(s * e)`` and its compensated embedding gradient.

``soft_or_hard`` is the one entry point for a mask from embedding rows: hard (``e > 0``) for no
scale, the plain gate without grad, else the gate with HAT's compensation (sigmoid: one autograd
node, ``CompensatedSigmoid``; any other gate: a gradient factor). ``GroupMask`` is the same
sigmoid for the rows of several layers in one node (``hat.masks.group``).
"""

from __future__ import annotations

from typing import Any

import torch

from hat._runtime import RUNTIME

__all__ = ["FLUSH", "CompensatedSigmoid", "GroupMask", "flush", "one_hot", "soft_or_hard"]

FLUSH = 1e-6


def flush(mask: torch.Tensor) -> torch.Tensor:
    """Switch units whose soft mask is below FLUSH fully off. Masks around 1e-30 otherwise make
    subnormal activations downstream, and every op on those runs several times slower on CPUs."""
    return torch.threshold(mask, FLUSH, 0.0)  # one op: values <= FLUSH become 0


def soft_or_hard(cfg: Any, e: torch.Tensor, scale: Any) -> torch.Tensor:
    """The mask of embedding rows ``e`` (any shape) under ``cfg``'s gate at ``scale``: hard
    (``e > 0``) for ``scale=None``; ``scale`` a float or a 0-d tensor (compiled code)."""
    if scale is None:
        return (e > 0).to(e.dtype)
    if not (e.requires_grad and torch.is_grad_enabled()):
        return flush(cfg.gate(scale * e))
    if cfg.gate is torch.sigmoid:
        return CompensatedSigmoid.apply(e, scale, cfg.grad_comp_factor, cfg.grad_comp_clamp)
    return generic_gate(cfg, e, scale)


def generic_gate(cfg: Any, e: torch.Tensor, scale: Any) -> torch.Tensor:
    """A gate other than sigmoid: ``gate(s * e)`` with the compensation as a gradient factor;
    ``scale`` a float or a 0-d tensor (0 only where the result is not used)."""
    with torch.no_grad():
        safe = scale.clamp(min=1e-12) if isinstance(scale, torch.Tensor) else scale
        clamped = (safe * e).clamp(-cfg.grad_comp_clamp, cfg.grad_comp_clamp)
        factor = cfg.grad_comp_factor * (torch.cosh(clamped) + 1) / (safe * (torch.cosh(e) + 1))
    mask = cfg.gate(scale * _GradScale.apply(e, factor))
    return mask - (mask - flush(mask)).detach()  # flushed forward, gradient kept


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` (HAT's embedding compensation)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (factor,) = ctx.saved_tensors
        return grad * factor, None


class CompensatedSigmoid(torch.autograd.Function):
    """``sigmoid(s * e)`` (flushed) with HAT's compensated embedding gradient, in one node.

    Backward is ``s * sigmoid'(s e)`` times the paper's compensation
    ``s_max * (cosh(clamp(s e)) + 1) / (s * (cosh(e) + 1))``, with ``sigmoid'`` taken as
    ``m (1 - m)`` from the forward's ``m`` exactly as autograd would (so a unit saturated on gets
    no gradient, as in the reference implementation). Units flushed to 0 in the forward pass
    keep their gradient (straight-through).
    """

    @staticmethod
    def forward(ctx: Any, e: torch.Tensor, scale: torch.Tensor, factor: float, clamp: float) -> torch.Tensor:
        # one layer's rows (per-sample rows, compiled forwards, get_mask); the layers of one config
        # in an eager forward share a GroupMask node instead
        z = scale * e
        mask = torch.sigmoid(z)
        ctx.save_for_backward(e, z, mask)
        ctx.factor, ctx.clamp = factor, clamp
        return flush(mask)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        e, z, mask = ctx.saved_tensors
        return compensated(grad, e, z, mask, ctx.factor, ctx.clamp), None, None, None


def compensated(grad: torch.Tensor, e: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, factor: float,
                 clamp: float) -> torch.Tensor:
    """The embedding gradient of ``mask = sigmoid(z)``, ``z = scale * e``, with HAT's compensation
    (see CompensatedSigmoid), from the forward's ``z`` and ``mask``: few small ops, since on a CPU
    each costs more in dispatch than in arithmetic at mask sizes."""
    num = torch.cosh(z.clamp(-clamp, clamp)).add_(1)
    den = torch.cosh(e).add_(1)
    # sigmoid's own backward: grad * m * (1 - m), m from the forward as autograd would take it
    return torch.ops.aten.sigmoid_backward(grad, mask).mul_(num).div_(den).mul_(factor)


class GroupMask(torch.autograd.Function):
    """The soft masks of one or several layers (one row ``e_i = E_i[t]`` each, one config) in one
    autograd node: ``flush(sigmoid(s * e_i))`` forward; backward HAT's compensated gradient for
    each row whose mask got a gradient, and a report of task ``t`` to that layer's step state
    (``steps``: one ``_StepState`` per row, or empty), in Python: no probe gradient to create
    and accumulate per layer. The rows are selected outside, by torch's own select, whose
    backward writes them into each ``E``'s gradient without Python.

    Its tensors are kept as attributes, not saved tensors, so that the node may run backward
    more than once: the masks are reused by every forward until an embedding changes (gradient
    accumulation, checkpointed segments recomputed inside a backward)."""

    @staticmethod
    def forward(ctx: Any, task: int, scale: float, factor: float, clamp: float, steps: tuple[Any, ...],
                *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = len(rows)
        e = torch.cat(rows) if n > 1 else rows[0]
        z = e * scale
        mask = torch.sigmoid(z)
        ctx.e, ctx.z, ctx.mask = e, z, mask
        ctx.sizes = [r.shape[0] for r in rows]
        ctx.task, ctx.factor, ctx.clamp, ctx.steps = task, factor, clamp, steps
        ctx.set_materialize_grads(False)  # a layer not used by this forward gets no gradient at all
        flushed = flush(mask)
        return tuple(flushed.split(ctx.sizes)) if n > 1 else (flushed,)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        used = [g is not None for g in grads]
        if not any(used):
            return (None,) * (5 + len(grads))
        e = ctx.e
        if len(grads) > 1:
            grad = torch.cat([g if g is not None else e.new_zeros(size) for g, size in zip(grads, ctx.sizes)])
        else:
            grad = grads[0]
        rows = compensated(grad, e, ctx.z, ctx.mask, ctx.factor, ctx.clamp)
        split = rows.split(ctx.sizes) if len(grads) > 1 else (rows,)
        for step, u in zip(ctx.steps, used):
            if u:
                step.report(ctx.task)
        return (None,) * 5 + tuple(r if u else None for r, u in zip(split, used))


class FoldAffine(torch.autograd.Function):
    """``w_i * m_i`` and ``b_i * m_i`` for every task-indexed BatchNorm that folds the mask of the
    layer before it into its affine (``w_i``, ``b_i`` its rows of the task, ``m_i`` that layer's
    mask), in one node: two multi-tensor products forward, three backward, instead of two
    products, four and a sum per norm (on a GPU, a kernel each).

    Its tensors are kept as attributes, not saved tensors, so that the node may run backward
    more than once, as the masks it folds are (see ``GroupMask``)."""

    @staticmethod
    def forward(ctx: Any, n: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ws, bs, ms = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        ctx.ws, ctx.bs, ctx.ms = ws, bs, ms
        ctx.set_materialize_grads(False)  # a norm not used by this forward gets no gradient at all
        return (*torch._foreach_mul(ws, ms), *torch._foreach_mul(bs, ms))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        ws, bs, ms = ctx.ws, ctx.bs, ctx.ms
        n = len(ws)
        used = [i for i in range(n) if grads[i] is not None or grads[n + i] is not None]
        out: list[Any] = [None] * (1 + 3 * n)
        if not used:
            return tuple(out)
        gw = [grads[i] if grads[i] is not None else torch.zeros_like(ws[i]) for i in used]
        gb = [grads[n + i] if grads[n + i] is not None else torch.zeros_like(bs[i]) for i in used]
        m = [ms[i] for i in used]
        dw = torch._foreach_mul(gw, m)
        db = torch._foreach_mul(gb, m)
        dm = torch._foreach_mul(gw, [ws[i] for i in used])
        torch._foreach_addcmul_(dm, gb, [bs[i] for i in used])
        for k, i in enumerate(used):
            out[1 + i], out[1 + n + i], out[1 + 2 * n + i] = dw[k], db[k], dm[k]
        return tuple(out)


def one_hot(n: int, slot: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached one-hot, never written to: autograd copies a gradient that something else still
    references instead of adopting it, and the probe's hook drops each gradient it reads."""
    cache = RUNTIME.one_hots
    key = (n, slot, dtype, device)
    hot = cache.get(key)
    if hot is None:
        if len(cache) >= 256:  # bounded: task counts and devices are few, but a process may live long
            cache.clear()
        hot = torch.zeros(n, dtype=dtype, device=device)
        hot[slot] = 1
        cache[key] = hot
    return hot
