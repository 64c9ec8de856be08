"""HATMultiheadAttention: ``nn.MultiheadAttention`` with per-unit masks on both projections."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hat.errors import HATTypeError
from hat.masks import units as _units
from hat.modules._masked import MaskedLayer
from hat.modules.linear import HATLinear
from hat.payload import HATPayload
from hat.tracking.selection import is_per_sample
from hat.tracking.tracked import Selection

__all__ = ["HATMultiheadAttention"]


class HATMultiheadAttention(MaskedLayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose input projection is masked per unit (its ``3 * embed_dim``
    query, key and value outputs, task embedding ``[num_tasks, 3 * embed_dim]``) and whose
    ``out_proj`` is a ``HATLinear``.

    A query or key unit a task does not use adds nothing to that task's attention logits; a value
    unit it does not use is zero in every head's output, which is what ``out_proj`` reads: its
    input units are the value units, known without tracing. Heads are not masked as a whole: each
    unit of each head is. The masks are folded into the projection weights
    (``F.multi_head_attention_forward`` computes the rest, as torch's own slow path does).

    Converted from an ``nn.MultiheadAttention`` with one packed input projection and no
    ``add_bias_kv`` (torchvision's ViT, ``nn.TransformerEncoderLayer``); others stay plain.
    """

    _hat_base = nn.MultiheadAttention
    _hat_unit_params = ("in_proj_weight", "in_proj_bias")
    _hat_weight_name = "in_proj_weight"
    _hat_default_mask_dim = -1
    _hat_can_defer = False  # its output is out_proj's, masked inside its forward

    @classmethod
    def _hat_unsupported(cls, base: nn.Module) -> str | None:
        """Why ``base`` cannot convert (None: it can)."""
        if not base._qkv_same_embed_dim:
            return "keys or values of another size than the queries (separate q/k/v projections)"
        if base.bias_k is not None or base.bias_v is not None:
            return "add_bias_kv=True"
        return None

    @classmethod
    def from_base_module(cls, base_module: nn.Module, hat_config: Any = None, **kwargs: Any) -> HATMultiheadAttention:
        """The HAT attention sharing ``base_module``'s Parameters; its ``out_proj`` a ``HATLinear``."""
        if isinstance(base_module, nn.MultiheadAttention):
            reason = cls._hat_unsupported(base_module)
            if reason is not None:
                raise HATTypeError(f"{cls.__name__}.from_base_module: an nn.MultiheadAttention with {reason} is not "
                                   "supported")
        new = super().from_base_module(base_module, hat_config, **kwargs)
        e = new.embed_dim
        out_proj = HATLinear.from_base_module(base_module.out_proj, hat_config=hat_config)
        # out_proj reads the heads' outputs: the value units, which are this layer's units 2E..3E
        out_proj._hat_set_link(_units.UnitMap(e, (_units.Part(new, torch.arange(2 * e, 3 * e)),)))
        new._modules["out_proj"] = out_proj
        return new

    def _hat_in_units(self) -> int:
        return self.embed_dim

    def forward(self, query: Any, key: Any, value: Any, key_padding_mask: torch.Tensor | None = None,
                need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Any, torch.Tensor | None]:
        return self._hat_dispatch(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                  attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)

    def _hat_forward_payload(self, query: HATPayload, sel: Selection, key: Any, value: Any,
                             **kwargs: Any) -> tuple[HATPayload, torch.Tensor | None]:
        task, scale = sel
        self._hat_record_link(query)
        k = key.data if isinstance(key, HATPayload) else key
        v = value.data if isinstance(value, HATPayload) else value
        if is_per_sample(task):
            out, weights = self._attend_per_task(query.data, k, v, task, scale, **kwargs)
            unit_mask = self.out_proj._hat_mask_of(sel)
            return query._derive(out, mask=None, unit_mask=unit_mask, unit_dim=-1, src=self.out_proj), weights
        masks = (None, None) if task is None else (self._hat_mask_of(sel, True), self.out_proj._hat_mask_of(sel, True))
        out, weights = self._attend(query.data, k, v, *masks, **kwargs)
        return query._derive(out, mask=None, unit_mask=masks[1], unit_dim=-1, src=self.out_proj), weights

    def _hat_record(self, rec: Any, query: Any, key: Any, value: Any, **kwargs: Any) -> Any:
        cross = None if key is query and value is query else "keys and values from another tensor than the queries"
        got = rec.call(self, query, lambda q: self._hat_forward_tensor(q, self._hat_selected(), key, value, **kwargs),
                       dense_input=cross)
        rec.put_layer_output(got[0], self.out_proj)
        return got

    def _hat_forward_tensor(self, query: torch.Tensor, sel: Selection, key: torch.Tensor, value: torch.Tensor,
                            **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        task, scale = sel
        if is_per_sample(task):
            return self._attend_per_task(query, key, value, task, scale, **kwargs)
        if isinstance(task, torch.Tensor) and task.dim() == 1:  # per-sample ids, compiled: per task, eagerly
            return self._hat_eager(query, key, value, **kwargs)
        in_mask = self._hat_mask_of(sel, mark=True)
        out, weights = self._attend(query, key, value, in_mask, self.out_proj._hat_mask_of(sel, mark=True), **kwargs)
        if task is None:  # no task: report the no-task slot
            out = self.out_proj._hat_mark(self._hat_mark(out, self.num_tasks), self.num_tasks)
        return out, weights

    @torch.compiler.disable
    def _hat_eager(self, query: Any, key: Any, value: Any, **kwargs: Any) -> Any:
        """The eager per-sample path, called from compiled code (a graph break): the masks are
        folded into the projection weights per task, which a graph cannot group without the ids."""
        return self._hat_forward_tensor(query, self._hat_state, key, value, **kwargs)

    def _attend_per_task(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, task: Any,
                         scale: float | None, key_padding_mask: torch.Tensor | None = None,
                         attn_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """Per-sample ids: each task's samples attend with that task's masks folded in."""
        if attn_mask is not None and attn_mask.dim() == 3:
            raise HATTypeError("HATMultiheadAttention with per-sample task ids takes a 2-D attn_mask (or none)")
        if query.dim() != 3:
            raise HATTypeError("HATMultiheadAttention with per-sample task ids needs batched inputs (3-d)")
        batch = 0 if self.batch_first else 1
        task.fits(query.shape[batch])
        outs = []
        for t, index in task.groups(query.device):
            pick = [x.index_select(batch, index) for x in (query, key, value)]
            padding = None if key_padding_mask is None else key_padding_mask.index_select(0, index)
            one = Selection(t, scale)
            out, w = self._attend(*pick, self._hat_mask_of(one, True), self.out_proj._hat_mask_of(one, True),
                                  key_padding_mask=padding, attn_mask=attn_mask, **kwargs)
            outs.append((index, out, w))
        shape = list(outs[0][1].shape)
        shape[batch] = query.shape[batch]
        out = outs[0][1].new_empty(shape)
        for index, o, _ in outs:
            out.index_copy_(batch, index, o)
        if outs[0][2] is None:
            return out, None
        w_all = outs[0][2].new_empty((query.shape[batch], *outs[0][2].shape[1:]))
        for index, _, w in outs:
            w_all.index_copy_(0, index, w)
        return out, w_all

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, in_mask: torch.Tensor | None,
                out_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """torch's attention with the masks folded into the projections (None: unmasked)."""
        in_w, in_b = self.in_proj_weight, self.in_proj_bias
        out_w, out_b = self.out_proj.weight, self.out_proj.bias
        if in_mask is not None:
            in_w = in_w * in_mask.view(-1, 1)
            in_b = None if in_b is None else in_b * in_mask
        if out_mask is not None:
            out_w = out_w * out_mask.view(-1, 1)
            out_b = None if out_b is None else out_b * out_mask
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, in_w, in_b, self.bias_k, self.bias_v,
            self.add_zero_attn, self.dropout, out_w, out_b, training=self.training, **kwargs)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        return out, weights

