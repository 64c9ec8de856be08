"""``hat_vit_tiny_patch16_224``: timm's ViT-Tiny/16 with HAT.

What is per task and what is shared:

- per task, with storage of its own (rows of ``[num_tasks + 1, ...]`` parameters, protected row
  by row): the position embedding and the class token (hat-cl shares one storage among tasks,
  so its ViT forgets), every LayerNorm's weight and bias, the classifier head;
- shared and masked per unit: the patch embedding convolution, the qkv, projection and MLP
  linear layers (HAT masks on their outputs).

The residual stream carries the task's dense position embedding in every unit, so no unit of
it is ever an exact 0; the layers reading it are therefore protected by whole rows of the
units earlier tasks use (exact, at some cost in capacity).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from hat.modules.task_params import TaskParameters
from hat.timm_models._common import HATTimmModel, finish, key_check, plain_cfg, require_config

__all__ = ["HATVisionTransformer"]


class HATVisionTransformer(HATTimmModel, TaskParameters, VisionTransformer):
    """timm's VisionTransformer, converted to HAT, with per-task ``pos_embed`` and ``cls_token``
    (made per task by ``hat.convert``, stored ``[num_tasks + 1, 1, ...]``; reading the attribute
    gives the selected task's row, so timm's own forward runs unchanged)."""

    _hat_base = VisionTransformer
    pos_embed = property(lambda self: self._hat_param_row("pos_embed"))  # type: ignore[assignment]
    cls_token = property(lambda self: self._hat_param_row("cls_token"))  # type: ignore[assignment]
    reg_token = property(lambda self: self._hat_param_row("reg_token"))  # type: ignore[assignment]


def _filter(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    return key_check("hat_vit_tiny_patch16_224")(checkpoint_filter_fn(state_dict, model), model)


default_cfgs = generate_default_cfgs({
    "hat_vit_tiny_patch16_224.augreg_in21k_ft_in1k": plain_cfg("vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
})


@register_model
def hat_vit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-Tiny/16 with HAT; ``pretrained=True`` loads timm's vit_tiny_patch16_224 weights."""
    hat_config = require_config("hat_vit_tiny_patch16_224", kwargs.pop("hat_config", None))
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    model = build_model_with_cfg(VisionTransformer, "hat_vit_tiny_patch16_224", pretrained,
                                 pretrained_filter_fn=_filter, feature_cfg=dict(out_indices=3, feature_cls="getter"),
                                 **dict(args, **kwargs))
    # features_only wraps the ViT in a feature getter: the ViT inside gets the per-task tokens
    vit = model if isinstance(model, VisionTransformer) else getattr(model, "model", None)
    model.__dict__["_hat_trace_quiet"] = True  # whole-row protection is expected here (see above)
    finish(model, HATVisionTransformer if model is vit else type(model), hat_config)
    if isinstance(vit, VisionTransformer) and vit is not model:
        vit.hat_config = hat_config
        vit.__class__ = HATVisionTransformer
    return model
