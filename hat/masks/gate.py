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
    den = torch.cosh(e).add_(1)
    # sigmoid's own backward: grad * m * (1 - m), m from the forward as autograd would take it
    q = torch.ops.aten.sigmoid_backward(grad, mask).div_(den)
    # q * (cosh(clamp(z)) + 1) as q + q * cosh(...): the + 1 costs no op of its own
    return torch.addcmul(q, q, torch.cosh(z.clamp(-clamp, clamp))).mul_(factor)


class GroupMask(torch.autograd.Function):
    """The soft masks of one or several layers (row ``t`` of each one's embedding ``E_i``, one
    config) in one autograd node: ``flush(sigmoid(s * E_i[t]))`` forward; backward HAT's
    compensated gradient for each row whose mask got a gradient, written into its ``E_i``'s
    gradient (``row_gradients``), and a report of task ``t`` to that layer's step state (``steps``: one
    ``_StepState`` per row, or empty), in Python: no probe gradient to create and accumulate
    per layer. ``e``: the rows ``E_i[t]`` concatenated, from views without autograd
    (``_hat_row_view``: no select op per layer), ``sizes`` their lengths; ``z = scale * e``.

    Its tensors are kept as attributes, not saved tensors, so that the node may run backward
    more than once: the masks are reused by every forward until an embedding changes (gradient
    accumulation, checkpointed segments recomputed inside a backward)."""

    @staticmethod
    def forward(ctx: Any, task: int, scale: float, factor: float, clamp: float, steps: tuple[Any, ...],
                e: torch.Tensor, z: torch.Tensor, sizes: list[int], *embeddings: torch.Tensor,
                ) -> tuple[torch.Tensor, ...]:
        mask = torch.sigmoid(z)
        ctx.e, ctx.z, ctx.mask = e, z, mask
        ctx.sizes = sizes
        ctx.shapes = [t.shape for t in embeddings]
        ctx.task, ctx.factor, ctx.clamp, ctx.steps = task, factor, clamp, steps
        ctx.set_materialize_grads(False)  # a layer not used by this forward gets no gradient at all
        flushed = flush(mask)
        return tuple(flushed.split(sizes)) if len(sizes) > 1 else (flushed,)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        used = [g is not None for g in grads]
        if not any(used):
            return (None,) * (8 + len(grads))
        e = ctx.e
        if len(grads) > 1:
            grad = torch.cat([g if g is not None else e.new_zeros(size) for g, size in zip(grads, ctx.sizes)])
        else:
            grad = grads[0]
        rows = compensated(grad, e, ctx.z, ctx.mask, ctx.factor, ctx.clamp)
        for step, u in zip(ctx.steps, used):
            if u:
                step.report(ctx.task)
        if all(used):  # the rows as they are, concatenated: no split and cat again
            return (None,) * 8 + tuple(row_gradients(rows, ctx.shapes, [ctx.task] * len(used)))
        split = rows.split(ctx.sizes)
        return (None,) * 8 + tuple(row_gradients([r if u else None for r, u in zip(split, used)], ctx.shapes,
                                                 [ctx.task] * len(used)))


class FoldAffine(torch.autograd.Function):
    """``W_i[t] * m_i`` and ``B_i[t] * m_i`` for every task-indexed BatchNorm that folds the mask
    of the layer before it into its affine (``W_i``, ``B_i`` its per-task parameters, ``t`` the
    task, its own slot in each, ``m_i`` that layer's mask), in one node: one multi-tensor product forward;
    backward two multi-tensor ops, and one buffer for the gradients of all parameters
    (``row_gradients``).
    Per norm that replaces two selects and two products forward, and four products, a sum and
    two ``select_backward`` backward (on a GPU, a kernel or two each). ``rows``: the rows, as
    views without autograd (``_hat_row_view``).

    Its tensors are kept as attributes, not saved tensors, so that the node may run backward
    more than once, as the masks it folds are (see ``GroupMask``)."""

    @staticmethod
    def forward(ctx: Any, task: int, rows: tuple[list[torch.Tensor], list[torch.Tensor]],
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ws, bs = rows
        n = len(ws)
        ms = tensors[2 * n:]
        ctx.task, ctx.ws, ctx.bs, ctx.ms = task, ws, bs, ms
        ctx.versions = [(w._version, b._version) for w, b in zip(ws, bs)]  # rows: the parameters' own storage
        ctx.shapes = [t.shape for t in tensors[:2 * n]]
        ctx.set_materialize_grads(False)  # a norm not used by this forward gets no gradient at all
        return tuple(torch._foreach_mul(ws + bs, [*ms, *ms]))  # one call: weights, then biases

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        ws, bs, ms, shapes = ctx.ws, ctx.bs, ctx.ms, ctx.shapes
        n = len(ws)
        used = [i for i in range(n) if grads[i] is not None or grads[n + i] is not None]
        out: list[Any] = [None] * (2 + 3 * n)
        if not used:
            return tuple(out)
        if any((ws[i]._version, bs[i]._version) != ctx.versions[i] for i in used):  # as autograd says of saved tensors
            raise RuntimeError("hat: a task-indexed BatchNorm's weight or bias was modified in place between the "
                               "forward and this backward; run the forward again after changing it")
        gw = [grads[i] if grads[i] is not None else torch.zeros_like(ws[i]) for i in used]
        gb = [grads[n + i] if grads[n + i] is not None else torch.zeros_like(bs[i]) for i in used]
        m = [ms[i] for i in used]
        k = len(used)
        # one call for the rows' gradients (weights, then biases: g * m) and both terms of the
        # masks' (g_w * w + g_b * b), one more to add those terms
        prods = torch._foreach_mul(gw + gb + gw + gb, m + m + [ws[i] for i in used] + [bs[i] for i in used])
        dm = prods[2 * k:3 * k]
        torch._foreach_add_(dm, prods[3 * k:])
        full = row_gradients(prods[:2 * k], [shapes[i] for i in used] + [shapes[n + i] for i in used],
                             [ctx.task] * (2 * k))
        for j, i in enumerate(used):
            out[2 + i], out[2 + n + i], out[2 + 2 * n + i] = full[j], full[k + j], dm[j]
        return tuple(out)


def row_gradients(rows: list[torch.Tensor | None] | torch.Tensor, shapes: list[torch.Size], slots: list[int],
                  ) -> list[torch.Tensor | None]:
    """The gradients of task-indexed parameters of ``shapes`` whose row ``slots[i]`` got the
    gradient ``rows[i]`` (None: none): zero but for that row. ``rows`` may also be one tensor,
    every row concatenated (all used).

    Pieces of one zeroed buffer, written with one ``index_copy_``: ``select_backward`` per
    parameter would take a zero fill and a copy each (two kernels per parameter on a GPU). The
    buffer holds the parameters of one shape side by side, so that one ``unbind`` gives all their
    gradients: two view ops per shape rather than one per parameter (a ResNet has a few widths
    and dozens of such parameters)."""
    if isinstance(rows, torch.Tensor):
        used, flat = list(range(len(shapes))), rows
    else:
        used = [i for i, r in enumerate(rows) if r is not None]
        flat = None
    out: list[torch.Tensor | None] = [None] * len(shapes)
    if len(used) < 2:
        for i in used:
            row = rows[i] if flat is None else flat.view(shapes[i][1:])
            out[i] = torch.ops.aten.select_backward(row, shapes[i], 0, slots[i])
        return out
    ref = flat if flat is not None else rows[used[0]]
    key = (tuple(shapes[i] for i in used), tuple(slots[i] for i in used), ref.device)
    plan = RUNTIME.row_indices.get(key)
    if plan is None:
        if len(RUNTIME.row_indices) >= 64:
            RUNTIME.row_indices.clear()
        plan = RUNTIME.row_indices[key] = _row_plan([shapes[i] for i in used], [slots[i] for i in used], ref.device)
    index, total, groups = plan
    if flat is None:
        flat = torch.cat([rows[i] if rows[i].dim() == 1 else rows[i].flatten() for i in used])
    buf = ref.new_zeros(total)
    buf.index_copy_(0, index, flat)
    for start, size, stride, members in groups:  # one view per shape (and an unbind if several)
        part = buf.as_strided(size, stride, start)
        if len(members) == 1:
            out[used[members[0]]] = part
        else:
            for k, grad in zip(members, part.unbind(0)):
                out[used[k]] = grad
    return out


def _row_plan(shapes: list[torch.Size], slots: list[int], device: torch.device,
              ) -> tuple[torch.Tensor, int, list[tuple[int, tuple[int, ...], tuple[int, ...], list[int]]]]:
    """Where ``row_gradients`` puts each row: (the index of every element of the concatenated
    rows in the buffer, the buffer's size, per shape (where its part starts, that part's
    contiguous size and strides, the positions of its parameters in ``shapes``)), the
    parameters of one shape side by side: their part is a (count, *shape) block, or the shape
    itself for a single one."""
    by_shape: dict[torch.Size, list[int]] = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(shape, []).append(i)
    start: dict[int, int] = {}
    groups, offset = [], 0
    for shape, members in by_shape.items():
        first = offset
        for k in members:
            start[k] = offset
            offset += shape.numel()
        size = tuple(shape) if len(members) == 1 else (len(members), *shape)
        stride = [1] * len(size)
        for d in range(len(size) - 2, -1, -1):
            stride[d] = stride[d + 1] * size[d + 1]
        groups.append((first, size, tuple(stride), members))
    parts = []
    for i, (shape, slot) in enumerate(zip(shapes, slots)):
        width = shape[1:].numel()
        parts.append(torch.arange(start[i] + slot * width, start[i] + (slot + 1) * width))
    return torch.cat(parts).to(device), offset, groups


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
